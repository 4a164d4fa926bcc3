"""From a teacher spec the user typed to the teacher's rows in the store (no model is loaded)."""

from __future__ import annotations

from ..errors import DistillError
# Short specs and what they mean; the stored spec is always the long form.
ALIASES = {"local": "local:efficientnet_lite0"}


def canonical_spec(spec: str) -> str:
    spec = spec.strip()
    return ALIASES.get(spec, spec)


def stored_teacher(store, spec: str) -> dict:
    """The ``teachers`` row for ``spec``; a clear error when it has never been harvested."""
    row = store.find_teacher(canonical_spec(spec))
    if row is None:
        known = ", ".join(t["spec"] for t in store.teachers()) or "none yet"
        raise DistillError(
            f"no answers from teacher {spec!r} in {store.path} (teachers there: {known}); "
            f"run `distill harvest --teacher {spec}` first"
        )
    return row


def parse_weighted(spec: str) -> tuple[str, float]:
    """``"hf:a/b@0.3"`` -> ``("hf:a/b", 0.3)``; no weight means 1."""
    name, sep, weight = spec.rpartition("@")
    if not sep:
        return canonical_spec(spec), 1.0
    try:
        w = float(weight)
    except ValueError:
        raise DistillError(f"bad teacher weight in {spec!r}: write SPEC@0.3") from None
    if not w > 0:
        raise DistillError(f"teacher weight must be positive, got {w} in {spec!r}")
    return canonical_spec(name), w
