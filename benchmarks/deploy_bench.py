"""A student ready to deploy: fp32 vs int8 vs pruned, and the teacher, on one CPU.

From a trained run folder this builds, in a scratch folder (never inside the run):

- ONNX fp32 (checked against PyTorch), ONNX int8 (onnxruntime static QDQ, calibrated on
  --calib images of the training folder), TorchScript int8 (torch.ao FX, x86);
- a pruned student (`distill prune`: --amount of the hidden channels, fine-tuned --prune-epochs
  on the teacher's stored answers) and its ONNX fp32 / int8 exports;

then measures on --val (class folders = truth): top-1 accuracy, agreement with the teacher's
stored top-1, agreement with the fp32 student, CPU latency at batch 1 and 32 with --threads
threads (every model timed once per round, in turn: a shared machine's noise hits all alike,
so the ratios hold), file size; and the local teacher's latency at batch 1 (its input size), in
PyTorch and exported to ONNX the same way, so each runtime is compared with itself.

Goals (issue #6): int8 >= 2x faster than fp32 at batch 1 with <= 1 point accuracy loss; the
student >= 5x faster than the local teacher at batch 1. Prints a Markdown table, then one JSON line.

    python benchmarks/deploy_bench.py --run /work/bench/runs/mnv2-a05-128 --db /work/bench/imagenette.db
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cache import open_store
from distill_app.training.checkpoint import open_student
from distill_app.deploy.evaluate import teacher_targets
from distill_app.teachers.spec import first_teacher
from distill_app.deploy.export import (deployment_metadata, folder_images, load_torchscript, predict_all,
                                       quantize_onnx, quantize_torch, save_torchscript, write_fp32)
from distill_app.deploy.measure import Candidate, interleaved_latency, onnx_candidate, torch_candidate, torch_threads
from distill_app.deploy.prune import PruneConfig, prune_student

DATA = "/work/shared/data/imagenette-dev"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="/work/bench/runs/mnv2-a05-128", help="trained student run folder")
    ap.add_argument("--db", default="/work/bench/imagenette.db", help="store with the teacher's answers")
    ap.add_argument("--val", default=f"{DATA}/val", help="evaluation images (class folders)")
    ap.add_argument("--train", default=f"{DATA}/train", help="training images: calibration and fine-tuning")
    ap.add_argument("--calib", type=int, default=128, help="calibration images")
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--prune-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for every latency figure")
    ap.add_argument("--runs", type=int, default=20, help="timed rounds per batch size (median)")
    ap.add_argument("--teacher", default="local:efficientnet_lite0", help="local teacher to time ('' to skip)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, meta = open_student(args.run)
    val = folder_images(args.val, meta)
    log(f"{len(val.x)} evaluation images from {args.val}; scratch folder {work}")

    with torch_threads(args.threads):
        students, teacher, pruning = build_candidates(args, model, meta, work)
        rows = measure(students, teacher, val, meta, args)
    result = {"run": args.run, "val": args.val, "images": len(val.x), "threads": args.threads,
              "runs": args.runs, "cpu": cpu_name(), "torch": torch.__version__, "rows": rows,
              "pruning": pruning, "ratios": ratios(rows), "seconds": round(time.perf_counter() - started, 1)}
    print(markdown(result))
    print(json.dumps(result))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_candidates(args, model, meta, work: Path) -> tuple[list[Candidate], Candidate | None, dict]:
    """The student in every form (fp32/int8, PyTorch/ONNX/TorchScript, pruned), and the teacher."""
    size, threads = meta.image_size, args.threads
    calib = folder_images(args.train, meta, args.calib)
    log(f"calibration: {calib.source}")
    onnx_fp32 = write_fp32("onnx", model, work / "model.onnx", size, deployment_metadata(meta), threads)
    quantize_onnx(work / "model.onnx", work / "model.int8.onnx", calib.x, deployment_metadata(meta))
    ts_int8 = work / "model.int8.torchscript.pt"
    save_torchscript(quantize_torch(model, calib.x, size), ts_int8, deployment_metadata(meta))
    fp32_bytes = (Path(args.run) / "model.pt").stat().st_size
    students = [torch_candidate("fp32 PyTorch", model, size, fp32_bytes),
                rename(onnx_fp32, "fp32 ONNX"),
                onnx_candidate("int8 ONNX", work / "model.int8.onnx", size, threads),
                torch_candidate("int8 TorchScript", load_torchscript(ts_int8)[0], size, ts_int8.stat().st_size)]

    log(f"pruning {args.amount:.0%} of the hidden channels, fine-tuning {args.prune_epochs} epochs ...")
    summary = prune_student(PruneConfig(student=args.run, amount=args.amount, epochs=args.prune_epochs,
                                        images=args.train, db=args.db, out=str(work / "pruned"), device="cpu"))
    pruned, pmeta = open_student(work / "pruned")
    write_fp32("onnx", pruned, work / "pruned.onnx", size, deployment_metadata(pmeta), threads)
    quantize_onnx(work / "pruned.onnx", work / "pruned.int8.onnx", calib.x, deployment_metadata(pmeta))
    students += [torch_candidate(f"pruned {args.amount:.0%} PyTorch", pruned, size, summary["file_bytes"]),
                 onnx_candidate(f"pruned {args.amount:.0%} ONNX", work / "pruned.onnx", size, threads),
                 onnx_candidate(f"pruned {args.amount:.0%} int8 ONNX", work / "pruned.int8.onnx", size, threads)]
    pruning = {k: summary[k] for k in ("amount", "epochs_per_step", "before", "after", "images")}
    return students, teacher_candidates(args.teacher, work, threads), pruning


def rename(candidate: Candidate, name: str) -> Candidate:
    candidate.name = name
    return candidate


def teacher_candidates(spec: str, work: Path, threads: int) -> list[Candidate]:
    """The local teacher in PyTorch and in ONNX (same exporter settings as the student)."""
    if not spec:
        return []
    from distill_app.teachers import TeacherOptions, create_teacher

    teacher = create_teacher(spec, TeacherOptions(device="cpu", batch_size=1))
    module, size = teacher.model.eval(), int(teacher.data_config["input_size"][-1])
    path = work / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return [torch_candidate("teacher PyTorch", module, size), onnx_candidate("teacher ONNX", path, size, threads)]


def measure(students: list[Candidate], teachers: list[Candidate], val, meta, args) -> list[dict]:
    """Accuracy and agreements on ``val``, then interleaved latency of everything."""
    teacher_top1, rows_with_answer, teacher_acc = stored_teacher_top1(args.db, meta, val)
    reference = None
    rows = []
    for c in students:
        log(f"predicting {len(val.x)} images with {c.name}")
        pred = predict_all(c, val.x).argmax(axis=1)
        reference = pred if reference is None else reference
        labelled = val.truth >= 0
        rows.append({"model": c.name, "accuracy": round(float((pred[labelled] == val.truth[labelled]).mean()), 4),
                     "agreement_teacher": round(float((pred[rows_with_answer] == teacher_top1).mean()), 4),
                     "agreement_fp32": round(float((pred == reference).mean()), 4),
                     "file_bytes": c.file_bytes})
    log(f"timing at batch 1 and 32, {args.runs} interleaved rounds, {args.threads} thread(s) ...")
    ms = interleaved_latency(students, batches=(1, 32), runs=args.runs)
    if teachers:  # batch 1 only, with the students' batch-1 timings interleaved again
        again = students[:3]
        ms_t = interleaved_latency(teachers + again, batches=(1,), runs=args.runs)
        for t in teachers:
            rows.append({"model": t.name, "accuracy": teacher_acc, "agreement_teacher": 1.0,
                         "agreement_fp32": None, "file_bytes": t.file_bytes, "ms_batch1": ms_t[t.name]["ms_batch1"],
                         "ms_batch32": None, "image_size": t.image_size,
                         "same_round": {c.name: ms_t[c.name]["ms_batch1"] for c in again}})
    for row, c in zip(rows, students):
        row.update(ms_batch1=ms[c.name]["ms_batch1"], ms_batch32=ms[c.name]["ms_batch32"], image_size=c.image_size)
    return rows


def stored_teacher_top1(db: str, meta, val) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(teacher top-1 per answered image, their rows in ``val``, the teacher's accuracy there)."""
    spec = first_teacher(meta.teachers)
    store = open_store(db)
    try:
        row = store.find_teacher(spec)
        answers = store.answers(row["id"], val.shas)
        kind = row["score_kind"]
    finally:
        store.close()
    targets, rows = teacher_targets(answers, kind, meta, val.shas)
    top1 = targets.argmax(axis=1)
    truth = val.truth[rows]
    acc = float((top1[truth >= 0] == truth[truth >= 0]).mean()) if (truth >= 0).any() else None
    return top1, rows, None if acc is None else round(acc, 4)


def ratios(rows: list[dict]) -> dict:
    by = {r["model"]: r for r in rows}
    fp32, onnx, int8 = by["fp32 PyTorch"], by["fp32 ONNX"], by["int8 ONNX"]
    out = {"int8_onnx_vs_fp32_pytorch_batch1": round(fp32["ms_batch1"] / int8["ms_batch1"], 2),
           "int8_onnx_vs_fp32_onnx_batch1": round(onnx["ms_batch1"] / int8["ms_batch1"], 2),
           "int8_onnx_vs_fp32_onnx_batch32": round(onnx["ms_batch32"] / int8["ms_batch32"], 2),
           "int8_torchscript_vs_fp32_pytorch_batch1":
               round(fp32["ms_batch1"] / by["int8 TorchScript"]["ms_batch1"], 2),
           "int8_accuracy_change_points": round(100 * (int8["accuracy"] - fp32["accuracy"]), 2)}
    if "teacher PyTorch" in by:
        tp, to = by["teacher PyTorch"], by["teacher ONNX"]
        same = tp["same_round"]
        out["teacher_pytorch_vs_fp32_pytorch_batch1"] = round(tp["ms_batch1"] / same["fp32 PyTorch"], 2)
        out["teacher_onnx_vs_fp32_onnx_batch1"] = round(to["ms_batch1"] / same["fp32 ONNX"], 2)
        out["teacher_onnx_vs_int8_onnx_batch1"] = round(to["ms_batch1"] / same["int8 ONNX"], 2)
        out["teacher_pytorch_vs_int8_onnx_batch1"] = round(tp["ms_batch1"] / same["int8 ONNX"], 2)
    return out


def markdown(r: dict) -> str:
    lines = [f"Student `{r['run']}` on `{r['val']}` ({r['images']} images); CPU {r['cpu']}, "
             f"{r['threads']} thread(s), median of {r['runs']} interleaved rounds; torch {r['torch']}.", "",
             "| model | top-1 accuracy | agreement with teacher | agreement with fp32 | batch 1 (ms) "
             "| batch 32 (ms) | file size |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        size = f"{row['file_bytes'] / 1e6:.2f} MB" if row["file_bytes"] else "-"
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        fp32 = "-" if row["agreement_fp32"] is None else f"{100 * row['agreement_fp32']:.1f}%"
        b32 = "-" if row["ms_batch32"] is None else f"{row['ms_batch32']:.1f}"
        name = row["model"] + (f" ({row['image_size']} px)" if row["model"].startswith("teacher") else "")
        if "same_round" in row:  # the students' batch-1 times measured in the teacher's rounds
            name += " *"
        lines.append(f"| {name} | {acc} | {100 * row['agreement_teacher']:.1f}% | {fp32} "
                     f"| {row['ms_batch1']:.2f} | {b32} | {size} |")
    p = r["pruning"]
    lines += ["", f"Pruned: {p['before']['parameters']:,} -> {p['after']['parameters']:,} parameters, "
              f"{p['before']['macs'] / 1e6:.1f} -> {p['after']['macs'] / 1e6:.1f} M MACs, fine-tuned "
              f"{p['epochs_per_step']} epochs on {p['images']['train']} images.", "",
              "\\* timed at batch 1 in its own interleaved rounds with the first three students "
              "(ratios to the teacher use those rounds).", "",
              "Ratios: " + ", ".join(f"{k} {v}" for k, v in r["ratios"].items())]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
