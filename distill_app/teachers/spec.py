"""Teacher specs as the user types them: the alias, the ``@WEIGHT`` suffix, the stored long form,
and the store's row for a spec (no model is loaded here)."""

from __future__ import annotations

import math

from ..errors import DistillError

DEFAULT_LOCAL = "local:efficientnet_lite0"
# Short specs and what they mean; the stored spec is always the long form.
ALIASES = {"local": DEFAULT_LOCAL}


def canonical_spec(spec: str) -> str:
    spec = spec.strip()
    return ALIASES.get(spec, spec)


def parse_teacher(text: str) -> tuple[str, float]:
    """``"SPEC"`` or ``"SPEC@WEIGHT"`` -> (stored spec, weight); ``local`` is the long form.

    An ``@`` followed by something that is not a number is part of the spec
    (``torchscript:/models@v2/m.pt``), not a bad weight.
    """
    text = text.strip()
    spec, at, weight = text.rpartition("@")
    try:
        w = float(weight) if at else None
    except ValueError:  # an "@" that is part of the spec (a path), not a weight
        w = None
    if w is None:
        spec, w = text, 1.0
    if not (w > 0 and math.isfinite(w)):
        raise DistillError(f"teacher weight must be a positive number, got {text!r}")
    if not spec:
        raise DistillError(f"empty teacher spec in {text!r}")
    return canonical_spec(spec), w


def teacher_label(spec: str, weight: float) -> str:
    """The inverse of :func:`parse_teacher`: ``SPEC`` or ``SPEC@WEIGHT`` (what run folders record)."""
    return spec if weight == 1.0 else f"{spec}@{weight:g}"


def normalise_teacher(text: str) -> str:
    """``"local"`` -> ``"local:efficientnet_lite0"``, ``"hf:a/b@0.30"`` -> ``"hf:a/b@0.3"``."""
    return teacher_label(*parse_teacher(text))


def first_teacher(teachers: list[str] | None) -> str | None:
    """The stored spec of the first teacher a student records (its weight dropped), or None."""
    return parse_teacher(teachers[0])[0] if teachers else None


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
