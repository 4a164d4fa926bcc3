"""Measure a trained student: against folder labels, against its teacher, and how small and fast it is.

:func:`evaluate` returns one JSON-serialisable dict; :func:`report.write_report` turns it into a
Markdown report with PNG plots. Nothing here trains, harvests or calls a paid API: teacher
comparisons read the answers already stored in the database.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cache import default_db_path, open_store
from students import StudentConfig, count_macs, count_params, separable_costs

from ..training.checkpoint import MODEL_FILE, StudentFile, open_student
from .measure import LatencyOptions, latency_ms, student_latency
from ..errors import DistillError
from ..data.images import ImageList, list_images
from ..data.pixels import load_pixels, to_input
from ..data.targets import OTHER, LabelMap, build_targets, folder_classes, load_label_map
from ..teachers.spec import first_teacher, parse_teacher

ECE_BINS = 15


# -- the whole evaluation -------------------------------------------------------------------------


def evaluate(
    student_dir: str | os.PathLike,
    images_dir: str | os.PathLike,
    db_path: str | os.PathLike | None = None,
    teacher_spec: str | None = None,
    batch_size: int = 64,
    latency: bool | LatencyOptions = True,
) -> dict:
    """Evaluate the student in ``student_dir`` (run folder or ``model.pt``) on ``images_dir``.

    ``db_path``: the soft-label store holding the teacher's answers (None: ``$DISTILL_DB`` or
    ./distill.db when that file exists); without it the teacher fields are null.
    ``teacher_spec``: the teacher to compare with (default: the first one the student was
    trained on); for a local teacher its own CPU latency is measured too.
    ``latency``: False skips timing; a :class:`LatencyOptions` tunes it.
    """
    if batch_size < 1:
        raise DistillError(f"batch size must be at least 1, got {batch_size}")
    options = latency if isinstance(latency, LatencyOptions) else LatencyOptions()
    if options.batch < 1 or options.runs < 1 or options.warmup < 0:
        raise DistillError(f"latency needs batch >= 1, runs >= 1, warmup >= 0, got {options}")
    model, meta = open_student(student_dir)
    classes = list(meta.classes)
    size = meta.image_size
    images = list_images(images_dir)

    pixels = load_pixels(images.shas, images.paths, size)
    probs = predict_probs(model, pixels, meta.student, batch_size)
    predicted = probs.argmax(axis=1)
    truth = folder_classes(images.labels, classes)

    result = {
        "student": str(student_dir),
        "images_dir": str(images_dir),
        "classes": classes,
        "images": {
            "evaluated": len(images.shas),
            "labelled": int((truth >= 0).sum()),
            "unknown_labels": _unknown_labels(images.labels, truth),
            "unlabelled": sum(1 for lab in images.labels if lab is None),
            "duplicates": images.duplicates,
            "skipped": sum(images.skipped.values()),
            "skipped_by_reason": images.skipped,
        },
        **accuracy_metrics(predicted, truth, classes),
        "calibration": calibration(probs, truth),
        "teacher": teacher_metrics(probs, images, truth, meta, db_path, teacher_spec),
        "model": model_facts(model, meta, student_dir),
        "latency": None,
    }
    if latency:
        result["latency"] = student_latency(model, size, options)
        if teacher_spec:
            result["latency"]["teacher"] = teacher_latency(
                result["teacher"]["spec"], options, result["latency"]["ms_per_image_batch1"]
            )
    return result


def predict_probs(model: torch.nn.Module, pixels: np.ndarray, student: StudentConfig, batch_size: int) -> np.ndarray:
    """Softmax probabilities, (N, C) float32, for ``pixels`` (N, S, S, 3) uint8, normalised as
    ``student`` says."""
    out = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(np.array(pixels[i:i + batch_size]))  # copy: the memmap is read-only
            x = to_input(batch, student.mean, student.std)
            out.append(torch.softmax(model(x).float(), dim=1).numpy())
    return np.concatenate(out).astype(np.float32)


def _unknown_labels(labels: list[str | None], truth: np.ndarray) -> dict[str, int]:
    """Folder names that are no student class -> image count (those images have no ground truth)."""
    return dict(Counter(lab for lab, t in zip(labels, truth) if lab is not None and t < 0))


# -- against folder labels ------------------------------------------------------------------------


def accuracy_metrics(predicted: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict:
    """Top-1 accuracy, per-class table and confusion matrix (rows: true class, columns: predicted)."""
    mask = truth >= 0
    n_classes = len(classes)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (truth[mask], predicted[mask]), 1)
    per_class = []
    for i, name in enumerate(classes):
        n, correct = int(confusion[i].sum()), int(confusion[i, i])
        per_class.append({"class": name, "n": n, "correct": correct,
                          "accuracy": _round(correct / n, 4) if n else None})
    labelled = int(mask.sum())
    correct = int(np.trace(confusion))
    return {
        "accuracy": _round(correct / labelled, 4) if labelled else None,
        "correct": correct,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def calibration(probs: np.ndarray, truth: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Expected calibration error of the top-1 confidence, equal-width bins over [0, 1].

    ECE = sum over bins of (n_bin / N) * |accuracy_bin - mean confidence_bin|.
    """
    mask = truth >= 0
    confidence = probs[mask].max(axis=1) if mask.any() else np.zeros(0, dtype=np.float32)
    hit = (probs[mask].argmax(axis=1) == truth[mask]) if mask.any() else np.zeros(0, dtype=bool)
    # Bin i holds (i/n, (i+1)/n]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for i in range(n_bins):
        sel = which == i
        n = int(sel.sum())
        acc = float(hit[sel].mean()) if n else None
        conf = float(confidence[sel].mean()) if n else None
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        bins.append({"lower": _round(i / n_bins, 4), "upper": _round((i + 1) / n_bins, 4), "n": n,
                     "accuracy": _round(acc, 4), "confidence": _round(conf, 4)})
    return {"ece": _round(ece, 4) if len(confidence) else None, "bins": n_bins, "reliability": bins}


# -- against the teacher ------------------------------------------------------------------------


def teacher_metrics(
    probs: np.ndarray,
    images: ImageList,
    truth: np.ndarray,
    meta: StudentFile,
    db_path: str | os.PathLike | None,
    teacher_spec: str | None,
) -> dict:
    """Fidelity to the teacher's stored answers; null fields (and a ``note``) when there are none."""
    spec = parse_teacher(teacher_spec)[0] if teacher_spec else first_teacher(meta.teachers)
    # answered: images with a stored answer; compared: those whose answer maps to a student class.
    out = {"spec": spec, "score_kind": None, "answered": 0, "compared": 0, "agreement": None,
           "mse": None, "kl": None, "accuracy": None, "labelled": 0, "student_accuracy": None, "note": None}
    if spec is None:
        return {**out, "note": "the student records no teacher; pass --teacher"}
    path = Path(db_path) if db_path else Path(default_db_path())
    if not path.exists():  # opening would create an empty database: say so instead
        return {**out, "note": f"no database at {path}; pass --db to compare with the teacher"}
    store = open_store(str(path))
    try:
        row = store.find_teacher(spec)
        answers = store.answers(row["id"], images.shas) if row else {}
        known = [t["spec"] for t in store.teachers()]
    finally:
        store.close()
    if row is None:
        return {**out, "note": f"teacher {spec} was never harvested into {path} "
                               f"(teachers there: {', '.join(known) or 'none'})"}
    if not answers:
        return {**out, "note": f"no stored answers from {spec} for these images in {path}"}
    out.update(score_kind=row["score_kind"], answered=len(answers))
    targets, rows = teacher_targets(answers, row["score_kind"], meta, images.shas)
    if not len(rows):
        return {**out, "note": f"none of the {len(answers)} answers from {spec} maps to a student class"}
    if targets.shape[1] != probs.shape[1]:
        return {**out, "note": f"teacher targets have {targets.shape[1]} classes, "
                               f"the student {probs.shape[1]}: was it trained with another label map?"}
    return {**out, **fidelity(probs[rows], targets, truth[rows])}


def teacher_targets(
    answers: dict, score_kind: str, meta: StudentFile, shas: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(targets (M, C) float32, rows (M,) int64 indices into ``shas``) over the student's classes.

    The same mapping as training (targets.build_targets with the student's label map or
    class list), so agreement means what it meant when the student was fitted.
    """
    target_shas, targets = build_targets(
        answers, score_kind, _classes_or_map(meta), _trained_with_other(meta)
    )
    position = {sha: i for i, sha in enumerate(shas)}
    rows = np.array([position[s] for s in target_shas], dtype=np.int64)
    return np.asarray(targets, dtype=np.float32), rows


def fidelity(student: np.ndarray, teacher: np.ndarray, truth: np.ndarray) -> dict:
    """Agreement, MSE, KL(teacher || student), the teacher's own accuracy and the student's on
    the same images (``student_accuracy``: the side-by-side comparison).

    ``student``/``teacher``: (M, C) probabilities of the same images; ``truth``: (M,) class
    indices, -1 when unknown. MSE is the mean over all M x C entries (as ``F.mse_loss``);
    KL is in nats, averaged over images; teacher rows are renormalised in case they do not sum
    to 1, and student probabilities floored at 1e-8 (a zero would make KL infinite).
    """
    teacher_top = teacher.argmax(axis=1)
    agreement = float((student.argmax(axis=1) == teacher_top).mean())
    mse = float(((student - teacher) ** 2).mean())
    sums = teacher.sum(axis=1, keepdims=True)
    t = np.divide(teacher, sums, out=np.zeros_like(teacher), where=sums > 0)
    log_ratio = np.log(np.maximum(t, 1e-12)) - np.log(np.maximum(student, 1e-8))
    kl = float(np.where(t > 0, t * log_ratio, 0.0).sum(axis=1).mean())
    mask = truth >= 0
    labelled = int(mask.sum())
    teacher_acc = float((teacher_top[mask] == truth[mask]).mean()) if labelled else None
    student_acc = float((student.argmax(axis=1)[mask] == truth[mask]).mean()) if labelled else None
    return {"compared": int(len(student)), "agreement": _round(agreement, 4), "mse": _round(mse, 6),
            "kl": _round(kl, 6), "accuracy": _round(teacher_acc, 4), "labelled": labelled,
            "student_accuracy": _round(student_acc, 4)}


def _classes_or_map(meta: StudentFile) -> LabelMap | list[str]:
    """The label map the student was trained with (stored contents, else its file), or its classes."""
    if meta.label_map:
        return LabelMap.from_dict(meta.label_map, origin="label map stored in model.pt")
    path = meta.config.get("label_map")
    if path and Path(path).is_file():
        return load_label_map(path)
    return list(meta.classes)


def _trained_with_other(meta: StudentFile) -> bool:
    """Whether the student has the ``other`` column (``--other``); older files only show it in classes."""
    if "other" in meta.config:
        return bool(meta.config["other"])
    return OTHER in meta.classes


# -- size and speed -------------------------------------------------------------------------------


def model_facts(model: torch.nn.Module, meta: StudentFile, student_dir: str | os.PathLike) -> dict:
    """Parameters, multiply-accumulates per image at the student's input size, file size, and
    its depthwise-separable blocks (``separable``, ``separable_total``; None when it has none)."""
    s = meta.student
    path = Path(student_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    macs = int(count_macs(model, s.image_size))
    blocks = separable_costs(model, s.image_size)
    for block in blocks:
        block["out_hw"] = list(block["out_hw"])  # as JSON reads it back, so result.json round-trips
    return {
        "name": s.name, "width": s.width, "image_size": s.image_size, "num_classes": s.num_classes,
        "mean": list(s.mean), "std": list(s.std), "weights": (meta.weights or {}).get("source"),
        "parameters": int(count_params(model)),
        "macs": macs,
        "file_bytes": path.stat().st_size,
        "separable": blocks or None,
        "separable_total": separable_total(blocks, macs),
    }


def separable_total(blocks: list[dict], macs: int) -> dict | None:
    """The separable blocks' MACs summed, against standard convs in their place; and the whole
    model's MACs (``macs``) against the same model with every pair a standard conv."""
    if not blocks:
        return None
    separable = sum(b["separable_macs"] for b in blocks)
    standard = sum(b["standard_macs"] for b in blocks)
    with_standard = macs - separable + standard
    return {"blocks": len(blocks), "separable_macs": separable, "standard_macs": standard,
            "ratio": _round(separable / standard, 6), "model_macs": macs,
            "model_macs_standard": with_standard, "model_ratio": _round(macs / with_standard, 6)}


def teacher_latency(spec: str, options: LatencyOptions, student_ms: float) -> dict:
    """The local teacher's CPU latency at batch 1 and ``options.batch``, its parameters and
    MACs, and the student's speed-up over it at batch 1."""
    from ..teachers import TeacherOptions, create_teacher

    out = {"spec": spec, "ms_per_image_batch1": None, "ms_per_batch": None, "speedup": None, "note": None}
    try:
        teacher = create_teacher(spec, TeacherOptions(device="cpu", batch_size=1))
    except DistillError as e:
        return {**out, "note": f"teacher not loaded: {e}"}
    try:
        # Looked up on the class: reading the property itself would load the weights.
        if teacher.remote or not hasattr(type(teacher), "model"):
            return {**out, "note": "not a local model: its latency is the API's, not measured"}
        try:  # the weights load here, on first use
            module, input_size = teacher.model, tuple(teacher.data_config["input_size"])
        except DistillError as e:
            return {**out, "note": f"teacher not loaded: {e}"}
        ms, batched = latency_ms(module, input_size[-1], options)
        size = {"parameters": int(count_params(module)), "macs": int(count_macs(module, input_size[-1]))}
    finally:
        teacher.close()
    speedup = ms / student_ms if student_ms else None
    return {**out, "input_size": list(input_size), "ms_per_image_batch1": _round(ms, 3),
            "batch": options.batch, "ms_per_batch": _round(batched, 3), **size, "speedup": _round(speedup, 2)}


def _round(x: float | None, digits: int) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), digits)
