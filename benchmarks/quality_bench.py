"""Student quality from a realistic API teacher: soft vs hard targets at equal numbers of calls.

The local EfficientNet-Lite0 is served by `distill serve-teacher` in the Hugging Face wire
format, answering only its top 5 labels (what the real Inference API returns by default), and
harvested over HTTP with `distill harvest --teacher hf:...` into this benchmark's own store.
A label map (benchmarks/imagenette_labels.toml) maps ImageNet labels onto Imagenette's ten
folders. For each call budget B, the students see the first B training images in hash order
(a random, repeatable subset) and are trained for the same number of optimizer steps, once on
the teacher's soft targets and once on its argmax (hard) labels. All are evaluated on val.

    python benchmarks/quality_bench.py                         # defaults below, ~1 h on 2 busy cores
    python benchmarks/quality_bench.py --budgets 500 --steps 300   # a quick look

The harvest is cached in --work: reruns pay for nothing and go straight to training.
Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from distill_app.deploy.evaluate import evaluate
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.data.images import load, scan
from distill_app.training.trainer import TrainConfig, train

DATA = "/work/shared/data/imagenette-dev"
HERE = Path(__file__).resolve().parent
TOKEN = "quality-bench-token"
TEACHER = "hf:local/efficientnet_lite0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DATA, help="folder with train/ and val/ class folders")
    ap.add_argument("--work", default="/tmp/distill-quality", help="store, image subsets and runs")
    ap.add_argument("--budgets", default="500,4000", help="API calls (training images) per student")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps per student")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--label-map", default=str(HERE / "imagenette_labels.toml"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    db = str(work / "quality.db")

    started = time.time()
    harvested = harvest_via_server(Path(args.data), db, args.top_k, work)
    harvest_s = time.time() - started
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        subset = subset_folder(Path(args.data) / "train", work / f"train-{budget}", budget)
        for targets in ("soft", "hard"):
            rows.append(train_and_eval(args, db, subset, budget, targets, work))
    print_results(args, rows, harvested, harvest_s)


def harvest_via_server(data: Path, db: str, top_k: int, work: Path) -> dict:
    """Serve the local teacher (hf format) on loopback and harvest train and val through it."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_TEACHER_TOKEN": TOKEN}
    server = subprocess.Popen(
        [sys.executable, "-m", "distill_app", "serve-teacher", "--teacher", "local",
         "--format", "hf", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"),
    )
    try:
        _wait_for(port)
        os.environ["HF_TOKEN"] = TOKEN
        endpoint = f"http://127.0.0.1:{port}/models/local/efficientnet_lite0"
        out = {}
        for split in ("train", "val"):
            s = harvest(HarvestConfig(images=str(data / split), teacher=TEACHER, endpoint=endpoint,
                                      db=db, top_k=top_k, concurrency=2, upload_size=224))
            out[split] = {k: s[k] for k in ("images", "already_cached", "succeeded", "failed", "calls")}
            print(f"harvest {split}: {out[split]}", file=sys.stderr)
        return out
    finally:
        server.terminate()
        server.wait()


def subset_folder(train_dir: Path, target: Path, budget: int) -> Path:
    """``target/<class>/<file>`` symlinks to the first ``budget`` training images in hash order."""
    if target.exists():
        return target
    files, _ = scan(train_dir)
    loaded = sorted((x for x in map(load, files) if hasattr(x, "sha256")), key=lambda x: x.sha256)
    for x in loaded[:budget]:
        (target / x.label).mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(x.path), target / x.label / os.path.basename(x.path))
    return target


def train_and_eval(args, db: str, subset: Path, budget: int, targets: str, work: Path) -> dict:
    out = work / "runs" / f"b{budget}-{targets}-s{args.steps}"
    train_images = sum(1 for _ in subset.rglob("*.*")) * 0.9  # the trainer keeps ~10% for val
    epochs = max(1, math.ceil(args.steps * args.batch_size / train_images))
    cfg = TrainConfig(images=str(subset), db=db, teachers=[TEACHER], label_map=args.label_map,
                      width=args.width, image_size=args.image_size, epochs=epochs,
                      batch_size=args.batch_size, lr=args.lr, targets=targets, out=str(out),
                      resume=(out / "last.pt").exists(), seed=0)
    t0 = time.time()
    summary = train(cfg)
    train_s = time.time() - t0
    e = evaluate(str(out), str(Path(args.data) / "val"), db_path=db, latency=False)
    row = {"budget": budget, "targets": targets, "epochs": epochs, "train_s": round(train_s, 1),
           "images_per_s": summary["images_per_s"], "student_accuracy": e["accuracy"],
           "agreement": e["teacher"]["agreement"], "teacher_accuracy": e["teacher"]["accuracy"]}
    print(json.dumps(row), file=sys.stderr)
    return row


def print_results(args, rows: list[dict], harvested: dict, harvest_s: float) -> None:
    print(f"teacher {TEACHER} (local EfficientNet-Lite0 via serve-teacher, top-{args.top_k}); "
          f"student MobileNetV2 x{args.width} at {args.image_size} px, {args.steps} steps of "
          f"{args.batch_size}; harvest {harvest_s:.0f} s\n")
    print("| calls | targets | epochs | student acc | teacher acc | student/teacher | agreement | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["student_accuracy"] / r["teacher_accuracy"] if r["teacher_accuracy"] else float("nan")
        print(f"| {r['budget']} | {r['targets']} | {r['epochs']} | {r['student_accuracy']:.3f} | "
              f"{r['teacher_accuracy']:.3f} | {ratio:.3f} | {r['agreement']:.3f} | {r['train_s']} |")
    by = {(r["budget"], r["targets"]): r for r in rows}
    gaps = {b: round(by[(b, "soft")]["student_accuracy"] - by[(b, "hard")]["student_accuracy"], 4)
            for b, t in by if t == "soft" and (b, "hard") in by}
    print()
    print(json.dumps({"rows": rows, "soft_minus_hard": gaps, "harvest": harvested,
                      "harvest_s": round(harvest_s, 1), "args": vars(args)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/stats", timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise SystemExit(f"serve-teacher did not start on port {port}; see its log")


if __name__ == "__main__":
    main()
