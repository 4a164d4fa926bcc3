"""Harvest over HTTP against `distill serve-teacher` on loopback: pacing and fault tolerance.

Two runs of `distill harvest --teacher hf:...` (real processes, real sockets) on N images:

1. pacing: client --rate R --concurrency C, server latency L ms. Goal: achieved requests/s
   >= 0.95 x R (the rate limiter, not the threads or the server, sets the pace).
2. faults: the same with the server failing a fraction F of requests (503 loading, 500,
   dropped connection, garbage body). Goal: every image answered, none answered twice
   (server-side count of model calls per uploaded image).

Images are symlinked from --source into a temporary folder (read in place, never copied into
the repository). Prints a Markdown table, then one JSON line.

    python benchmarks/harvest_bench.py                       # local EfficientNet-Lite0 teacher
    python benchmarks/harvest_bench.py --teacher tiny        # a tiny TorchScript model instead
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SOURCE = "/work/shared/data/imagenette-dev/train"
TOKEN = "bench-token"
SUFFIXES = {".jpg", ".jpeg", ".png"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="local", help="teacher to serve; 'tiny' = a tiny TorchScript model")
    ap.add_argument("--source", default=SOURCE, help="folder of class subfolders of images")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--fail-rate", type=float, default=0.1)
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the server (OMP_NUM_THREADS); harvester and server share "
                         "the CPUs, and an oversubscribed OpenMP pool is 10-50x slower")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    try:
        images = link_images(Path(args.source), work / "images", args.images)
        teacher = tiny_teacher(work) if args.teacher == "tiny" else args.teacher
        rows = [
            run("pacing", teacher, images, work / "pacing.db", args, fail_rate=0.0),
            run("faults", teacher, images, work / "faults.db", args, fail_rate=args.fail_rate),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args)
    print(json.dumps({"benchmark": "harvest_http", "teacher": args.teacher, "images": args.images,
                      "rate": args.rate, "concurrency": args.concurrency,
                      "server_threads": args.server_threads,
                      "latency_ms": args.latency_ms, "fail_rate": args.fail_rate,
                      "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                      "runs": rows}))


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


def run(name: str, teacher: str, images: Path, db: Path, args, fail_rate: float) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DISTILL_TEACHER_TOKEN": TOKEN, "HF_TOKEN": TOKEN}
    server = subprocess.Popen(
        [*distill(), "serve-teacher", "--teacher", teacher, "--port", str(port), "--format", "hf",
         "--latency-ms", str(args.latency_ms), "--fail-rate", str(fail_rate)],
        env={**env, "OMP_NUM_THREADS": str(args.server_threads)}, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(base, server)
        start = time.monotonic()
        out = subprocess.run(
            [*distill(), "harvest", "--images", str(images), "--teacher", "hf:bench/teacher",
             "--endpoint", f"{base}/models/bench/teacher", "--db", str(db), "--rate", str(args.rate),
             "--concurrency", str(args.concurrency), "--json"],
            env=env, capture_output=True, text=True, check=False)
        wall = time.monotonic() - start
        if out.returncode != 0:
            sys.exit(f"harvest failed: {out.stderr.strip()[-2000:]}")
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        stats = requests.get(f"{base}/stats", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    counts = stats["images"].values()
    answered = stats["answered"]
    return {
        "run": name, "fail_rate": fail_rate, "images": summary["images"],
        "succeeded": summary["succeeded"], "failed": summary["failed"],
        "requests": summary["requests"], "requests_per_s": summary["requests_per_s"],
        "target_per_s": args.rate, "harvest_wall_s": round(wall, 1),
        "server_failures": {k: v for k, v in stats["by_status"].items() if k != "200"},
        "garbage_200s": stats["by_status"].get("200", 0) - answered,
        "images_answered": len(stats["images"]),
        "duplicate_answers": sum(counts) - len(stats["images"]),
        "model_ms_per_request": round(1000 * stats["model_seconds"] / max(answered, 1), 1),
    }


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
    print(f"harvest over HTTP: {args.images} images, teacher {args.teacher}, --rate {args.rate:g} "
          f"--concurrency {args.concurrency}, server latency {args.latency_ms:g} ms, "
          f"server torch threads {args.server_threads}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| run | server fail rate | succeeded | failed | requests | requests/s (target) "
          "| server failures | duplicate answers | model ms/request |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        failures = ", ".join(f"{k}: {v}" for k, v in sorted(r["server_failures"].items()))
        if r["garbage_200s"]:
            failures += (", " if failures else "") + f"garbage 200: {r['garbage_200s']}"
        print(f"| {r['run']} | {r['fail_rate']:g} | {r['succeeded']}/{r['images']} | {r['failed']} "
              f"| {r['requests']} | {r['requests_per_s']:.2f} ({r['target_per_s']:g}) "
              f"| {failures or '-'} | {r['duplicate_answers']} | {r['model_ms_per_request']} |")
    print()


if __name__ == "__main__":
    main()
