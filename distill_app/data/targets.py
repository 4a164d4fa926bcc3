"""From stored teacher answers to training targets: class lists, label maps, soft and hard labels.

Pure numpy (no torch), so the store, training and evaluation all map answers the same way.

Decisions (each one a place where the SPEC leaves a choice):

- Matching a teacher label to a class (label map): an exact match beats a case-insensitive one,
  which beats a ``re:`` regular expression (full match). Within one kind of match the first
  class in the file wins, so a teacher label feeds at most one class and is never counted twice.
  An exact entry therefore wins over a catch-all regex listed earlier (``animal = ["re:.*"]``).
- Distribution and top-k answers are treated alike: a full distribution is a top-k answer with
  k = the vocabulary, whose missing mass ``1 - sum(returned)`` is ~0. Missing mass and returned
  mass on unmapped labels go to the ``other`` column with ``other=True``; otherwise the row is
  renormalised over the mapped classes (the missing mass is dropped on purpose: we do not know
  which classes it belongs to, and spreading it uniformly would invent a belief).
- Multi-label answers: a class's score is the max over its mapped labels; ``other`` (when asked)
  scores ``1 - max(class scores)``, the teacher's confidence that no class applies; the row is
  then normalised to a distribution so every teacher kind trains with the same losses.
- A row whose target would be all zeros (empty answer, or nothing mapped without ``other``) is
  dropped: it carries no information. ``len(answers) - len(shas)`` is the number dropped.
- Scores are clipped to [0, 1]; NaN scores are ignored as if absent.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import DistillError, one_line

log = logging.getLogger(__name__)

OTHER = "other"  # the extra column that collects mass no class covers (--other)
MULTILABEL = "multilabel"  # teachers.base.MULTILABEL; repeated so this module stays torch-free
_CHUNK_ROWS = 8192  # rows accumulated at once in float64: bounds memory for 1,000-class targets

Answers = Mapping[str, Sequence[tuple[str, float]]]


# -- label maps --------------------------------------------------------------------------------


@dataclass
class LabelMap:
    """Target classes in order, and for each the teacher labels that feed it.

    ``sources[i]`` lists entries for ``classes[i]``: a teacher label (exact, else
    case-insensitive match) or ``"re:PATTERN"`` (a regular expression that must match the
    whole label).
    """

    classes: list[str]
    sources: list[list[str]]
    _cache: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def identity(cls, classes: Sequence[str]) -> LabelMap:
        """Each class fed by the teacher label of the same name."""
        return cls(list(classes), [[c] for c in classes])

    @classmethod
    def from_dict(cls, data: Mapping, origin: str = "label map") -> LabelMap:
        """From ``{class: [teacher labels]}`` (the file format), checked; ``origin`` names it in errors."""
        if not isinstance(data, Mapping) or not data:
            raise DistillError(f"{origin}: expected one key per target class, found none")
        classes, sources = [], []
        for name, value in data.items():
            classes.append(_check_class(name, value, origin))
            sources.append(list(value) if not isinstance(value, str) else [value])
        return cls(classes, sources)

    def to_dict(self) -> dict[str, list[str]]:
        """``{class: [teacher labels]}``: what :meth:`from_dict` and the file format read."""
        return {c: list(s) for c, s in zip(self.classes, self.sources)}

    def index(self, label: str) -> int:
        """The class index teacher ``label`` feeds, or -1 when no class covers it (cached)."""
        found = self._cache.get(label)
        if found is None:
            found = self._cache[label] = self._match(label)
        return found

    def _match(self, label: str) -> int:
        if not hasattr(self, "_exact"):
            self._compile()
        if label in self._exact:
            return self._exact[label]
        folded = self._folded.get(label.casefold())
        if folded is not None:
            return folded
        for pattern, i in self._patterns:
            if pattern.fullmatch(label):
                return i
        return -1

    def _compile(self) -> None:
        self._exact: dict[str, int] = {}
        self._folded: dict[str, int] = {}
        self._patterns: list[tuple[re.Pattern, int]] = []
        for i, entries in enumerate(self.sources):
            for entry in entries:
                if entry.startswith("re:"):
                    self._patterns.append((re.compile(entry[3:]), i))
                else:  # setdefault: the first class listing a label keeps it
                    self._exact.setdefault(entry, i)
                    self._folded.setdefault(entry.casefold(), i)


def _check_class(name: str, value, origin: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise DistillError(f"{origin}: class names must be non-empty strings, got {name!r}")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        kind = "a table" if isinstance(value, Mapping) else type(value).__name__
        raise DistillError(f"{origin}: class {name!r} must be a list of teacher labels, got {kind}")
    if not value:
        raise DistillError(f"{origin}: class {name!r} lists no teacher labels")
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise DistillError(f"{origin}: class {name!r}: teacher labels must be non-empty strings, got {entry!r}")
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise DistillError(f"{origin}: class {name!r}: bad regular expression {entry!r} ({e})") from None
    return name


def load_label_map(path: str | Path) -> LabelMap:
    """Read a TOML or JSON label map (one top-level key per target class, in order).

    The format follows the suffix (``.toml``/``.json``); any other suffix tries JSON, then TOML.
    Every problem is a one-line DistillError naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DistillError(f"label map {path} not found: check --label-map") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"label map {path} cannot be read ({type(e).__name__}): check --label-map") from None
    suffix = path.suffix.lower()
    parsers = [_parse_toml] if suffix == ".toml" else [_parse_json] if suffix == ".json" else [_parse_json, _parse_toml]
    errors = []
    for parse in parsers:
        try:
            data = parse(text)
            break
        except ValueError as e:
            errors.append(str(e))
    else:
        raise DistillError(f"label map {path}: {'; '.join(errors)}")
    return LabelMap.from_dict(data, origin=f"label map {path}")


def _parse_toml(text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"invalid TOML ({one_line(e, None)})") from None


def _parse_json(text: str) -> dict:
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"class {dup!r} appears twice")
        return dict(pairs)

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({one_line(e, None)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object of class -> labels, got {type(data).__name__}")
    return data


# -- class lists -------------------------------------------------------------------------------


def default_classes(answers: Answers | Iterable[Answers], max_classes: int | None = None) -> list[str]:
    """The teachers' observed vocabulary, by total score mass (largest first, ties by name).

    ``answers``: one teacher's ``{sha256: [(label, score), ...]}`` or a list of them (ensemble).
    Mass rather than top-1 counts: soft targets train on every returned label, and a label that
    is often second (``cat`` next to ``dog``) matters to the student even if never first. Labels
    with zero total mass are left out (nothing to learn); ``max_classes`` keeps the first N.
    """
    mass: dict[str, float] = {}
    for one in [answers] if isinstance(answers, Mapping) else answers:
        for scores in one.values():
            for label, score in scores:
                s = _clean(score)
                if s > 0 and isinstance(label, str):
                    mass[label] = mass.get(label, 0.0) + s
    # Rounded so float noise (0.6 + 0.3 vs 0.4 + 0.5) does not decide what is really a tie.
    ranked = sorted(mass, key=lambda label: (-round(mass[label], 9), label))
    return ranked[:max_classes] if max_classes is not None else ranked


def with_other(classes: Sequence[str], other: bool) -> list[str]:
    """The target columns: ``classes``, plus ``"other"`` when asked and not already a class.

    A class the user named ``other`` receives the uncovered mass itself (no second column).
    """
    classes = list(classes)
    return classes + [OTHER] if other and OTHER not in classes else classes


def _as_float(score) -> float:
    """A score as a float; NaN for anything that is not a number (treated as absent)."""
    if isinstance(score, (int, float)):
        return float(score)
    try:
        return float(score)
    except (TypeError, ValueError):
        return math.nan


def _clean(score) -> float:
    """A score as a float in [0, 1]; NaN and non-numbers become 0."""
    s = _as_float(score)
    return 0.0 if math.isnan(s) else min(max(s, 0.0), 1.0)


# -- soft targets ------------------------------------------------------------------------------


def build_targets(
    answers: Answers,
    score_kind: str,
    classes_or_map: Sequence[str] | LabelMap,
    other: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Training targets for one teacher's answers (see the module docstring for the rules).

    answers: ``{sha256: [(label, score), ...]}``; score_kind: distribution | topk | multilabel;
    classes_or_map: target classes (each fed by the teacher label of that name) or a LabelMap.
    Returns ``(shas, targets)``: the images kept, in ``answers`` order, and targets
    ``(N, C)`` float32 (``C + 1`` with ``other`` unless a class is named ``other``), rows sum to 1.
    """
    label_map = classes_or_map if isinstance(classes_or_map, LabelMap) else LabelMap.identity(classes_or_map)
    columns = with_other(label_map.classes, other)
    all_shas = list(answers)
    rows, cols, vals = _flatten(answers, all_shas, label_map)
    n, c = len(all_shas), len(label_map.classes)
    out = np.zeros((n, len(columns)), dtype=np.float32)
    keep = np.zeros(n, dtype=bool)
    bounds = np.searchsorted(rows, np.arange(0, n + _CHUNK_ROWS, _CHUNK_ROWS))
    for k, start in enumerate(range(0, n, _CHUNK_ROWS)):
        lo, hi = bounds[k], bounds[k + 1]
        stop = min(start + _CHUNK_ROWS, n)
        part = _chunk_targets(rows[lo:hi] - start, cols[lo:hi], vals[lo:hi], stop - start, c, score_kind)
        _finish(part, out[start:stop], keep[start:stop], columns, other)
    shas = [s for s, k in zip(all_shas, keep) if k]
    if len(shas) < n:
        log.info("targets: %d of %d answers map to no class and were dropped", n - len(shas), n)
    return shas, out[keep]


def _flatten(answers: Answers, shas: list[str], label_map: LabelMap):
    """Parallel arrays (row, column, score) over every returned label; column C = unmapped.

    No Python loop per label (100,000 answers of 30 labels are 3 million): the pairs are chained
    and unzipped in C, each distinct label is matched once, and the scores become one array.
    """
    c = len(label_map.classes)
    lengths = np.fromiter((len(answers[sha]) for sha in shas), dtype=np.int64, count=len(shas))
    if not lengths.sum():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    # A list of the pairs and two maps over it: no new object per label, so the cyclic garbage
    # collector is not set off (zip(*pairs) made 3 million iterators and cost 5x the rest).
    pairs = list(itertools.chain.from_iterable(answers[sha] for sha in shas))
    labels = list(map(operator.itemgetter(0), pairs))
    scores = list(map(operator.itemgetter(1), pairs))
    column = {}
    for label in set(labels):
        found = label_map.index(label) if isinstance(label, str) else -1
        column[label] = found if found >= 0 else c
    rows = np.repeat(np.arange(len(shas), dtype=np.int64), lengths)
    cols = np.fromiter(map(column.__getitem__, labels), dtype=np.int64, count=len(labels))
    try:
        vals = np.array(scores, dtype=np.float64)
    except (TypeError, ValueError):  # a string or None among the scores: one at a time
        vals = np.fromiter(map(_as_float, scores), dtype=np.float64, count=len(scores))
    finite = ~np.isnan(vals)
    return rows[finite], cols[finite], np.clip(vals[finite], 0.0, 1.0)


def _chunk_targets(rows, cols, vals, n: int, c: int, score_kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class scores (n, c) float64, uncovered score (n,), answered (n,) bool) for one chunk."""
    acc = np.zeros((n, c + 1), dtype=np.float64)
    answered = np.zeros(n, dtype=bool)
    answered[rows] = True
    if score_kind == MULTILABEL:
        np.maximum.at(acc, (rows, cols), vals)
        scores = acc[:, :c]
        best = scores.max(axis=1) if c else np.zeros(n)
        uncovered = 1.0 - best  # confidence that no class applies
    else:  # distribution / top-k: sums; missing mass is known and explicit
        np.add.at(acc, (rows, cols), vals)
        scores = acc[:, :c]
        missing = np.clip(1.0 - acc.sum(axis=1), 0.0, None)
        uncovered = acc[:, c] + missing
    return scores, uncovered, answered


def _finish(part, out: np.ndarray, keep: np.ndarray, columns: list[str], other: bool) -> None:
    """Add the uncovered column when asked, drop empty rows, normalise; writes into out/keep."""
    scores, uncovered, answered = part
    if other:
        if scores.shape[1] < len(columns):
            scores = np.concatenate([scores, uncovered[:, None]], axis=1)
        else:  # a class named "other" takes the uncovered mass itself
            scores[:, columns.index(OTHER)] += uncovered
    total = scores.sum(axis=1)
    ok = answered & (total > 0)
    out[ok] = scores[ok] / total[ok, None]
    keep[:] = ok


def ensemble(parts: Sequence[tuple[Sequence[str], np.ndarray, float]]) -> tuple[list[str], np.ndarray]:
    """Weighted average of several teachers' targets over the same columns.

    parts: ``(shas, targets (N_t, C), weight)`` per teacher, weight > 0. For each image, the
    weights of the teachers that answered it are renormalised to sum to 1, so an image one
    teacher never saw still gets a full distribution from the others. Images come in order of
    first appearance. Returns ``(shas, targets (N, C) float32)``, rows sum to 1.
    """
    if not parts:
        raise ValueError("ensemble needs at least one teacher's targets")
    width = {t.shape[1] for _, t, _ in parts}
    if len(width) != 1:
        raise ValueError(f"teachers' targets have different class counts {sorted(width)}; use one label map")
    position: dict[str, int] = {}
    for shas, _, _ in parts:
        for sha in shas:
            position.setdefault(sha, len(position))
    total = np.zeros((len(position), width.pop()), dtype=np.float64)
    weight_sum = np.zeros(len(position), dtype=np.float64)
    for shas, targets, weight in parts:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"teacher weights must be positive numbers, got {weight}")
        idx = np.fromiter((position[s] for s in shas), dtype=np.int64, count=len(shas))
        total[idx] += weight * np.asarray(targets, dtype=np.float64)
        weight_sum[idx] += weight
    return list(position), (total / weight_sum[:, None]).astype(np.float32)


# -- hard labels -------------------------------------------------------------------------------


def teacher_argmax(targets: np.ndarray) -> np.ndarray:
    """(N,) int64 index of each row's largest target; ties go to the earlier class."""
    return np.asarray(targets).argmax(axis=1).astype(np.int64)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) float32 one-hot rows for ``labels`` (N,) int."""
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def folder_classes(folder_labels: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    """(N,) int64: the class index each folder name matches, -1 where none (or no folder).

    A folder name matches a class exactly, else case-insensitively (``Cat/`` is the class
    ``cat``): training's hard labels and eval's ground truth both come from here.
    """
    exact = {c: i for i, c in reversed(list(enumerate(classes)))}
    folded = {c.casefold(): i for i, c in reversed(list(enumerate(classes)))}
    return np.array([-1 if name is None else exact.get(name, folded.get(name.casefold(), -1))
                     for name in folder_labels], dtype=np.int64)


def hard_labels(
    targets: np.ndarray,
    classes: Sequence[str],
    folder_labels: Sequence[str | None] | None = None,
) -> np.ndarray:
    """(N,) int64 hard label per row: its folder label when it names a class (:func:`folder_classes`),
    else the argmax.

    classes: the target columns (with ``other`` if present); folder_labels: per row, the class
    folder the image was found in (None when none).
    """
    labels = teacher_argmax(targets)
    if folder_labels is None:
        return labels
    matched = folder_classes(folder_labels, classes)
    return np.where(matched >= 0, matched, labels)
