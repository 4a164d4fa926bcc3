"""The compression toolbox on the quality benchmark's student (issue 15): MobileNetV1 against
MobileNetV2, DSD against plain training, DisturbLabel on and off, and deep compression.

Data as in quality_bench.py (whose store and subsets it reuses, harvesting only what is missing):
the local EfficientNet-Lite0 served in the Hugging Face format answering its top 5, the ten-class
label map, --calls training photos, evaluated on the 1,000 val photos. Every student is x0.5 at
112 px from random init, trained --epochs epochs (the same for all: DSD splits them in thirds):

  v2        mobilenetv2 (the plain run, and the one deep compression starts from)
  v1        mobilenetv1, same alpha and rho
  v2-dsd    mobilenetv2 --dsd (50% sparsity in the middle third)
  v2-hard   mobilenetv2 --hard-weight 0.5
  v2-dl     mobilenetv2 --hard-weight 0.5 --disturb-label 0.1

then `distill compress` of v2 at each --settings entry SPARSITY:BITS:EPOCHS, every .dc file
evaluated on the val photos with `distill eval`'s code, and the latency of v1 and v2 at batch 1
and 32 in PyTorch and ONNX (interleaved, 2 threads).

    python benchmarks/compress_bench.py                    # ~1 h on 2 shared cores
    python benchmarks/compress_bench.py --runs v2 --settings 0.5:5:1

Prints Markdown tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_bench as qb  # noqa: E402  (its harvest and subsets)

from distill_app.deploy.compress import CompressConfig, compress_student  # noqa: E402
from distill_app.deploy.evaluate import evaluate  # noqa: E402
from distill_app.deploy.export import deployment_metadata, export_onnx  # noqa: E402
from distill_app.deploy.measure import interleaved_latency, onnx_candidate, torch_candidate  # noqa: E402
from distill_app.training.checkpoint import open_student  # noqa: E402
from distill_app.training.trainer import TrainConfig, train  # noqa: E402

BASE = {"width": 0.5, "image_size": 112, "pretrained": "off", "unlabeled": "off"}  # one training per run
RUNS = {
    "v2": {"student": "mobilenetv2"},
    "v1": {"student": "mobilenetv1"},
    "v2-dsd": {"student": "mobilenetv2", "dsd": True},
    "v2-hard": {"student": "mobilenetv2", "hard_weight": 0.5},
    "v2-dl": {"student": "mobilenetv2", "hard_weight": 0.5, "disturb_label": 0.1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=qb.DATA)
    ap.add_argument("--work", default="/tmp/distill-quality", help="the quality benchmark's folder (store, subsets)")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"of {', '.join(RUNS)}")
    ap.add_argument("--settings", default="0.5:5:1,0.5:5:0,0:5:0", help="compress SPARSITY:BITS:EPOCHS, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    db = str(work / "quality.db")
    qb.harvest_via_server(Path(args.data), db, 5, work)
    subset = qb.subset_folder(Path(args.data) / "train", work / f"train-{args.calls}", args.calls)
    val = str(Path(args.data) / "val")
    label_map = str(qb.HERE / "imagenette_labels.toml")

    rows, compressed = {}, []
    for name in args.runs.split(","):
        out = work / "compress-runs" / f"{name}-b{args.calls}-e{args.epochs}-s{args.seed}"
        cfg = TrainConfig(images=str(subset), db=db, teachers=[qb.TEACHER], label_map=label_map, epochs=args.epochs,
                          out=str(out), resume=(out / "last.pt").exists(), seed=args.seed, **BASE, **RUNS[name])
        train(cfg)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows[name] = {"run": name, "out": str(out), **scored(str(out), val, db),
                      "train_s": round(sum(m["epoch_seconds"] for m in history), 1)}  # a resumed run's too
        print(json.dumps(rows[name]), file=sys.stderr, flush=True)
        if name == "v2":  # deep compression starts from the plain student
            compressed = [compress_setting(setting, str(out), val, db, args.seed) for setting in args.settings.split(",")]
    latency = v1_v2_latency(rows) if {"v1", "v2"} <= set(rows) else {}
    print_tables(rows, compressed, latency)
    print(json.dumps({"rows": rows, "compressed": compressed, "latency": latency, "args": vars(args)}))


def compress_setting(setting: str, student: str, val: str, db: str, seed: int) -> dict:
    """`distill compress` of ``student`` at SPARSITY:BITS:EPOCHS, the .dc file scored on val."""
    sparsity, bits, epochs = setting.split(":")
    dc = Path(student) / f"model-s{sparsity}-b{bits}-e{epochs}.dc"
    t0 = time.time()
    result = compress_student(CompressConfig(student=student, bits=int(bits), sparsity=float(sparsity),
                                             epochs=int(epochs), out=str(dc), seed=seed))
    row = {"setting": setting, "seconds": round(time.time() - t0, 1), **result, "held_out": scored(str(dc), val, db)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def scored(student: str, val: str, db: str) -> dict:
    e = evaluate(student, val, db_path=db, latency=False)
    t, m = e["teacher"], e["model"]
    return {"accuracy": e["accuracy"], "student_accuracy": t["student_accuracy"], "teacher_accuracy": t["accuracy"],
            "agreement": t["agreement"], "macs": m["macs"], "parameters": m["parameters"], "file_bytes": m["file_bytes"]}


def v1_v2_latency(rows: dict) -> dict:
    """Batch 1 and 32, PyTorch and ONNX (onnxruntime), 2 threads, every model timed in turn."""
    torch.set_num_threads(2)
    candidates = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("v1", "v2"):
            model, meta = open_student(rows[name]["out"])
            candidates.append(torch_candidate(f"{name} pytorch", model, meta.image_size))
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, path, meta.image_size, deployment_metadata(meta))
            candidates.append(onnx_candidate(f"{name} onnx", path, meta.image_size, threads=2))
        return interleaved_latency(candidates, batches=(1, 32), runs=20)


def _pct(x):
    return "-" if x is None else f"{x:.1%}"


def print_tables(rows: dict, compressed: list, latency: dict) -> None:
    print("| run | student top-1 (answered val) | agreement | top-1 (all val) | MACs | parameters | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['run']} | {_pct(r['student_accuracy'])} | {_pct(r['agreement'])} | {_pct(r['accuracy'])} | "
              f"{r['macs'] / 1e6:.1f} M | {r['parameters']:,} | {r['train_s']:.0f} |")
    if latency:
        print("\n| model | batch 1 ms | batch 32 ms |\n|---|---|---|")
        for name, ms in latency.items():
            print(f"| {name} | {ms['ms_batch1']} | {ms['ms_batch32']} |")
    for c in compressed:
        print(f"\ncompress --sparsity {c['sparsity']} --bits {c['bits']} --epochs {c['epochs']} ({c['seconds']} s); "
              f"held-out val: student top-1 {_pct(c['held_out']['student_accuracy'])}, agreement "
              f"{_pct(c['held_out']['agreement'])}\n")
        print("| stage | bytes | smaller | val-split accuracy | val-split agreement |\n|---|---|---|---|---|")
        for s in c["stages"]:
            print(f"| {s['stage']} | {s['bytes']:,} | {s['ratio']}x | {_pct(s['val_accuracy'])} | {_pct(s['val_agreement'])} |")


if __name__ == "__main__":
    main()
