"""The training set: the user's images matched to the teachers' stored answers, as targets,
hard labels and a stable train/validation split (:class:`TrainData`). The store is only read."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache import StoreError, default_db_path, open_store

from ..data.images import list_images
from ..data.label_check import folder_label_map, suggest_label_map
from ..data.targets import (LabelMap, build_targets, default_classes, ensemble, folder_classes, hard_labels,
                            load_label_map, teacher_argmax, with_other)
from ..errors import DistillError
from ..teachers.spec import parse_teacher, stored_teacher
from .config import FOLDERS, Progress, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """Every usable image, sorted by hash (so order never depends on the file system or DB)."""

    shas: list[str]
    paths: list[str]
    soft_targets: np.ndarray  # (N, C) float32, rows sum to 1 (teacher ensemble)
    hard_labels: np.ndarray  # (N,) int64: folder label when it names a class, else teacher argmax
    teacher_top1: np.ndarray  # (N,) int64 argmax of soft_targets
    is_val: np.ndarray  # (N,) bool
    classes: list[str]  # target columns (with "other" when asked)
    label_map: LabelMap | None  # the user's map, None for the teacher's own vocabulary
    counts: dict = field(default_factory=dict)  # skipped, unanswered, unmapped, labelled
    # Images under --images with no usable answer (unanswered, or mapped to no class), by hash:
    # what --unlabeled fixmatch|noisy|auto train on, never as labelled.
    unlabeled: list[tuple[str, str]] = field(default_factory=list)  # (sha256, path)


def scan_images(root: str, progress: Progress | None) -> tuple[dict[str, tuple[str, str | None]], int]:
    """(sha256 -> (path, folder label), files skipped): :func:`data.images.list_images` as the
    trainer uses it (the same content twice is one image; none usable is a DistillError)."""
    report = progress and (lambda done, total: progress(0, done, total, {"phase": "images"}))
    found = list_images(root, report)
    return dict(zip(found.shas, zip(found.paths, found.labels))), sum(found.skipped.values())


def read_answers(cfg: TrainConfig, shas: list[str]) -> list[tuple[str, float, str, dict]]:
    """Per teacher: (spec, weight, score kind, {sha256: [(label, score), ...]}) for ``shas``."""
    db = cfg.db or default_db_path()
    if not Path(db).exists():
        raise DistillError(f"database {db} not found: run `distill harvest --images {cfg.images}` first or pass --db")
    try:
        store = open_store(db)
    except StoreError as e:
        raise DistillError(str(e)) from None
    try:
        result = []
        for text in cfg.teachers:
            spec, weight = parse_teacher(text)
            row = stored_teacher(store, spec)
            answers = store.answers(row["id"], shas)
            if not answers:
                raise DistillError(f"no answers from teacher {spec} in {db} for the images under {cfg.images}: "
                                   f"run `distill harvest --images {cfg.images} --teacher {spec}` first")
            result.append((spec, weight, row["score_kind"], answers))
        return result
    finally:
        store.close()


def make_targets(cfg: TrainConfig, answers, label_map: LabelMap | None = None,
                 ) -> tuple[list[str], np.ndarray, list[str], LabelMap | None]:
    """(shas, soft targets (N, C), target columns, the user's label map as used) from the answers.

    ``label_map``: a map already in hand (prune passes the student's own), used instead of the
    file ``cfg.label_map``; either is cut to ``cfg.max_classes``.
    """
    if label_map is None and cfg.label_map and cfg.label_map != FOLDERS:
        label_map = load_label_map(cfg.label_map)
    user_map = None if label_map is None else LabelMap(label_map.classes[:cfg.max_classes],
                                                       label_map.sources[:cfg.max_classes])
    label_map = user_map or LabelMap.identity(default_classes([a for *_, a in answers], cfg.max_classes))
    columns = with_other(label_map.classes, cfg.other)
    if len(columns) < 2:
        raise DistillError(f"targets have {len(columns)} class ({', '.join(columns) or 'none'}); "
                           "training needs at least 2: check --label-map, --max-classes or --other")
    parts = []
    for spec, weight, kind, teacher_answers in answers:
        shas, targets = build_targets(teacher_answers, kind, label_map, cfg.other)
        log.info("teacher %s: %d of %d answers map to the classes", spec, len(shas), len(teacher_answers))
        if shas:
            parts.append((shas, targets, weight))
    if not parts:
        where = (f"the label map {cfg.label_map}" if cfg.label_map else
                 "the label map" if user_map is not None else "the class list")
        raise DistillError(f"no teacher answer maps to any class of {where}: "
                           "check its teacher labels (`distill cache labels`) or pass --other")
    shas, soft = ensemble(parts)
    return shas, soft, columns, user_map


def _folder_map(cfg: TrainConfig, answers, folders: dict[str, str | None]) -> LabelMap:
    """``--label-map folders``: the map ``distill labels suggest`` drafts, from the first teacher."""
    if not any(folders.values()):
        raise DistillError(f"--label-map folders needs class subfolders under {cfg.images}; there are none")
    return folder_label_map(suggest_label_map(answers[0][3], folders))


def _warn_if_folders_match_nothing(cfg: TrainConfig, folders: dict[str, str | None], columns: list[str]) -> None:
    """Class folders, no label map, and not one folder name is a teacher label: say what to do."""
    names = sorted({f for f in folders.values() if f is not None})
    if names and not (folder_classes(names, columns) >= 0).any():
        log.warning("the class folders (%s) match none of the teacher's %d labels, so the student learns the "
                    "teacher's labels: `distill labels suggest --images %s` drafts a label map, or pass "
                    "--label-map folders to train on the folder classes", ", ".join(names[:5]) +
                    (", ..." if len(names) > 5 else ""), len(columns), cfg.images)


def split_val(shas: list[str], fraction: float) -> np.ndarray:
    """(N,) bool: validation when int(sha[:8], 16) % 1000 < fraction * 1000 (stable across runs).

    A tiny set whose hashes all fall on one side lends its lowest (or highest) hash to the
    other side, so both are non-empty whenever there are two images.
    """
    key = np.array([int(s[:8], 16) % 1000 for s in shas], dtype=np.int64)
    is_val = key < fraction * 1000
    if len(shas) >= 2 and not is_val.any():
        is_val[int(key.argmin())] = True
    if len(shas) >= 2 and is_val.all():
        is_val[int(key.argmax())] = False
    return is_val


def prepare_data(cfg: TrainConfig, progress: Progress | None, label_map: LabelMap | None = None) -> TrainData:
    """Scan, match to answers, build targets and hard labels, split; every failure is a DistillError.

    ``label_map``: as :func:`make_targets`, a map in hand instead of the file ``cfg.label_map``.
    """
    found, skipped = scan_images(cfg.images, progress)
    return match_answers(cfg, found, skipped, label_map)


def match_answers(cfg: TrainConfig, found: dict[str, tuple[str, str | None]], skipped: int = 0,
                  label_map: LabelMap | None = None) -> TrainData:
    """:func:`prepare_data` after the scan: ``found`` is sha256 -> (path, folder label). All of
    it reads the store and works on arrays: seconds at 100,000 images (benchmarks/harvest_bench.py)."""
    answers = read_answers(cfg, sorted(found))
    answered = set().union(*(a for *_, a in answers))
    folders = {sha: label for sha, (_, label) in found.items()}
    if label_map is None and cfg.label_map == FOLDERS:
        label_map = _folder_map(cfg, answers, folders)
    shas, soft, columns, user_map = make_targets(cfg, answers, label_map)
    if user_map is None:
        _warn_if_folders_match_nothing(cfg, folders, columns)
    order = np.argsort(np.array(shas))
    shas, soft = [shas[i] for i in order], soft[order]
    if len(shas) < 2:
        raise DistillError(f"only {len(shas)} image has a usable teacher answer; training needs at least 2")
    folder = [found[s][1] for s in shas]
    # folder_classes is the one folder -> class match (exact, then case-insensitive) that
    # hard_labels uses too, so "labelled" counts exactly the images whose folder gave the label.
    labelled = int((folder_classes(folder, columns) >= 0).sum())
    counts = {"skipped": skipped, "unanswered": len(found) - len(answered),
              "unmapped": len(answered) - len(shas), "labelled": labelled}
    usable = set(shas)
    unlabeled = [(s, found[s][0]) for s in sorted(found) if s not in usable]
    return TrainData(shas, [found[s][0] for s in shas], soft, hard_labels(soft, columns, folder),
                     teacher_argmax(soft), split_val(shas, cfg.val_fraction), columns, user_map, counts,
                     unlabeled)
