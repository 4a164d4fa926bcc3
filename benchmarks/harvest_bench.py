"""Harvest over HTTP against `distill serve-teacher` on loopback: the pipe under faults, and the store at scale.

Runs of `distill harvest --teacher hf:... --concurrency C` (real processes, real sockets) on N
images, against a server that limits at R requests/s (429 with Retry-After beyond) and adds L ms
of latency:

1. pacing: client --rate R, no faults. Goal: >= 0.98 x R requests/s.
2. faults: client --rate R, the server failing 10% of requests: 5% 503 "loading" with
   estimated_time 2 s, 2% dropped connections, 2% garbage bodies, 1% 500. Goal: >= 0.95 x R,
   no image answered twice (server-side count of model calls per upload), every image answered
   after one rerun.
3. auto: client --rate auto. Goal: >= 0.85 x R answered per second after the first 10 seconds
   (from the answers' times in the store), and the 429s it provoked.
4. store: a synthetic store of 100,000 answered images, 30 labels each (of 1,000), and what
   `distill train` does with it before its first step (read the answers, targets, hard labels,
   split; the image scan is apart: it reads the files). Goal: <= 5 s.

Images are symlinked from --source into a temporary folder (read in place, never copied into
the repository). Prints Markdown tables, then one JSON line.

    python benchmarks/harvest_bench.py --teacher tiny        # the harvester, not the server's model, bounds
    python benchmarks/harvest_bench.py                       # the local EfficientNet-Lite0 served
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SOURCE = "/work/shared/data/imagenette-dev/train"
TOKEN = "bench-token"
SUFFIXES = {".jpg", ".jpeg", ".png"}
FAULTS = "loading=0.05,drop=0.02,garbage=0.02,error=0.01"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="local", help="teacher to serve; 'tiny' = a tiny TorchScript model")
    ap.add_argument("--source", default=SOURCE, help="folder of class subfolders of images")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--rate", type=float, default=20.0, help="the server's limit, and the client's --rate")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--faults", default=FAULTS, help="serve-teacher --fail-mix of the faults run")
    ap.add_argument("--loading-s", type=float, default=2.0, help="estimated_time of the 503 'loading' answers")
    ap.add_argument("--store-images", type=int, default=100_000, help="0 skips the store timing")
    ap.add_argument("--runs", default="pacing,faults,auto", help="HTTP runs to make")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the server (OMP_NUM_THREADS); harvester and server share "
                         "the CPUs, and an oversubscribed OpenMP pool is 10-50x slower")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    rows, store_row = [], None
    try:
        images = link_images(Path(args.source), work / "images", args.images)
        teacher = tiny_teacher(work) if args.teacher == "tiny" else args.teacher
        for name in args.runs.split(","):
            faults = args.faults if name == "faults" else None
            rate = "auto" if name == "auto" else str(args.rate)
            rows.append(run(name, teacher, images, work / f"{name}.db", args, faults, rate))
        if args.store_images:
            store_row = store_timing(work / "big.db", args.store_images)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args)
    if store_row:
        print_store(store_row)
    print(json.dumps({"benchmark": "harvest_http", "teacher": args.teacher, "images": args.images,
                      "rate": args.rate, "concurrency": args.concurrency,
                      "server_threads": args.server_threads, "latency_ms": args.latency_ms,
                      "faults": args.faults, "loading_s": args.loading_s,
                      "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                      "runs": rows, "store": store_row}))


def link_images(source: Path, dest: Path, n: int) -> Path:
    """Symlink ``n`` images from ``source``'s class folders, round-robin so every class is in."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    files = {c: sorted(f for f in c.iterdir() if f.suffix.lower() in SUFFIXES) for c in classes}
    picked = 0
    for i in range(max((len(v) for v in files.values()), default=0)):
        for c in classes:
            if picked == n:
                return dest
            if i < len(files[c]):
                (dest / c.name).mkdir(parents=True, exist_ok=True)
                os.symlink(files[c][i], dest / c.name / files[c][i].name)
                picked += 1
    if picked < n:
        sys.exit(f"only {picked} images under {source}, {n} asked for")
    return dest


def tiny_teacher(work: Path) -> str:
    import warnings

    import torch
    from torch import nn

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit: deprecated, supported

    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    path = work / "tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return f"torchscript:{path}"


def run(name: str, teacher: str, images: Path, db: Path, args, faults: str | None, rate: str) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DISTILL_TEACHER_TOKEN": TOKEN, "HF_TOKEN": TOKEN}
    server = subprocess.Popen(
        [*distill(), "serve-teacher", "--teacher", teacher, "--port", str(port), "--format", "hf",
         "--rate", str(args.rate), "--latency-ms", str(args.latency_ms), "--loading-s", str(args.loading_s),
         *(["--fail-mix", faults] if faults else [])],
        env={**env, "OMP_NUM_THREADS": str(args.server_threads)}, stderr=subprocess.DEVNULL)
    harvest = [*distill(), "harvest", "--images", str(images), "--teacher", "hf:bench/teacher",
               "--endpoint", f"{base}/models/bench/teacher", "--db", str(db), "--rate", rate,
               "--concurrency", str(args.concurrency), "--json"]
    try:
        wait_until_up(base, server)
        start = time.monotonic()
        summary = harvest_once(harvest, env)
        wall = time.monotonic() - start
        rerun = harvest_once(harvest, env) if summary["failed"] else None
        stats = requests.get(f"{base}/stats", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    counts = stats["images"].values()
    answered = stats["answered"]
    throttled = stats["by_status"].get("429", 0)
    admitted_share = (stats["requests"] - throttled) / max(stats["requests"], 1)
    return {
        "run": name, "client_rate": rate, "faults": faults or "-", "images": summary["images"],
        "succeeded": summary["succeeded"], "failed": summary["failed"],
        "answered_after_rerun": summary["succeeded"] + (rerun["succeeded"] if rerun else 0),
        "requests": summary["requests"], "requests_per_s": summary["requests_per_s"],
        "admitted_per_s": round(summary["requests_per_s"] * admitted_share, 2),
        "limit_per_s": args.rate, "harvest_wall_s": round(wall, 1),
        "throttled_429": throttled, "paused_s": summary["paused_s"], "final_rate": summary["final_rate"],
        "answered_per_s_after_10s": answered_rate_after(db, 10.0) if name == "auto" else None,
        "server_failures": {k: v for k, v in stats["by_status"].items() if k not in ("200", "429")},
        "garbage_200s": stats["by_status"].get("200", 0) - answered,
        "images_answered": len(stats["images"]),
        "duplicate_answers": sum(counts) - len(stats["images"]),
        "model_ms_per_request": round(1000 * stats["model_seconds"] / max(answered, 1), 1),
    }


def harvest_once(command: list[str], env: dict) -> dict:
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"harvest failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def answered_rate_after(db: Path, skip_s: float) -> float:
    """Answers per second after the first ``skip_s`` seconds of answers, from their stored times."""
    with sqlite3.connect(db) as con:
        times = sorted(dt.datetime.fromisoformat(t).timestamp()
                       for (t,) in con.execute("SELECT answered_at FROM responses WHERE status = 'ok'"))
    later = [t for t in times if t >= times[0] + skip_s]
    return round(len(later) / (later[-1] - times[0] - skip_s), 2) if len(later) > 1 else 0.0


def store_timing(db: Path, n: int, labels_per_image: int = 30, vocabulary: int = 1000) -> dict:
    """Build a synthetic store of ``n`` answered images, then time the trainer's data preparation."""
    from cache import ImageRow, Response, open_store
    from distill_app.data.targets import LabelMap
    from distill_app.training.config import TrainConfig
    from distill_app.training.data import match_answers

    logging.getLogger("distill").setLevel(logging.ERROR)  # the folders match no label: it says so
    rng = random.Random(0)
    labels = [f"label {i}, a synonym of label {i}" for i in range(vocabulary)]
    t0 = time.perf_counter()
    store = open_store(str(db))
    teacher = store.teacher_id("hf:bench/big", "topk", {"top_k": labels_per_image})
    shas = [f"{rng.getrandbits(256):064x}" for _ in range(n)]
    for start in range(0, n, 5000):
        part = shas[start:start + 5000]
        store.add_images([ImageRow(h, f"photos/c{i % 10}/{h[:16]}.jpg", 64, 64, 1000, f"c{i % 10}")
                          for i, h in enumerate(part, start)])
        answers = []
        for h in part:
            weights = sorted((rng.random() for _ in range(labels_per_image)), reverse=True)
            total = sum(weights) * 1.05  # top-k: some mass is not returned
            answers.append(Response(h, [(lab, w / total) for lab, w in
                                        zip(rng.sample(labels, labels_per_image), weights)], raw="{}"))
        store.record(teacher, answers)
    store.close()
    built = time.perf_counter() - t0
    found = {h: (f"photos/c{i % 10}/{h[:16]}.jpg", f"c{i % 10}") for i, h in enumerate(shas)}
    label_map = LabelMap.from_dict({f"c{k}": labels[k * 30:(k + 1) * 30] for k in range(10)})
    cfg = TrainConfig(images="photos", db=str(db), teachers=["hf:bench/big"])
    t0 = time.perf_counter()
    data = match_answers(cfg, found, label_map=label_map)
    with_map = time.perf_counter() - t0
    t0 = time.perf_counter()
    match_answers(TrainConfig(images="photos", db=str(db), teachers=["hf:bench/big"], max_classes=100), found)
    top_100 = time.perf_counter() - t0
    return {"images": n, "labels_per_image": labels_per_image, "vocabulary": vocabulary,
            "build_s": round(built, 1), "prepare_s_label_map_10": round(with_map, 2),
            "prepare_s_max_classes_100": round(top_100, 2), "targets": list(data.soft_targets.shape)}


def distill() -> list[str]:
    return [sys.executable, "-m", "distill_app"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit("serve-teacher exited; run it by hand to see why")
        try:
            requests.get(f"{base}/stats", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    sys.exit("serve-teacher did not come up")


def print_table(rows: list[dict], args) -> None:
    print(f"harvest over HTTP: {args.images} images, teacher {args.teacher}, server limit {args.rate:g}/s, "
          f"--concurrency {args.concurrency}, server latency {args.latency_ms:g} ms, "
          f"server torch threads {args.server_threads}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| run | client --rate | succeeded | after one rerun | requests | requests/s | admitted/s "
          "(limit) | 429s | paused s | server failures | duplicate answers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        failures = ", ".join(f"{k}: {v}" for k, v in sorted(r["server_failures"].items()))
        if r["garbage_200s"]:
            failures += (", " if failures else "") + f"garbage 200: {r['garbage_200s']}"
        auto = (f" (found {r['final_rate']}/s; answered {r['answered_per_s_after_10s']}/s after 10 s)"
                if r["answered_per_s_after_10s"] is not None else "")
        print(f"| {r['run']} | {r['client_rate']}{auto} | {r['succeeded']}/{r['images']} "
              f"| {r['answered_after_rerun']}/{r['images']} | {r['requests']} | {r['requests_per_s']:.2f} "
              f"| {r['admitted_per_s']:.2f} ({r['limit_per_s']:g}) | {r['throttled_429']} | {r['paused_s']} "
              f"| {failures or '-'} | {r['duplicate_answers']} |")
    print()


def print_store(r: dict) -> None:
    print(f"store: {r['images']:,} answered images, {r['labels_per_image']} labels each of {r['vocabulary']:,} "
          f"(built in {r['build_s']} s)\n")
    print("| data preparation before the first step | seconds (goal <= 5) |")
    print("|---|---|")
    print(f"| label map of 10 classes | {r['prepare_s_label_map_10']} |")
    print(f"| no map, --max-classes 100 | {r['prepare_s_max_classes_100']} |")
    print()


if __name__ == "__main__":
    main()
