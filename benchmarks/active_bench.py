"""Which images a budget of calls should buy (issue 12): `distill loop` per selection strategy.

Pool: the 4,000 Imagenette training photos; test set: the 1,000 val photos. For every (budget,
strategy, seed) one `distill loop` (its Python API, distill_app/loop.py) runs --rounds rounds in
its own store under --work, against the local EfficientNet-Lite0 served by `distill serve-teacher
--format hf` on loopback (answering its top 5, as quality_bench.py does), with the quality
benchmark's label map and student: MobileNetV2 x0.5 at 112 px from random init (--pretrained off),
product training defaults unless --epochs / --train-json say otherwise. Round 1 of diversity is
k-center, of typical and hybrid TypiClust, on the local EfficientNet-Lite0's features (loop.py):
here that is the teacher's own network, which a paid cloud teacher would not be (there it is
merely a good free feature model).

Every run pays its own pool calls into its own store (no answer is shared between runs: what a
strategy picks depends on what its store holds, and its calls are counted there). The val photos'
answers are harvested once, through the same server, into --work/val.db, and every round's student
is compared with the teacher there (`evaluate(..., db_path=val.db)`): the teacher is deterministic,
and the run stores stay the pool's only, so their usage is what the loop paid for.

After each round the round's student is evaluated on val: accuracy is `distill eval`'s student
top-1 on the val photos whose top-5 answer maps to a class (teacher.student_accuracy, as in
quality_bench.py; accuracy_all: on all of them), agreement its top-1 agreement with the teacher;
calls are the pool images answered by the round (its target, budget x round / rounds: a healthy
local server fails none, and paid_calls, the run store's usage at the end, checks the total).

    python benchmarks/active_bench.py --epochs 10 --plot active.png  # 30 loops, ~2.5 h on 2 cores
    python benchmarks/active_bench.py --plot active.png                  # product epochs: ~50 h on 2 cores
    python benchmarks/active_bench.py --budgets 40 --seeds 0 --strategies random,diversity \\
        --epochs 2 --pool-limit 200 --val-limit 100                      # smoke run, 2-3 min

Times are estimates: quality_bench's x0.5 run trains ~300 images/s on 2 cores (3,000 steps of 64
in about 620 s). --epochs 10 trains 2.5 x budget x 9 images per loop; the product's --epochs (about
3,000 steps a round, at most 500 epochs) some 575,000 (500 calls) to 700,000 (1,000 calls), 30-40
minutes, before the last round's second run.

Prints a Markdown table (mean ± stdev over seeds at the final round), the calls each strategy
needs to reach random's accuracy at the largest budget (interpolated on its mean per-round curve),
one JSON line per run on stderr and one JSON line on stdout. Resumable: a finished run's result
file is read back, and an unfinished loop resumes without paying twice (loop.py). Strategies are
interleaved inside each seed, so the machine's load hits all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_bench as qb  # noqa: E402  (data, recipe, label map, subsets, port helpers)

from cache import StoreError, open_store  # noqa: E402
from distill_app.deploy.evaluate import evaluate  # noqa: E402
from distill_app.errors import DistillError, one_line  # noqa: E402
from distill_app.harvest.engine import HarvestConfig, harvest  # noqa: E402
from distill_app.harvest.select import STRATEGIES  # noqa: E402
from distill_app.loop import LoopConfig, round_targets, run_loop  # noqa: E402
from distill_app.training.checkpoint import CONFIG_FILE  # noqa: E402
from distill_app.training.config import TrainConfig  # noqa: E402

TOKEN = "active-bench-token"
# TrainConfig fields the loop sets per run: not for --train-json.
LOOP_OWNS = ("images", "db", "teachers", "out", "resume", "seed")


def main() -> None:
    # SIGTERM (kill, a timeout) ends the run as Ctrl-C does: the finally blocks stop the server
    # instead of leaving it orphaned; the rerun resumes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bench()
    except (DistillError, StoreError) as e:  # what the user must change, in one line (as the CLI says it)
        raise SystemExit(f"error: {one_line(e, None)}") from None


def bench() -> None:
    args = parse_args()
    train_cfg = training_fields(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    setting = work / setting_name(args, train_cfg)
    setting.mkdir(exist_ok=True)
    rows = run_all(args, setting, train_cfg)
    print_table(rows)
    print_calls_to_reach(rows)
    if args.plot:
        plot(rows, args.plot, student_words(train_cfg))
    print(json.dumps({"setting": str(setting), "rows": rows, "args": vars(args)}))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=qb.DATA, help="folder with train/ (the pool) and val/ class folders")
    ap.add_argument("--work", default="/tmp/distill-active", help="stores, runs, subsets and results")
    ap.add_argument("--budgets", default="500,1000", help="calls per loop, over all rounds")
    ap.add_argument("--strategies", default="random,balanced,diversity,typical,uncertainty,hybrid",
                    help=f"of {', '.join(STRATEGIES)}")
    ap.add_argument("--seeds", default="0,1,2", help="loop seeds (selection order and training)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per round (default: the product's)")
    ap.add_argument("--warm-start", action="store_true", help="distill loop --warm-start: later rounds "
                    "start from the previous round's student (the loop's default for a random-init student); "
                    "without it --cold-start, the setting of the earlier figures")
    ap.add_argument("--unlabeled", default="off", help="the last round's --unlabeled (distill loop's default "
                    "is auto: Noisy Student on the photos no call reached); off compares the selections alone")
    ap.add_argument("--train-json", default="{}", help="more TrainConfig fields, e.g. '{\"lr\": 0.004}'")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--label-map", default=str(qb.HERE / "imagenette_labels.toml"))
    ap.add_argument("--pool-limit", type=int, default=None, help="smoke runs: the first N pool photos (hash order)")
    ap.add_argument("--val-limit", type=int, default=None, help="smoke runs: the first N val photos (hash order)")
    ap.add_argument("--plot", default=None, help="write accuracy against calls to this PNG")
    args = ap.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.strategies = args.strategies.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"--strategies: unknown {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    return args


def run_all(args, setting: Path, train_cfg: dict) -> list[dict]:
    """Every (budget, strategy, seed), strategies interleaved inside each seed; finished runs read back."""
    work, data = Path(args.work), Path(args.data)
    pool = limited(data / "train", work / f"pool-{args.pool_limit}", args.pool_limit)
    val = limited(data / "val", work / f"val-{args.val_limit}", args.val_limit)
    (setting / "settings.json").write_text(json.dumps({"rounds": args.rounds, "top_k": args.top_k,
                                                       "pool": str(pool), "train": train_cfg}, indent=1))
    result_name = f"result-val{args.val_limit or 'all'}.json"
    jobs = [(b, strategy, seed) for b in args.budgets for seed in args.seeds for strategy in args.strategies]
    todo = [j for j in jobs if not (setting / run_name(*j) / result_name).exists()]
    rows = []
    with serving(work) if todo else contextlib.nullcontext() as endpoint:  # no server when all are done
        val_db = str(work / "val.db")
        if todo:
            s = harvest(HarvestConfig(images=str(val), teacher=qb.TEACHER, endpoint=endpoint, db=val_db,
                                      top_k=args.top_k, concurrency=2))
            print(f"val answers: {s['already_cached']} stored, {s['succeeded']} harvested, {s['failed']} failed",
                  file=sys.stderr)
        for budget, strategy, seed in jobs:
            result = setting / run_name(budget, strategy, seed) / result_name
            if result.exists():
                row = json.loads(result.read_text())
            else:
                result.parent.mkdir(exist_ok=True)
                loop = LoopConfig(images=str(pool), teacher=qb.TEACHER, budget=budget, rounds=args.rounds,
                                  select=strategy, out=str(result.parent / "loop"), db=str(result.parent / "distill.db"),
                                  endpoint=endpoint, top_k=args.top_k, seed=seed, warm_start=args.warm_start,
                                  unlabeled=args.unlabeled, train=dict(train_cfg))
                row = run_one(loop, str(val), val_db)
                tmp = result.with_suffix(".tmp")
                tmp.write_text(json.dumps(row))
                os.replace(tmp, result)  # whole or absent: a run killed while evaluating is run again
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def training_fields(args) -> dict:
    """TrainConfig fields of every round: the quality benchmark's random-init recipe, the label
    map, --epochs and --train-json. A bad field name is a one-line error, before anything runs."""
    try:
        extra = json.loads(args.train_json)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--train-json is not JSON ({e}); pass an object, e.g. '{{\"lr\": 0.004}}'") from None
    if not isinstance(extra, dict):
        raise SystemExit(f"--train-json must be a JSON object of TrainConfig fields, got {args.train_json!r}")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(LOOP_OWNS)
    unknown = sorted(set(extra) - known)
    if unknown:
        raise SystemExit(f"--train-json: {', '.join(unknown)} are no TrainConfig fields the loop leaves open; "
                         f"choose from {', '.join(sorted(known))}")
    cfg = {**qb.RECIPES["random"], "label_map": args.label_map}
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    return {**cfg, **extra}


def limited(folder: Path, subset: Path, limit: int | None) -> Path:
    """``folder`` itself, or symlinks to its first ``limit`` photos in hash order (a repeatable subset)."""
    return folder if limit is None else qb.subset_folder(folder, subset, limit)


def setting_name(args, train_cfg: dict) -> str:
    """One folder per setting (rounds, pool, training fields): runs of other settings never mix."""
    key = {"rounds": args.rounds, "top_k": args.top_k, "pool": args.pool_limit, "train": train_cfg}
    if args.warm_start:
        key["warm_start"] = True  # only when set: the folders of earlier (cold) settings keep their names
    if args.unlabeled != "off":
        key["unlabeled"] = args.unlabeled  # likewise
    key = json.dumps(key, sort_keys=True)
    epochs = train_cfg.get("epochs", "auto")
    prefix = ("warm-" if args.warm_start else "") + ("" if args.unlabeled == "off" else f"{args.unlabeled}-")
    return (f"{prefix}r{args.rounds}-e{epochs}-pool{args.pool_limit or 'all'}-"
            f"{hashlib.sha256(key.encode()).hexdigest()[:8]}")


def run_name(budget: int, strategy: str, seed: int) -> str:
    return f"b{budget}-{strategy}-s{seed}"


@contextlib.contextmanager
def serving(work: Path) -> Iterator[str]:
    """`distill serve-teacher --teacher local --format hf` on a free loopback port; yields the endpoint."""
    port = qb._free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_TEACHER_TOKEN": TOKEN}
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "distill_app", "serve-teacher", "--teacher", "local", "--format", "hf",
             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            qb._wait_for(port)
            os.environ["HF_TOKEN"] = TOKEN  # read by the hf teacher of every harvest in this process
            yield f"http://127.0.0.1:{port}/models/local/efficientnet_lite0"
        finally:
            server.terminate()
            server.wait()


def run_one(loop: LoopConfig, val: str, val_db: str) -> dict:
    """One loop (resumed if it was stopped), then every round's student evaluated on ``val``."""
    t0 = time.time()
    name = Path(loop.out).parent.name
    summary = run_loop(loop, log=lambda line: print(f"  {name}: {line}", file=sys.stderr, flush=True))
    curve = []
    # Calls by each round: its target (a healthy local server fails none; paid_calls checks the total).
    for r, calls in zip(summary["rounds"], round_targets(loop.budget, loop.rounds)):
        e = evaluate(r["out"], val, db_path=val_db, latency=False)
        t = e["teacher"]
        epochs = json.loads((Path(r["out"]) / CONFIG_FILE).read_text())["epochs"]  # resolved, when auto
        curve.append({"round": r["round"], "strategy": r["strategy"], "calls": calls, "epochs": epochs,
                      "accuracy": t["student_accuracy"], "accuracy_all": e["accuracy"],
                      "agreement": t["agreement"], "compared": t["compared"]})
    store = open_store(loop.db, create=False)
    try:
        paid = sum(row["calls"] for row in store.db["usage"].rows)
    finally:
        store.close()
    return {"budget": loop.budget, "strategy": loop.select, "seed": loop.seed, "rounds": loop.rounds,
            "epochs": loop.train.get("epochs"), "paid_calls": paid, "accuracy": curve[-1]["accuracy"],
            "agreement": curve[-1]["agreement"], "wall_s": round(time.time() - t0, 1), "curve": curve}


def _groups(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["strategy"]), []).append(r)
    return groups


def _mean_curve(runs: list[dict]) -> list[tuple[int, float, float]]:
    """(calls, mean, stdev of the accuracy over the seeds) per round; the rounds' calls are the
    same for every seed. A round some seed could not evaluate is left out."""
    out = []
    for points in zip(*(r["curve"] for r in runs)):
        values = [p["accuracy"] for p in points]
        if None not in values:
            out.append((points[0]["calls"], statistics.mean(values),
                        statistics.stdev(values) if len(values) > 1 else 0.0))
    return out


def print_table(rows: list[dict]) -> None:
    print("| calls | strategy | seeds | accuracy | agreement | paid calls |")
    print("|---|---|---|---|---|---|")
    for (budget, strategy), rs in _groups(rows).items():
        def col(key, fmt):
            values = [r[key] for r in rs if r[key] is not None]
            return qb._spread(values, fmt) if values else "-"

        print(f"| {budget:,} | {strategy} | {len(rs)} | {col('accuracy', '.1%')} | {col('agreement', '.1%')} | "
              f"{col('paid_calls', '.0f')} |")


def calls_to_reach(curve: list[tuple[int, float, float]], target: float) -> tuple[float, bool] | None:
    """Calls at which ``curve`` first reaches ``target``, linear between rounds; True when already
    the first round's (then only an upper bound); None when it never does."""
    previous = None
    for calls, accuracy, _ in curve:
        if accuracy >= target:
            if previous is None:
                return float(calls), True
            c0, a0 = previous
            return c0 + (target - a0) / (accuracy - a0) * (calls - c0), False
        previous = (calls, accuracy)
    return None


def print_calls_to_reach(rows: list[dict]) -> None:
    groups = _groups(rows)
    top = max(b for b, _ in groups)
    reference = groups.get((top, "random"))
    if not reference or any(r["accuracy"] is None for r in reference):
        print(f"\n(no random run at {top:,} calls: nothing to compare the strategies with)")
        return
    target = statistics.mean(r["accuracy"] for r in reference)
    budgets = sorted({b for b, _ in groups})
    print(f"\nCalls to reach random's {top:,}-call accuracy ({target:.1%}), on each strategy's mean curve:\n")
    print("| strategy | " + " | ".join(f"{b:,}-call loop" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for strategy in dict.fromkeys(s for _, s in groups):
        cells = []
        for b in budgets:
            reached = calls_to_reach(_mean_curve(groups[b, strategy]), target) if (b, strategy) in groups else None
            if (b, strategy) not in groups:
                cells.append("-")
            elif reached is None:
                cells.append("not reached")
            else:
                cells.append(("≤ " if reached[1] else "") + f"{reached[0]:,.0f}")
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    print("\n(linear between rounds; ≤ N: reached by the first round already, at N calls)")


def student_words(train_cfg: dict) -> str:
    """The plot's name for the student, e.g. "MobileNetV2 x1.0 @112 px, ImageNet init"."""
    start = "ImageNet init" if train_cfg.get("init") else (
        "random init" if train_cfg.get("pretrained") == "off" else f"--pretrained {train_cfg.get('pretrained', 'auto')}")
    return f"MobileNetV2 x{train_cfg.get('width', 1.0)} @{train_cfg.get('image_size', 224)} px, {start}"


def plot(rows: list[dict], path: str, student: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    groups = _groups(rows)
    strategies = list(dict.fromkeys(s for _, s in groups))
    budgets = sorted({b for b, _ in groups})
    colours = {s: f"C{i}" for i, s in enumerate(strategies)}
    styles = ["-", "--", ":", "-."]
    for (budget, strategy), rs in groups.items():
        curve = _mean_curve(rs)
        if not curve:
            continue
        calls, mean, stdev = zip(*curve)
        ax.errorbar(calls, mean, yerr=stdev, marker="o", capsize=2,
                    color=colours[strategy], linestyle=styles[budgets.index(budget) % len(styles)],
                    label=f"{strategy}, {budget:,}-call loop")
    ax.set(xlabel="API calls (answered pool photos)", ylabel="student top-1 on val",
           title=f"Imagenette val: {student}, from EfficientNet-Lite0 (top 5)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
