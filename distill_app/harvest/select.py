"""Which of the waiting images a budget goes to, in which order: never scan order, so the first
day of a quota already covers the image set. Orders are seeded and depend only on the images'
hashes (and, for the model strategies, on the model's scores of them), so a run that stops and
resumes (or a second harvester) keeps to one order.

- ``random``: a seeded shuffle.
- ``balanced``: round-robin over the class folders (a seeded shuffle inside each); images
  outside any class folder form one more group.
- ``uncertainty``: the ``--selector`` student's predictive entropy, highest first (smaller
  top-1/top-2 margin first among equals): the images it knows least about.
- ``diversity``: k-center greedy (Sener & Savarese 2018, "Active learning for convolutional
  neural networks: a core-set approach") on unit-length embeddings of the ``--selector``
  student, or of the local EfficientNet-Lite0 teacher without one. Each pick is the waiting
  image farthest from every centre so far; the images already answered are centres from the
  start, so a first paid batch goes to what they do not cover yet. Greedy picks fill the
  budget; the images after them (beyond what this run can send) follow in the seeded order.
- ``typical``: TypiClust (Hacohen, Dekel & Weinshall 2022, "Active learning on a budget:
  opposite strategies suit high and low budgets"): k-means on the same embeddings (answered and
  waiting together, as many clusters as answered + budget images, within the limits of
  ``typical_picks``), then, from the cluster with the fewest answered or picked images (the
  larger first), its most typical waiting image: the one closest on average to its
  ``TYPICAL_NEIGHBOURS`` nearest neighbours in the cluster. Dense, representative photos spread
  over the clusters: what a small budget should buy first, where k-center buys the outliers.
- ``hybrid``: the ``HYBRID_POOL`` x budget most uncertain images, then k-center greedy among them
  (answered images again centres): uncertain, but not ten crops of one confusing photo. After
  the picks, the rest in order of uncertainty.

The model strategies only matter when the budget is smaller than what waits: when everything
waiting goes out in this run (no budget, or one as large), or nothing does (a dry run, a spent
quota), the order buys nothing, so no model runs and the order is the seeded shuffle.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the strategies that run a model: `harvest` starts fast
    import torch

STRATEGIES = ("random", "balanced", "uncertainty", "diversity", "typical", "hybrid")
MODEL_STRATEGIES = ("uncertainty", "diversity", "typical", "hybrid")
NEEDS_SELECTOR = ("uncertainty", "hybrid")
# hybrid: uncertain candidates per image of the budget. 2, the smallest pool that leaves
# k-center a real choice; a larger one trades uncertainty for spread.
HYBRID_POOL = 2
# typical: TypiClust's published settings (20 neighbours; clusters of fewer than 5 images skipped).
TYPICAL_NEIGHBOURS = 20
TYPICAL_MIN_CLUSTER = 5
# More clusters than this only when the budget itself is larger: with many images answered, each
# k-means pass over 100,000 embeddings would cost more (M + k clusters) than the order is worth.
TYPICAL_MAX_CLUSTERS = 2048
# Above this many images k-means runs in mini-batches (sklearn's MiniBatchKMeans, as TypiClust
# does for large pools): full Lloyd passes over 100,000 x 1,280 embeddings take minutes each.
_FULL_KMEANS_IMAGES = 20_000
_SIMILARITIES_AT_ONCE = 2 ** 25  # (waiting x centres) block of the first distance pass: 128 MB


@dataclass
class Pool:
    """What the model strategies need besides the waiting images' hashes."""

    paths: dict[str, str]  # sha256 -> a file holding those bytes: the waiting and answered images
    budget: int | None  # images this run may send (None: no limit)
    answered: list[str] = field(default_factory=list)  # answered already: diversity's first centres
    selector: str | None = None  # a student run folder or model.pt
    device: str = "auto"
    batch_size: int = 32
    report: dict = field(default_factory=dict)  # filled in: images scored, from the cache, unreadable, seconds


def select(strategy: str, shas: list[str], labels: dict[str, str | None], seed: int = 0,
           pool: Pool | None = None) -> list[str]:
    """``shas`` in the order ``strategy`` sends them; ``labels``: sha256 -> class folder or None;
    ``pool``: what the model strategies need (required for them)."""
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
    if strategy not in MODEL_STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if pool is None:
        raise ValueError(f"--select {strategy} needs the images' paths and the budget (a Pool)")
    if strategy in NEEDS_SELECTOR and not pool.selector:
        raise ValueError(f"--select {strategy} needs a selector student")
    if not pool.budget or pool.budget >= len(shuffled):
        return shuffled
    return _by_model(strategy, shuffled, pool, seed)


def _by_model(strategy: str, shuffled: list[str], pool: Pool, seed: int) -> list[str]:
    from .scoring import Scorer  # torch models and the cache: only for the strategies that use them

    start = time.monotonic()
    scorer = Scorer(pool.selector, pool.device, pool.batch_size)
    answered = [] if strategy == "uncertainty" else sorted(set(pool.answered) - set(shuffled),
                                                           key=lambda sha: _rank(sha, seed))
    scores = scorer.score(shuffled + answered, pool.paths)
    pool.report.update(model=scorer.name, scored=scores.computed,
                       cached=len(scores.shas) - scores.computed, unreadable=len(scores.failed))
    waiting = set(shuffled)
    rows = [i for i, sha in enumerate(scores.shas) if sha in waiting]  # in the seeded order
    centres = scores.embeddings[[i for i, sha in enumerate(scores.shas) if sha not in waiting]]
    if strategy == "diversity":
        picks = k_center_greedy(scores.embeddings[rows], pool.budget, centres, scorer.device)
        head = [scores.shas[rows[i]] for i in picks]
    elif strategy == "typical":
        picks = typical_picks(scores.embeddings[rows], pool.budget, centres, seed)
        head = [scores.shas[rows[i]] for i in picks]
    else:
        # Stable sort: ties keep the seeded order.
        rows.sort(key=lambda i: (-float(scores.entropy[i]), float(scores.margin[i])))
        if strategy == "uncertainty":
            head = [scores.shas[i] for i in rows]
        else:
            candidates = rows[:HYBRID_POOL * pool.budget]
            picks = k_center_greedy(scores.embeddings[candidates], pool.budget, centres, scorer.device)
            head = [scores.shas[candidates[i]] for i in picks] + [scores.shas[i] for i in rows]
    pool.report["seconds"] = round(time.monotonic() - start, 3)
    # Then the rest in the seeded order, unreadable images included: the harvest records their
    # failure when it reaches them, as for any strategy.
    return list(dict.fromkeys(head + shuffled))


def k_center_greedy(points: torch.Tensor, k: int, centres: torch.Tensor | None = None,
                    device: torch.device | str = "cpu") -> list[int]:
    """Rows of ``points`` (N, D), unit length, picked one at a time, each the farthest from its
    nearest centre (``centres`` (M, D) and the picks so far): k-center greedy.

    Squared distances of unit vectors are 2 - 2 cos, so each pick costs one (N, D) x (D,)
    product and an element-wise minimum: O(k x N x D) in all, plus O(N x M x D) once for the
    centres given, in blocks. Without centres the first pick is row 0 (the caller's seeded
    order); ties go to the lowest row.
    """
    import torch

    n = points.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    points = points.to(device, torch.float32)
    nearest = torch.full((n,), float("inf"), device=points.device)
    if centres is not None and len(centres):
        centres = centres.to(device, torch.float32)
        step = max(1, _SIMILARITIES_AT_ONCE // max(1, n))
        for i in range(0, len(centres), step):
            closest = (points @ centres[i:i + step].T).amax(dim=1)
            nearest = torch.minimum(nearest, (2 - 2 * closest).clamp_min(0))
        pick = int(torch.argmax(nearest))
    else:
        pick = 0
    picks = []
    for _ in range(k):
        picks.append(pick)
        nearest = torch.minimum(nearest, (2 - 2 * (points @ points[pick])).clamp_min(0))
        nearest[pick] = -1.0  # never picked twice, even after everything else is covered
        pick = int(torch.argmax(nearest))
    return picks


def typical_picks(points: torch.Tensor, k: int, answered: torch.Tensor | None = None, seed: int = 0) -> list[int]:
    """Rows of ``points`` (N, D), the waiting images' embeddings, picked TypiClust's way: k-means
    over them and ``answered`` (M, D) together into M + k clusters, capped at one per
    ``TYPICAL_MIN_CLUSTER`` images and at ``TYPICAL_MAX_CLUSTERS``, but never fewer than k;
    then each pick is the most typical unpicked row of the cluster with the fewest
    answered-or-picked members (ties: the larger cluster, then the lower cluster number).

    Typicality is the inverse mean distance to the ``TYPICAL_NEIGHBOURS`` nearest neighbours
    inside the cluster (fewer in a small one: half its size, at least one), as in the paper.
    """
    import numpy as np
    import torch
    from sklearn.cluster import KMeans, MiniBatchKMeans  # well-kept k-means with k-means++ seeding

    n = points.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    answered = points[:0] if answered is None else answered
    everything = torch.cat([points.float(), answered.float()]).numpy()
    clusters = min(len(answered) + k, max(k, min(len(everything) // TYPICAL_MIN_CLUSTER, TYPICAL_MAX_CLUSTERS)))
    kmeans = (KMeans(clusters, n_init=1, random_state=seed) if len(everything) <= _FULL_KMEANS_IMAGES
              else MiniBatchKMeans(clusters, n_init=3, batch_size=4096, random_state=seed))
    assignment = kmeans.fit_predict(everything)
    members = [np.flatnonzero(assignment[:n] == c) for c in range(clusters)]  # waiting rows per cluster
    taken = np.bincount(assignment[n:], minlength=clusters)  # answered per cluster
    size = np.bincount(assignment, minlength=clusters)
    # Clusters with waiting rows, keyed (answered or picked, -size, number): the next pick's cluster on top.
    heap = [(int(taken[c]), -int(size[c]), c) for c in range(clusters) if len(members[c])]
    heapq.heapify(heap)
    # Each cluster's waiting rows, most typical first, computed when the cluster is first drawn from.
    queues: dict[int, list[int]] = {}
    picks: list[int] = []
    while len(picks) < k:
        count, negative_size, c = heapq.heappop(heap)
        if c not in queues:
            queues[c] = [int(i) for i in members[c][np.argsort(-_typicality(everything[members[c]]), kind="stable")]]
        picks.append(queues[c].pop(0))
        if queues[c]:
            heapq.heappush(heap, (count + 1, negative_size, c))
    return picks


def _typicality(x):
    """1 / mean Euclidean distance to the nearest neighbours within ``x`` (n, D)."""
    import numpy as np

    if len(x) == 1:
        return np.ones(1)
    sq = (x * x).sum(1)  # the Gram form: no (n, n, D) temporary
    d = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None))
    np.fill_diagonal(d, np.inf)
    neighbours = max(1, min(TYPICAL_NEIGHBOURS, len(x) // 2))
    nearest = np.partition(d, neighbours - 1, axis=1)[:, :neighbours]
    return 1.0 / (nearest.mean(1) + 1e-8)


def _rank(key: str, seed: int) -> str:
    # A keyed hash, not random.shuffle: the rank of an image never depends on which others wait.
    return hashlib.blake2b(key.encode(), digest_size=8, key=seed.to_bytes(8, "little")).hexdigest()
