"""Student quality for the calls paid: random init against ImageNet init, at 500, 1,000 and 4,000 calls.

The local EfficientNet-Lite0 is served by `distill serve-teacher` in the Hugging Face wire
format, answering only its top 5 labels (what the Inference API returns by default), and
harvested over HTTP with `distill harvest --teacher hf:...` into this benchmark's own store
(cached in --work: reruns pay for nothing). A label map (benchmarks/imagenette_labels.toml) maps
ImageNet labels onto Imagenette's ten folders. For a budget of B calls the students see the
first B training photos in hash order (a random, repeatable subset; the other 4,000 - B stay
unanswered as far as training is concerned) and are evaluated on the 1,000 val photos.

Recipes (product defaults except what is named):
  random      MobileNetV2 x0.5 at 112 px, --pretrained off
  random-hard, random-logit, random-kl, random-ema, random-mixup: the same with --targets hard,
              --loss logit-mse, --loss kl, --ema 0.999 or --mixup 0.2
  random-hard-logit  --targets hard --loss logit-mse: random-logit's hard baseline
  random-rrc  the same with --crop-scale 0.35 (random-resized crop)
  random-semi the same with --unlabeled fixmatch, trained on all 4,000 training photos from a store that
              holds the answers of only the budget's (budget_store): the rest are its unlabeled images
  random-noisy the same photos and store, with --pseudo-labels the same budget and seed's `random`
              run (trained first when missing): Noisy Student, one round
  random-noisy2 a second round: random-noisy's run is the labeller
  random-noisy-rrc random-noisy with --crop-scale 0.35: more noise on the student
  random-noisy-warm random-noisy whose student starts from the labeller's weights
  default     the product's defaults on all 4,000 training photos and the budget's store: --unlabeled
              auto trains a labeller on the answers (its figure: labeller_accuracy), then the student
  default-logit the same with --loss logit-mse for both runs
  default-hard the same with --targets hard for both runs: the hard-label baseline of the defaults
  default-hard-logit --targets hard --loss logit-mse for both runs: default-logit's hard baseline
  imagenet    MobileNetV2 x1.0 at 112 px, --init ../shared/weights/mobilenetv2_100_imagenet.pt
  imagenet64  MobileNetV2 x1.0 at 64 px, the same init: about the MACs of x0.5 at 112 px
  imagenet160 MobileNetV2 x1.0 at 160 px, the same init (closer to the 224 px it was trained at)

    python benchmarks/quality_bench.py                                  # every row, ~1.5 h on 2 cores
    python benchmarks/quality_bench.py --budgets 1000 --recipes imagenet --seeds 0,1,2

Prints a Markdown table (student/teacher is on the val photos whose top-5 answer maps to a
class, as `distill eval` reports it), one JSON line per run, and writes a plot with --plot.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

from distill_app.data.images import scan_images
from distill_app.deploy.evaluate import evaluate
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.training.trainer import TrainConfig, resumable, train

DATA = "/work/shared/data/imagenette-dev"
INIT = "/work/shared/weights/mobilenetv2_100_imagenet.pt"
HERE = Path(__file__).resolve().parent
TOKEN = "quality-bench-token"
TEACHER = "hf:local/efficientnet_lite0"
RECIPES = {
    "random": {"width": 0.5, "image_size": 112, "pretrained": "off"},
    # The same student with one thing changed: the baselines and the options of the small-data recipe.
    "random-hard": {"width": 0.5, "image_size": 112, "pretrained": "off", "targets": "hard"},
    "random-logit": {"width": 0.5, "image_size": 112, "pretrained": "off", "loss": "logit-mse"},
    # A one-hot target's zeros are floored like the teacher's unanswered classes (losses.LOGIT_FLOOR).
    "random-hard-logit": {"width": 0.5, "image_size": 112, "pretrained": "off", "targets": "hard", "loss": "logit-mse"},
    "random-kl": {"width": 0.5, "image_size": 112, "pretrained": "off", "loss": "kl"},
    "random-ema": {"width": 0.5, "image_size": 112, "pretrained": "off", "ema": 0.999},
    "random-mixup": {"width": 0.5, "image_size": 112, "pretrained": "off", "mixup": 0.2},
    "random-rrc": {"width": 0.5, "image_size": 112, "pretrained": "off", "crop_scale": 0.35},
    "random-semi": {"width": 0.5, "image_size": 112, "pretrained": "off", "unlabeled": "fixmatch"},
    # Noisy Student: the same seed's `random` run labels the unanswered photos (--pseudo-labels).
    "random-noisy": {"width": 0.5, "image_size": 112, "pretrained": "off", "pseudo_labels": "random"},
    "random-noisy2": {"width": 0.5, "image_size": 112, "pretrained": "off", "pseudo_labels": "random-noisy"},
    # Noisy Student with more noise on the student (random-resized crop), the same labeller.
    "random-noisy-rrc": {"width": 0.5, "image_size": 112, "pretrained": "off", "pseudo_labels": "random",
                         "crop_scale": 0.35},
    # Noisy Student whose student starts from its labeller's weights (as `distill loop --warm-start` does).
    "random-noisy-warm": {"width": 0.5, "image_size": 112, "pretrained": "off", "pseudo_labels": "random",
                          "warm": True},
    # The product's defaults with the unanswered photos beside the answered ones: --unlabeled auto, which
    # trains its own labeller first (reported as `labeller`: its final epoch, which it hands over).
    "default": {"width": 0.5, "image_size": 112, "pretrained": "off", "unanswered": True},
    # The same with logit regression (--loss logit-mse) for the labeller and the student.
    "default-logit": {"width": 0.5, "image_size": 112, "pretrained": "off", "unanswered": True,
                      "loss": "logit-mse"},
    # The hard-label baseline of the product's defaults: --targets hard for the labeller and the student
    # (the pseudo-labels are then the labeller's argmax, one-hot).
    "default-hard": {"width": 0.5, "image_size": 112, "pretrained": "off", "unanswered": True,
                     "targets": "hard"},
    # default-hard with logit regression: default-logit's hard baseline, one thing changed.
    "default-hard-logit": {"width": 0.5, "image_size": 112, "pretrained": "off", "unanswered": True,
                           "targets": "hard", "loss": "logit-mse"},
    "imagenet": {"width": 1.0, "image_size": 112, "init": INIT},
    "imagenet64": {"width": 1.0, "image_size": 64, "init": INIT},
    "imagenet160": {"width": 1.0, "image_size": 160, "init": INIT},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DATA, help="folder with train/ and val/ class folders")
    ap.add_argument("--work", default="/tmp/distill-quality", help="store, image subsets and runs")
    ap.add_argument("--budgets", default="500,1000,4000", help="API calls (training photos) per student")
    ap.add_argument("--recipes", default="random,imagenet,imagenet64", help=f"of {', '.join(RECIPES)}")
    ap.add_argument("--seeds", default="0", help="training seeds per (budget, recipe)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per run (default: the product's, from the number of training images)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--label-map", default=str(HERE / "imagenette_labels.toml"))
    ap.add_argument("--plot", default=None, help="write accuracy against calls to this PNG")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    db = str(work / "quality.db")
    harvested = harvest_via_server(Path(args.data), db, args.top_k, work)
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        subset = subset_folder(Path(args.data) / "train", work / f"train-{budget}", budget)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for recipe in args.recipes.split(","):  # interleaved: the machine's load hits all alike
                rows.append(train_and_eval(args, db, subset, budget, recipe, seed, work))
    print_table(rows)
    print_labellers(rows)
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps({"rows": rows, "harvest": harvested, "args": vars(args)}))


def harvest_via_server(data: Path, db: str, top_k: int, work: Path) -> dict:
    """Serve the local teacher (hf format) on loopback and harvest train and val through it."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_TEACHER_TOKEN": TOKEN}
    with open(work / "server.log", "w") as log:  # the server's stderr, closed once it has stopped
        server = subprocess.Popen(
            [sys.executable, "-m", "distill_app", "serve-teacher", "--teacher", "local",
             "--format", "hf", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
        try:
            _wait_for(port)
            os.environ["HF_TOKEN"] = TOKEN
            endpoint = f"http://127.0.0.1:{port}/models/local/efficientnet_lite0"
            out = {}
            for split in ("train", "val"):
                s = harvest(HarvestConfig(images=str(data / split), teacher=TEACHER, endpoint=endpoint,
                                          db=db, top_k=top_k, concurrency=2, upload_size=224))
                out[split] = {k: s[k] for k in ("images", "already_cached", "succeeded", "failed")}
                print(f"harvest {split}: {out[split]}", file=sys.stderr)
            return out
        finally:
            server.terminate()
            server.wait()


def subset_folder(train_dir: Path, target: Path, budget: int) -> Path:
    """``target/<class>/<file>`` symlinks to the first ``budget`` training photos in hash order."""
    if target.exists():
        return target
    found = sorted(scan_images(train_dir).distinct(), key=lambda i: i.sha256)
    for image in found[:budget]:
        (target / image.label).mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(image.path), target / image.label / os.path.basename(image.path))
    return target


def budget_store(db: str, train_dir: Path, budget: int, work: Path) -> str:
    """A copy of the store holding the answers of only the ``budget`` training photos that
    :func:`subset_folder` picks (and every val answer): what a harvest with ``--max-calls`` of that
    budget would have left, without paying the teacher again. The other photos under train/ are
    then unanswered: the semi-supervised runs' unlabeled images."""
    target = work / f"store-{budget}.db"
    if target.exists():
        return str(target)
    shas = sorted(i.sha256 for i in scan_images(train_dir).distinct())
    drop = shas[budget:]  # subset_folder keeps the first ``budget`` in hash order
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(db) as src:
        src.execute("VACUUM INTO ?", (str(tmp),))
    with sqlite3.connect(tmp) as copy:
        copy.executemany("DELETE FROM responses WHERE image = ?", [(s,) for s in drop])
    tmp.rename(target)
    return str(target)


def train_and_eval(args, db: str, subset: Path, budget: int, recipe: str, seed: int, work: Path) -> dict:
    out = work / "runs" / f"b{budget}-{recipe}-e{args.epochs or 'auto'}-s{seed}"
    flags = dict(RECIPES[recipe])
    unanswered, warm = flags.pop("unanswered", False), flags.pop("warm", False)
    if "pseudo_labels" in flags:  # the labeller: that recipe's run on the budget's photos, trained first
        labeller = work / "runs" / f"b{budget}-{flags['pseudo_labels']}-e{args.epochs or 'auto'}-s{seed}"
        if not finished(labeller):  # model.pt is there from the first epoch: a killed run finishes first
            train_and_eval(args, db, subset, budget, flags["pseudo_labels"], seed, work)
        flags["pseudo_labels"] = str(labeller)
        if warm:
            flags.update(init=str(labeller / "model.pt"), backbone_lr=1.0)
    if unanswered or flags.get("unlabeled") == "fixmatch" or "pseudo_labels" in flags:
        # the same labelled photos, the others unanswered beside them
        subset, db = Path(args.data) / "train", budget_store(db, Path(args.data) / "train", budget, work)
    cfg = TrainConfig(images=str(subset), db=db, teachers=[TEACHER], label_map=args.label_map,
                      epochs=args.epochs, out=str(out), seed=seed,
                      resume=resumable(out), **flags)
    t0 = time.time()
    summary = train(cfg)
    train_s = time.time() - t0
    e = evaluate(str(out), str(Path(args.data) / "val"), db_path=db, latency=False)
    t = e["teacher"]
    last = final_epoch_accuracy(out, str(Path(args.data) / "val"), db)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    row = {"budget": budget, "recipe": recipe, "seed": seed, "epochs": summary["epochs"], "weights": summary["weights"],
           "train_s": round(sum(m["epoch_seconds"] for m in history), 1), "wall_s": round(train_s, 1),
           "accuracy_all": e["accuracy"], "student_accuracy": t["student_accuracy"], "student_accuracy_last": last,
           "teacher_accuracy": t["accuracy"], "compared": t["compared"], "agreement": t["agreement"],
           "ratio": round(t["student_accuracy"] / t["accuracy"], 4) if t["accuracy"] else None,
           "macs": e["model"]["macs"], "parameters": e["model"]["parameters"],
           "unlabeled": summary["unlabeled"], "unlabeled_used": summary["unlabeled_used"],
           "val_curve": [(round(sum(h["epoch_seconds"] for h in history[:i + 1]), 1), round(m["val_accuracy"], 4))
                         for i, m in enumerate(history)]}
    if "labeller" in summary:  # --unlabeled auto's first run: the supervised student of the same command
        lab = evaluate(summary["labeller"]["out"], str(Path(args.data) / "val"), db_path=db, latency=False)["teacher"]
        row.update(labeller_accuracy=lab["student_accuracy"], labeller_train_s=summary["labeller"]["seconds"],
                   gain=round(t["student_accuracy"] - lab["student_accuracy"], 4))
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def finished(run: Path) -> bool:
    """Whether the run folder holds every epoch its configuration resolved."""
    try:
        epochs = json.loads((run / "config.json").read_text())["epochs"]
        return len((run / "metrics.jsonl").read_text().splitlines()) >= epochs
    except (OSError, ValueError, KeyError):
        return False


def final_epoch_accuracy(out: Path, val: str, db: str) -> float:
    """Student top-1 of the run's final-epoch weights (last.pt): what ``--keep last`` would have
    put in model.pt (training is the same either way; only the file kept differs)."""
    import torch

    from distill_app.training.checkpoint import CHECKPOINT_FILE, MODEL_FILE

    last = out / "final-epoch"
    last.mkdir(exist_ok=True)
    student = torch.load(out / MODEL_FILE, map_location="cpu", weights_only=False)
    student["state_dict"] = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=False)["model"]
    torch.save(student, last / MODEL_FILE)
    return evaluate(str(last), val, db_path=db, latency=False)["teacher"]["student_accuracy"]


def print_labellers(rows: list[dict]) -> None:
    """Per budget, the runs that trained their own labeller: it against the student it taught. The
    labeller's model.pt is its final epoch (--keep auto); the product's supervised run, which keeps
    best-on-val, is the `random` recipe at the same budget and seed (the same flags and answers)."""
    rows = [r for r in rows if r.get("labeller_accuracy") is not None]
    if not rows:
        return
    print("| calls | recipe | seeds | labeller (final epoch) | student | student − labeller | per seed |")
    print("|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["recipe"]), []).append(r)
    for (budget, recipe), rs in groups.items():
        gains = [r["student_accuracy"] - r["labeller_accuracy"] for r in rs]
        gain = format(statistics.mean(gains) * 100, "+.1f") + (
            f" ± {statistics.stdev(gains) * 100:.1f}" if len(gains) > 1 else "")
        print(f"| {budget} | {recipe} | {len(rs)} | {_spread([r['labeller_accuracy'] for r in rs], '.1%')} | "
              f"{_spread([r['student_accuracy'] for r in rs], '.1%')} | {gain} points | "
              f"{', '.join(format(g * 100, '+.1f') for g in gains)} |")


def print_table(rows: list[dict]) -> None:
    print("| calls | recipe | seeds | MACs | train s | student top-1 | with --keep last | teacher top-1 | "
          "student/teacher | agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["recipe"]), []).append(r)
    for (budget, recipe), rs in groups.items():
        col = lambda key, fmt: _spread([r[key] for r in rs], fmt)  # noqa: E731
        print(f"| {budget} | {recipe} | {len(rs)} | {rs[0]['macs'] / 1e6:.0f} M | {col('train_s', '.0f')} | "
              f"{col('student_accuracy', '.1%')} | {col('student_accuracy_last', '.1%')} | "
              f"{col('teacher_accuracy', '.1%')} | {col('ratio', '.3f')} | {col('agreement', '.1%')} |")


def _spread(values: list[float], fmt: str) -> str:
    """The value, or mean ± standard deviation over seeds."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def plot(rows: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    # A run that trained its own labeller (--unlabeled auto) also gives the supervised figure.
    rows = [*({**r, "recipe": "labeller (supervised)", "ratio": r["labeller_accuracy"] / r["teacher_accuracy"]}
              for r in rows if r.get("labeller_accuracy") is not None), *rows]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        by_budget: dict[int, list[float]] = {}
        for r in rows:
            if r["recipe"] == recipe:
                by_budget.setdefault(r["budget"], []).append(r["ratio"])
        budgets = sorted(by_budget)
        spread = [statistics.stdev(by_budget[b]) if len(by_budget[b]) > 1 else 0.0 for b in budgets]
        ax.errorbar(budgets, [statistics.mean(by_budget[b]) for b in budgets], yerr=spread, fmt="o-", capsize=3,
                    label={"default": "default (Noisy Student)"}.get(recipe, recipe))
    every = sorted({r["budget"] for r in rows})
    ax.set(xscale="log", xlabel="API calls (answered training photos)", ylabel="student / teacher top-1 (mean ± sd)",
           title="Imagenette val, teacher EfficientNet-Lite0 (top 5)", ylim=(0, 1.02))
    ax.set_xticks(every, [f"{b:,}" for b in every])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
