"""Chaos benchmark: faults, kills and bad inputs; what is lost and what is paid twice.

The long parts of the reliability suite (the fast parts are tests/test_harvest_faults.py,
test_harvest_crash.py, test_bad_images.py, test_bad_answers.py, test_secrets.py):

1. fault matrix: N images harvested over HTTP from `serve-teacher` (a tiny TorchScript teacher,
   in this process) answering 429 (its --rate), 503, 500, dropped connections, garbage with 200,
   timeouts (a share of requests held longer than the client's timeout), and all of them mixed,
   in the hf format and in google's (16 images a request). Retry waits scaled down. A run that
   leaves failures is rerun once. Goals: images lost 0; duplicate paid calls (server-side model
   calls per uploaded image, beyond the first) 0, except for timeouts: the server finishes and
   bills a request the client gave up on, so at most one per timeout.
2. kills: `distill harvest` processes SIGKILLed K times at random points (after a random number
   of stored answers, or a random time after start, which may fall in start-up or the scan),
   each kill followed by the next run, then a last run to the end. Goals: PRAGMA
   integrity_check ok, every image answered once in the store, none lost, duplicate paid calls
   <= calls in flight (the engine keeps at most 2 x --concurrency images claimed and unsaved).
3. bad inputs: every bad image of tests/test_bad_images.py (plus links, a loop, a non-UTF-8
   name, a file without read permission) through a local and a remote harvest, and every bad
   answer of tests/test_bad_answers.py through a loopback server. Goal: all handled (a reasoned
   skip, a correct answer, or a stored failure with its reason; never a crash, never a target).

Prints Markdown tables, then one JSON line.

    python benchmarks/chaos_bench.py                    # N=200, K=10: about 3-6 minutes on 2 CPUs
    python benchmarks/chaos_bench.py --images 60 --kills 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the bad-input generators live with the tests
warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit: deprecated, supported

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cache import open_store  # noqa: E402
from distill_app.harvest.engine import HarvestConfig, harvest  # noqa: E402
from distill_app.teachers.serve import ServeOptions, endpoints, serve, stop  # noqa: E402

TOKEN = "chaos-bench-token"
# Generous: on a busy machine a normal request must never time out by accident, or its
# duplicate would not be counted in the bound.
CLIENT_TIMEOUT_S = 1.0
SLOW_MS = 1500  # a "slow" request outlasts the client's timeout


@dataclass
class Scenario:
    name: str
    fmt: str = "hf"
    rate: float | None = None  # the server's --rate: more requests get 429 + Retry-After
    fail_rate: float = 0.0
    fail_modes: tuple[str, ...] = ("loading", "error", "drop", "garbage")
    slow_rate: float = 0.0  # share of requests held SLOW_MS (past the client's timeout)
    wait_scale: float = 0.02  # retry waits x this (Retry-After 1 s -> 20 ms)


SCENARIOS = [
    Scenario("429 (server --rate 25/s)", rate=25, wait_scale=0.25),
    Scenario("503 loading", fail_rate=0.4, fail_modes=("loading",)),
    Scenario("500", fail_rate=0.4, fail_modes=("error",)),
    Scenario("dropped connections", fail_rate=0.4, fail_modes=("drop",)),
    Scenario("garbage body with 200", fail_rate=0.4, fail_modes=("garbage",)),
    Scenario(f"timeouts (30% held {SLOW_MS} ms)", slow_rate=0.3),
    Scenario("all mixed", rate=40, fail_rate=0.4, slow_rate=0.1, wait_scale=0.25),
    Scenario("all mixed, google 16/request", fmt="google", rate=10, fail_rate=0.4, slow_rate=0.1,
             wait_scale=0.25),
]


@dataclass
class Row:
    part: str
    scenario: str
    images: int
    answered: int = 0
    lost: int = 0
    faults: int = 0
    fault_kinds: dict = field(default_factory=dict)
    kills: int = 0
    duplicates: int = 0
    duplicate_bound: int = 0
    requests: int = 0
    runs: int = 1
    integrity: str = "ok"
    wall_s: float = 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="images per fault scenario and for the kills")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=8, help="fault matrix: requests in flight")
    ap.add_argument("--kill-concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    os.environ.update(HF_TOKEN=TOKEN, GOOGLE_API_KEY=TOKEN, PYTHONWARNINGS="ignore")
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="distill-chaos-"))
    try:
        teacher = tiny_teacher(work)
        images = make_images(work / "images", args.images, seed=args.seed)
        rows = [fault_scenario(sc, i, teacher, images, work, args) for i, sc in enumerate(SCENARIOS)]
        rows.append(kill_cycles(teacher, work, args))
        bad = bad_inputs(teacher, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_tables(rows, bad, args)
    print(json.dumps({"benchmark": "chaos", "images": args.images, "kills": args.kills,
                      "concurrency": args.concurrency, "kill_concurrency": args.kill_concurrency,
                      "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                      "wall_s": round(time.monotonic() - start, 1),
                      "rows": [vars(r) for r in rows], "bad_inputs": bad}))


def tiny_teacher(work: Path) -> str:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    path = work / "tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return f"torchscript:{path}"


def make_images(folder: Path, n: int, seed: int) -> Path:
    """``n`` distinct 32 x 32 noise photos (distinct bytes, distinct uploads)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


# --- 1. the fault matrix ------------------------------------------------------------------------


class Slowness:
    """Holds a share of the requests past the client's timeout, before the model runs: the
    server then answers (and would bill) a request whose client has given up."""

    def __init__(self, service, share: float, seed: int):
        self.share, self.held, self.held_images = share, 0, 0
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._classify = service.classify
        service.classify = self.classify

    def classify(self, uploads):
        with self._lock:
            slow = self._rng.random() < self.share
            self.held += slow
            self.held_images += len(uploads) if slow else 0
        if slow:
            time.sleep(SLOW_MS / 1000)
        return self._classify(uploads)


def start_server(**options):
    """serve-teacher in this process; a client that gives up or is killed resets its connection,
    which the standard library's server would print a traceback for: that is expected here."""
    server, _ = serve(ServeOptions(port=0, device="cpu", token=TOKEN, **options))
    server.handle_error = lambda request, client_address: None
    return server


def fault_scenario(sc: Scenario, index: int, teacher: str, images: Path, work: Path, args) -> Row:
    server = start_server(teacher=teacher, rate=sc.rate, fail_rate=sc.fail_rate,
                          fail_modes=sc.fail_modes, seed=index)
    slowness = Slowness(server.service, sc.slow_rate, seed=index)
    db = work / f"faults-{index}.db"
    cfg = HarvestConfig(images=str(images), teacher="hf:chaos/tiny" if sc.fmt == "hf" else "google",
                        endpoint=endpoints(server)[sc.fmt], db=str(db), concurrency=args.concurrency,
                        timeout=CLIENT_TIMEOUT_S, wait_scale=sc.wait_scale)
    row = Row("faults", sc.name, images=args.images)
    t0 = time.monotonic()
    try:
        summary = harvest(cfg)
        row.requests = summary["requests"]
        if summary["failed"]:  # failures are stored as such; a later run retries them
            row.runs, row.requests = 2, row.requests + harvest(cfg)["requests"]
        stats = server.service.stats()
    finally:
        stop(server)
    row.wall_s = round(time.monotonic() - t0, 1)
    kinds = {k: v for k, v in stats["by_status"].items() if k != "200"}
    garbage = stats["by_status"].get("200", 0) - stats["answered"]
    kinds.update({"garbage 200": garbage} if garbage else {})
    kinds.update({"timeout": slowness.held} if slowness.held else {})
    row.fault_kinds, row.faults = kinds, sum(kinds.values())
    row.duplicates = sum(stats["images"].values()) - len(stats["images"])
    row.duplicate_bound = slowness.held_images  # a timed-out request may be finished and billed
    row.answered, row.integrity = store_outcome(db)
    row.lost = args.images - row.answered
    return row


def store_outcome(db: Path) -> tuple[int, str]:
    """(images with an ok answer, PRAGMA integrity_check) of a store."""
    conn = sqlite3.connect(db)
    try:
        ok = conn.execute("SELECT COUNT(*) FROM responses WHERE status = 'ok'").fetchone()[0]
        return ok, conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


# --- 2. kills ----------------------------------------------------------------------------------


def kill_cycles(teacher: str, work: Path, args) -> Row:
    rng = random.Random(args.seed)
    images = make_images(work / "kill-images", args.images, seed=args.seed + 1)
    server = start_server(teacher=teacher, latency_ms=60)
    db = work / "kills.db"
    row = Row("kills", f"SIGKILL x {args.kills}, then a last run", images=args.images)
    t0 = time.monotonic()
    try:
        for i in range(args.kills):
            proc = start_harvest(images, server, db, args.kill_concurrency)
            row.kills += kill_at_random_point(proc, db, rng, by_time=i % 3 == 2)
        last = start_harvest(images, server, db, args.kill_concurrency)
        _, err = last.communicate(timeout=300)
        if last.returncode != 0:
            sys.exit(f"the last harvest failed: {err.strip()[-2000:]}")
        row.runs = args.kills + 1
        stats = server.service.stats()
    finally:
        stop(server)
    row.wall_s = round(time.monotonic() - t0, 1)
    row.requests = stats["requests"]
    row.duplicates = sum(stats["images"].values()) - len(stats["images"])
    row.duplicate_bound = row.kills * 2 * args.kill_concurrency
    row.answered, row.integrity = store_outcome(db)
    row.lost = args.images - row.answered
    conn = sqlite3.connect(db)
    row.fault_kinds = dict(conn.execute("SELECT status, COUNT(*) FROM responses GROUP BY status"))
    conn.close()
    return row


def start_harvest(images: Path, server, db: Path, concurrency: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distill_app", "harvest", "--images", str(images),
           "--teacher", "hf:chaos/tiny", "--endpoint", endpoints(server)["hf"], "--db", str(db),
           "--concurrency", str(concurrency), "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_at_random_point(proc: subprocess.Popen, db: Path, rng: random.Random, by_time: bool) -> int:
    """SIGKILL ``proc`` after a random delay, or once a random number of new answers are stored
    (then a random few ms more, to land anywhere in the cycle). 1 if killed, 0 if it ended."""
    if by_time:
        deadline = time.monotonic() + rng.uniform(0.3, 4.0)  # may fall in start-up or the scan
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
    else:
        target = ok_rows(db) + rng.randint(1, 12)
        deadline = time.monotonic() + 120
        while ok_rows(db) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
    if proc.poll() is not None:
        proc.communicate()
        return 0
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return 1


def ok_rows(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM responses WHERE status = 'ok'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # not created or not migrated yet
        return 0


# --- 3. bad inputs -----------------------------------------------------------------------------


def bad_inputs(teacher: str, work: Path) -> dict:
    images = bad_image_zoo(work / "zoo")
    local = check_zoo(images, HarvestConfig(images=str(images["root"]), teacher=teacher,
                                            db=str(work / "zoo-local.db"), device="cpu"))
    server = start_server(teacher=teacher)
    try:
        remote = check_zoo(images, HarvestConfig(images=str(images["root"]), teacher="hf:chaos/tiny",
                                                 endpoint=endpoints(server)["hf"], wait_scale=0,
                                                 db=str(work / "zoo-remote.db")))
    finally:
        stop(server)
    answers = check_bad_answers(work)
    return {"image_kinds": images["kinds"], "images_local": local, "images_remote": remote,
            "answers": answers}


def bad_image_zoo(root: Path) -> dict:
    """Every bad or odd file of tests/test_bad_images.py, plus links, a loop, odd names, modes."""
    from test_bad_images import BAD, GOOD

    root.mkdir()
    for name, make in GOOD.items():
        (root / name).write_bytes(make())
    for name, (make, _) in BAD.items():
        (root / name).write_bytes(make())
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "loop").symlink_to(root)
    with open(os.path.join(os.fsencode(root), b"caf\xe9-latin1.png"), "wb") as f:
        Image.new("RGB", (8, 8), "white").save(f, "PNG")
    Image.new("RGB", (9, 9), "olive").save(root / "no-permission.jpg")
    (root / "no-permission.jpg").chmod(0)
    readable = os.access(root / "no-permission.jpg", os.R_OK)  # root reads it anyway
    answered = len(GOOD) + 1 + readable
    skipped = len(BAD) + 1 + (not readable)
    kinds = len(GOOD) + len(BAD) + 4  # + dangling link, loop, non-UTF-8 name, no permission
    return {"root": root, "answered": answered, "skipped": skipped, "kinds": kinds}


def check_zoo(zoo: dict, cfg: HarvestConfig) -> dict:
    try:
        s = harvest(cfg)
    except Exception as e:  # the goal is that this never happens
        return {"handled": False, "crash": f"{type(e).__name__}: {e}"}
    handled = (s["succeeded"], s["skipped_files"], s["failed"]) == (zoo["answered"], zoo["skipped"], 0)
    return {"handled": handled, "succeeded": s["succeeded"], "skipped": s["skipped_files"],
            "failed": s["failed"], "skipped_by_reason": s["skipped_by_reason"]}


def check_bad_answers(work: Path) -> dict:
    """Each bad answer of tests/test_bad_answers.py, and the odd-but-valid ones, end to end."""
    from test_bad_answers import FAILURES, ODD_LABELS, Canned, _google, _hf, _labels

    many = [(f"label {i:05d}", 1e-4) for i in range(10_000)]
    odd = [(label, 0.05) for label in ODD_LABELS]
    valid = [("hf", "10,000 labels", _hf(many)), ("google", "10,000 labels", _google(_labels(many))),
             ("hf", "odd characters", _hf(odd)), ("google", "odd characters", _google(_labels(odd))),
             ("google", "no labels", _google({}))]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    server.daemon_threads, server.requests = True, 0
    server.handle_error = lambda request, client_address: None
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    results = []
    try:
        for i, (fmt, case, body, *reason) in enumerate(FAILURES + valid):
            server.canned = (200, body)
            results.append(one_answer(work / f"answer-{i}", fmt, case, reason[0] if reason else None,
                                      f"http://127.0.0.1:{server.server_address[1]}"))
    finally:
        server.shutdown()
        server.server_close()
    return {"tried": len(results), "handled": sum(r["handled"] for r in results),
            "not_handled": [r for r in results if not r["handled"]]}


def one_answer(folder: Path, fmt: str, case: str, reason: str | None, base: str) -> dict:
    """One image harvested against a canned answer: a failure with ``reason``, or (None) ok."""
    folder.mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(folder / "a.png")
    url = f"{base}/models/acme/odd" if fmt == "hf" else f"{base}/v1/images:annotate"
    cfg = HarvestConfig(images=str(folder), teacher="hf:acme/odd" if fmt == "hf" else "google",
                        endpoint=url, db=str(folder / "a.db"), wait_scale=0, max_attempts=2)
    try:
        harvest(cfg)
    except Exception as e:
        return {"case": f"{fmt}: {case}", "handled": False, "crash": f"{type(e).__name__}: {e}"}
    store = open_store(cfg.db)
    teacher = store.find_teacher(cfg.teacher)
    [(status, error)] = store.db.execute("SELECT status, error FROM responses").fetchall()
    targets = store.answers(teacher["id"])
    store.close()
    if reason is None:
        handled = status == "ok" and len(targets) == 1
    else:
        handled = status == "failed" and (error or "").startswith(reason) and not targets
    return {"case": f"{fmt}: {case}", "handled": handled, "status": status, "error": error}


# --- output ------------------------------------------------------------------------------------


def print_tables(rows: list[Row], bad: dict, args) -> None:
    print(f"chaos: {args.images} images per run, tiny TorchScript teacher behind serve-teacher "
          f"(loopback), client timeout {CLIENT_TIMEOUT_S} s, fault-matrix --concurrency "
          f"{args.concurrency}, kills --concurrency {args.kill_concurrency}; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| part | scenario | faults injected | kills | runs | requests | images answered "
          "| images lost (goal 0) | duplicate paid calls | goal: <= | integrity | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r.fault_kinds.items()))
        faults = f"{r.faults} ({kinds})" if r.part == "faults" and r.faults else "-"
        bound = f"{r.duplicate_bound} (2 x {args.kill_concurrency} per kill)" if r.part == "kills" \
            else f"{r.duplicate_bound} (timeouts)" if r.duplicate_bound else "0"
        print(f"| {r.part} | {r.scenario} | {faults} | {r.kills or '-'} | {r.runs} | {r.requests} "
              f"| {r.answered}/{r.images} | {r.lost} | {r.duplicates} | {bound} | {r.integrity} "
              f"| {r.wall_s} |")
    local, remote, answers = bad["images_local"], bad["images_remote"], bad["answers"]
    print("\n| bad inputs | kinds tried | handled (goal: all) | how |")
    print("|---|---|---|---|")
    for name, res in (("images, local teacher", local), ("images, over HTTP (hf)", remote)):
        how = (f"{res.get('succeeded')} answered, {res.get('skipped')} skipped with a reason, "
               f"{res.get('failed')} failed") if "crash" not in res else f"crash: {res['crash']}"
        print(f"| {name} | {bad['image_kinds']} | {'all' if res['handled'] else 'NOT ALL'} | {how} |")
    print(f"| answers (hf and google formats) | {answers['tried']} | {answers['handled']}/{answers['tried']} "
          f"| stored failed with the reason, never a target; odd-but-valid stored ok |")
    for r in answers["not_handled"]:
        print(f"|  NOT HANDLED | {r['case']} | | {r} |")
    print()


if __name__ == "__main__":
    main()
