"""The evaluation report and every plot: ``report.md`` with its tables, the confusion matrix,
the reliability diagram, and the training curves (which the trainer also draws into its run folder).

Plots go to files through matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..training.checkpoint import METRICS_FILE

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
        written.append(plot_curves(history, out / "curves.png"))
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
    lines += separable_section(result["model"])
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


def separable_section(model: dict) -> list[str]:
    """The depthwise-separable blocks, measured, against standard convolutions in their place
    (Howard et al. 2017: cost ratio 1/N + 1/D_K²); [] for a model without them or an older result."""
    blocks, total = model.get("separable"), model.get("separable_total")
    if not blocks or not total:
        return []
    lines = ["", "## Depthwise-separable convolutions", "",
             (f"Each depthwise D_K×D_K conv and the 1x1 conv after it, measured at {model['image_size']} px, "
              "against one standard D_K×D_K conv M → N at the same stride."), "",
             "| block | M → N | D_K | output | separable MACs | standard MACs | ratio | 1/N + 1/D_K² |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in blocks:
        h, w = b["out_hw"]
        lines.append(f"| {_md(b['block'])} | {b['in']} → {b['out']} | {b['kernel']} | {h}×{w} | "
                     f"{b['separable_macs'] / 1e6:,.2f} M | {b['standard_macs'] / 1e6:,.2f} M | "
                     f"{b['ratio']:.4f} | {b['formula']:.4f} |")
    lines += ["", (f"The {total['blocks']} blocks: {total['separable_macs'] / 1e6:,.1f} M MACs, "
                   f"{total['standard_macs'] / 1e6:,.1f} M with standard convs (ratio {total['ratio']:.4f}). "
                   f"Whole model: {total['model_macs'] / 1e6:,.1f} M MACs, "
                   f"{total['model_macs_standard'] / 1e6:,.1f} M with standard convs "
                   f"({total['model_ratio']:.4f} of it).")]
    return lines


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


def plot_curves(history: list[dict], path: Path) -> Path:
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
