"""Which of the waiting images a budget goes to, in which order: never scan order, so the first
day of a quota already covers the image set. Orders are seeded and depend only on the images'
hashes, so a run that stops and resumes (or a second harvester) keeps to one order.

- ``random``: a seeded shuffle.
- ``balanced``: round-robin over the class folders (a seeded shuffle inside each); images
  outside any class folder form one more group.
"""

from __future__ import annotations

import hashlib
import itertools

STRATEGIES = ("random", "balanced")


def select(strategy: str, shas: list[str], labels: dict[str, str | None], seed: int = 0) -> list[str]:
    """``shas`` in the order ``strategy`` sends them; ``labels``: sha256 -> class folder or None."""
    shuffled = sorted(shas, key=lambda sha: _rank(sha, seed))
    if strategy == "random":
        return shuffled
    if strategy == "balanced":
        groups: dict[str | None, list[str]] = {}
        for sha in shuffled:
            groups.setdefault(labels.get(sha), []).append(sha)
        # Folders in a seeded order too, so no class always goes first.
        order = sorted(groups, key=lambda g: _rank(str(g), seed))
        return [sha for row in itertools.zip_longest(*(groups[g] for g in order)) for sha in row if sha]
    raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _rank(key: str, seed: int) -> str:
    # A keyed hash, not random.shuffle: the rank of an image never depends on which others wait.
    return hashlib.blake2b(key.encode(), digest_size=8, key=seed.to_bytes(8, "little")).hexdigest()
