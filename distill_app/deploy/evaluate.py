"""Measure a trained student: against folder labels, against its teacher, and how small and fast it is.

:func:`evaluate` returns one JSON-serialisable dict; :func:`write_report` turns it into a
Markdown report with PNG plots. Nothing here trains, harvests or calls a paid API: teacher
comparisons read the answers already stored in the database.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import students.pruned  # noqa: F401  (registers mobilenetv2_pruned: pruned runs evaluate too)
from cache import default_db_path, open_store
from students import count_macs, count_params

from ..training.checkpoint import load_student
from ..errors import DistillError
from ..data.images import scan_images
from ..data.pixels import load_pixels
from ..data.targets import OTHER, LabelMap, build_targets, load_label_map
from ..teachers.spec import first_teacher, parse_teacher

ECE_BINS = 15
METRICS_FILE = "metrics.jsonl"  # the run's per-epoch metrics, written by train and prune


@dataclass
class LatencyOptions:
    """How CPU latency is measured: ``warmup`` untimed runs, then the median of ``runs``."""

    batch: int = 32  # the batched measurement (the batch-1 one is always made)
    runs: int = 10
    warmup: int = 3


@dataclass
class EvalImages:
    """The distinct images found under the images folder, in scan order."""

    shas: list[str]
    paths: list[str]
    labels: list[str | None]  # folder labels (None: file not in a class folder)
    skipped: dict[str, int]  # reason -> count of files that could not be used
    duplicates: int  # files whose bytes equal an earlier file's (evaluated once)


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
    model, meta = load_student(student_dir)
    classes = list(meta["classes"])
    size = int(meta["student"]["image_size"])
    images = collect_images(images_dir)

    pixels = load_pixels(images.shas, images.paths, size)
    probs = predict_probs(model, pixels, meta["student"]["mean"], meta["student"]["std"], batch_size)
    predicted = probs.argmax(axis=1)
    truth = truth_indices(images.labels, classes)

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


def collect_images(images_dir: str | os.PathLike) -> EvalImages:
    """Scan and check the images; a file with the bytes of an earlier one is counted once."""
    if not Path(images_dir).is_dir():
        raise DistillError(f"no images folder at {images_dir}: pass --images DIR")
    found = scan_images(images_dir)
    distinct = found.distinct()
    if not distinct:
        raise DistillError(f"no usable images under {images_dir} ({sum(found.skipped.values())} skipped)")
    return EvalImages([i.sha256 for i in distinct], [i.path for i in distinct], [i.label for i in distinct],
                      dict(found.skipped), found.duplicates)


def predict_probs(model: torch.nn.Module, pixels: np.ndarray, mean, std, batch_size: int) -> np.ndarray:
    """Softmax probabilities, (N, C) float32, for ``pixels`` (N, S, S, 3) uint8."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(np.array(pixels[i:i + batch_size]))  # copy: the memmap is read-only
            x = (batch.permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t
            out.append(torch.softmax(model(x).float(), dim=1).numpy())
    return np.concatenate(out).astype(np.float32)


def truth_indices(labels: list[str | None], classes: list[str]) -> np.ndarray:
    """(N,) int64: the class index of each folder label, -1 where it is not a student class.

    A folder name matches a class exactly, else case-insensitively (as targets.hard_labels
    does in training, so ``Cat/`` is the class ``cat`` in both).
    """
    exact = {c: i for i, c in reversed(list(enumerate(classes)))}
    folded = {c.casefold(): i for i, c in reversed(list(enumerate(classes)))}
    return np.array(
        [-1 if lab is None else exact.get(lab, folded.get(lab.casefold(), -1)) for lab in labels],
        dtype=np.int64,
    )


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
    images: EvalImages,
    truth: np.ndarray,
    meta: dict,
    db_path: str | os.PathLike | None,
    teacher_spec: str | None,
) -> dict:
    """Fidelity to the teacher's stored answers; null fields (and a ``note``) when there are none."""
    spec = parse_teacher(teacher_spec)[0] if teacher_spec else first_teacher(meta.get("teachers"))
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
    answers: dict, score_kind: str, meta: dict, shas: list[str]
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


def _classes_or_map(meta: dict) -> LabelMap | list[str]:
    """The label map the student was trained with (stored contents, else its file), or its classes."""
    stored = meta.get("label_map")
    if stored:
        return LabelMap.from_dict(stored, origin="label map stored in model.pt")
    path = (meta.get("config") or {}).get("label_map")
    if path and Path(path).is_file():
        return load_label_map(path)
    return list(meta["classes"])


def _trained_with_other(meta: dict) -> bool:
    """Whether the student has the ``other`` column (``--other``); older files only show it in classes."""
    config = meta.get("config") or {}
    if "other" in config:
        return bool(config["other"])
    return OTHER in meta["classes"]


# -- size and speed -------------------------------------------------------------------------------


def model_facts(model: torch.nn.Module, meta: dict, student_dir: str | os.PathLike) -> dict:
    """Parameters, multiply-accumulates per image at the student's input size, file size."""
    s = meta["student"]
    path = Path(student_dir)
    if path.is_dir():
        path = path / "model.pt"
    return {
        "name": s["name"], "width": s["width"], "image_size": s["image_size"],
        "num_classes": s["num_classes"],
        "parameters": int(count_params(model)),
        "macs": int(count_macs(model, s["image_size"])),
        "file_bytes": path.stat().st_size,
    }


def measure_ms(model: torch.nn.Module, input_shape: tuple[int, ...], options: LatencyOptions) -> float:
    """Median wall time in ms of one forward pass on a random input of ``input_shape`` (CPU)."""
    x = torch.randn(*input_shape)
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(options.warmup):
            model(x)
        for _ in range(options.runs):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def student_latency(model: torch.nn.Module, image_size: int, options: LatencyOptions) -> dict:
    """CPU latency at batch 1 (ms per image) and at ``options.batch`` (ms per batch)."""
    batch1 = measure_ms(model, (1, 3, image_size, image_size), options)
    batched = measure_ms(model, (options.batch, 3, image_size, image_size), options)
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "runs": options.runs,
        "ms_per_image_batch1": _round(batch1, 3),
        "batch": options.batch,
        "ms_per_batch": _round(batched, 3),
        "ms_per_image_batched": _round(batched / options.batch, 3),
        "teacher": None,
    }


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
        ms = measure_ms(module, (1, *input_size), options)
        batched = measure_ms(module, (options.batch, *input_size), options)
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


# -- report ---------------------------------------------------------------------------------------


def write_report(result: dict, report_dir: str | os.PathLike) -> list[str]:
    """Write ``report.md``, ``result.json``, ``confusion_matrix.png``, ``reliability.png`` and,
    when the student's run folder has a ``metrics.jsonl``, ``curves.png`` (training curves).

    Returns the paths written (the folder is created if needed).
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_confusion(result, out / "confusion_matrix.png"),
        _plot_reliability(result, out / "reliability.png"),
    ]
    history = training_history(result["student"])
    if history:
        written.append(_plot_curves(history, out / "curves.png"))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(result, curves=bool(history)))
    return [str(out / "report.md"), str(out / "result.json"), *map(str, written)]


def training_history(student: str | os.PathLike) -> list[dict]:
    """The per-epoch metrics of the run the student came from ([] when there are none)."""
    run = Path(student)
    path = (run if run.is_dir() else run.parent) / METRICS_FILE
    if not path.is_file():
        return []
    history = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        if isinstance(row, dict) and "epoch" in row:
            history.append(row)
    return history


def render_markdown(result: dict, curves: bool = False) -> str:
    """The report text; images are referenced by their file names next to it."""
    lines = [f"# Evaluation of `{result['student']}`", "",
             f"Images: `{result['images_dir']}`.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in headline_rows(result)]
    lines += ["", "## Per class", "", "| class | images | correct | accuracy |", "|---|---:|---:|---:|"]
    for row in result["per_class"]:
        lines.append(f"| {_md(row['class'])} | {row['n']} | {row['correct']} | {_pct(row['accuracy'])} |")
    teacher = result["teacher"]
    if teacher.get("note"):
        lines += ["", f"Teacher comparison: {teacher['note']}."]
    side = side_by_side_rows(result)
    if side:
        lines += ["", "## Student and teacher", "", "| | student | teacher |", "|---|---:|---:|"]
        lines += [f"| {name} | {s} | {t} |" for name, s, t in side]
    lines += ["", "## Confusion matrix", "", "Rows: folder label; columns: student's prediction.", "",
              "![confusion matrix](confusion_matrix.png)", "", "## Calibration", "",
              f"Reliability diagram ({result['calibration']['bins']} equal-width bins of top-1 confidence).",
              "", "![reliability diagram](reliability.png)", ""]
    if curves:
        lines += ["## Training", "", "Per epoch, from the run's metrics.jsonl.", "",
                  "![training curves](curves.png)", ""]
    return "\n".join(lines)


def side_by_side_rows(result: dict) -> list[tuple[str, str, str]]:
    """(what, student, teacher) rows when the teacher was measured or has stored answers."""
    teacher, model, lat = result["teacher"], result["model"], result["latency"] or {}
    timed = lat.get("teacher") or {}
    if teacher["accuracy"] is None and timed.get("ms_per_image_batch1") is None:
        return []
    rows = [("top-1 accuracy (images with a teacher answer)",
             _pct(teacher.get("student_accuracy")), _pct(teacher["accuracy"]))]
    if timed.get("ms_per_image_batch1") is not None:
        size = timed["input_size"][-1]
        rows += [("parameters", f"{model['parameters']:,}", f"{timed['parameters']:,}"),
                 ("MACs per image", f"{model['macs'] / 1e6:,.1f} M at {model['image_size']} px",
                  f"{timed['macs'] / 1e6:,.1f} M at {size} px"),
                 (f"CPU latency, batch 1 ({lat['threads']} threads)", f"{lat['ms_per_image_batch1']} ms",
                  f"{timed['ms_per_image_batch1']} ms"),
                 (f"CPU latency, batch {lat['batch']}", f"{lat['ms_per_batch']} ms", f"{timed['ms_per_batch']} ms"),
                 ("speed-up at batch 1", f"{timed['speedup']}x", "1x")]
    return rows


def headline_rows(result: dict) -> list[tuple[str, str]]:
    images, teacher, model, lat = result["images"], result["teacher"], result["model"], result["latency"]
    rows = [
        ("images evaluated", f"{images['evaluated']} ({images['labelled']} with a class label, "
                             f"{images['skipped']} files skipped)"),
        ("top-1 accuracy", _pct(result["accuracy"])),
        ("expected calibration error", _num(result["calibration"]["ece"])),
        ("teacher", f"`{teacher['spec']}`" if teacher["spec"] else "none"),
        ("images with a teacher answer", str(teacher["answered"])),
        ("agreement with teacher top-1", _pct(teacher["agreement"])),
        ("MSE to teacher probabilities", _num(teacher["mse"])),
        ("KL(teacher ‖ student), nats", _num(teacher["kl"])),
        ("teacher top-1 accuracy (same images)", _pct(teacher["accuracy"])),
        ("parameters", f"{model['parameters']:,}"),
        ("MACs per image", f"{model['macs'] / 1e6:,.1f} M at {model['image_size']} px"),
        ("file size", f"{model['file_bytes'] / 1e6:.2f} MB"),
    ]
    if lat:
        rows += [
            (f"CPU latency, batch 1 ({lat['threads']} threads)", f"{lat['ms_per_image_batch1']} ms"),
            (f"CPU latency, batch {lat['batch']}", f"{lat['ms_per_batch']} ms per batch "
                                                   f"({lat['ms_per_image_batched']} ms per image)"),
        ]
        t = lat.get("teacher")
        if t and t.get("ms_per_image_batch1") is not None:
            rows += [("teacher CPU latency, batch 1", f"{t['ms_per_image_batch1']} ms"),
                     ("speed-up over teacher", f"{t['speedup']}x")]
        elif t:
            rows.append(("teacher CPU latency", t["note"]))
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def _plot_confusion(result: dict, path: Path) -> Path:
    plt = _pyplot()
    matrix = np.array(result["confusion_matrix"], dtype=np.int64)
    classes = result["classes"]
    n = len(classes)
    side = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if n <= 50:  # beyond that the names are unreadable; the table in report.md has them
        ax.set_xticks(range(n), [str(c)[:24] for c in classes], rotation=90, fontsize=8)
        ax.set_yticks(range(n), [str(c)[:24] for c in classes], fontsize=8)
    if n <= 20:
        peak = matrix.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("folder label")
    ax.set_title(f"Confusion matrix (accuracy {_pct(result['accuracy'])})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_reliability(result: dict, path: Path) -> Path:
    plt = _pyplot()
    bins = result["calibration"]["reliability"]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 1.0
    fig, ax = plt.subplots(figsize=(5, 5))
    filled = [b for b in bins if b["n"]]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.scatter([b["confidence"] for b in filled], [b["accuracy"] for b in filled], color="red", s=12,
               zorder=3, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {_num(result['calibration']['ece'])})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_curves(history: list[dict], path: Path) -> Path:
    """Loss (train, validation) and validation accuracy/agreement per epoch; keys a run lacks
    are left out, so older or partial metrics files still plot."""
    plt = _pyplot()
    epochs = [m["epoch"] for m in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, series in ((loss_ax, (("train_loss", "train"), ("val_loss", "validation"))),
                       (acc_ax, (("val_accuracy", "accuracy (hard labels)"),
                                 ("val_agreement", "agreement with teacher")))):
        for key, label in series:
            points = [(e, m[key]) for e, m in zip(epochs, history) if isinstance(m.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    loss_ax.set(ylabel="loss", title="Loss")
    acc_ax.set(ylabel="fraction", title="Validation", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
