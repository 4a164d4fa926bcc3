"""Training throughput: `distill train`'s loop against a bare PyTorch loop (the bound), interleaved.

Same model (MobileNetV2, --width, --image-size), batch size, optimizer (the trainer's AdamW),
threads and data, in two processes that take turns every --turn steps, so that both see the
same machine load (the CPUs may be shared with other jobs):

1. the trainer, a child process calling ``distill_app.training.trainer.train`` on --images with the answers
   in --db: scan, targets, a fresh pixel cache (decoded, resized, uint8), then epochs with
   augmentation, validation and checkpoints. Its progress callback pauses it every --turn steps;
   the time it runs between pauses is its loop time (validation and checkpoints are counted
   apart, at the end of each epoch).
2. the bound, this process: the same number of steps on float tensors already normalised,
   channels_last, in memory (a pool of batches of the trainer's own pixels, cycled).

Reports per epoch images/s of the trainer's loop, of its whole epoch (plus validation and
checkpoints), of the bound, and their ratio (pooled, and the median over turns); the first epoch
with the cache build; peak resident memory (ru_maxrss) of each process; and how long the
trainer's data path takes per step (memmap read, crop/flip, normalisation). Prints a Markdown
table, then one JSON line. Goal (issue #5): ratio >= 0.95 on CPU at width 0.5, 128 px.

    python benchmarks/train_bench.py --db /work/bench/imagenette.db --label-map /work/bench/labels.toml
    python benchmarks/train_bench.py ... --per-class 100 --epochs 2     # a quicker look
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as distill_app.training does: the bound gets the same

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SOURCE = "/work/shared/data/imagenette-dev/train"
SUFFIXES = {".jpg", ".jpeg", ".png"}
MARK = "@@bench "  # the trainer's protocol lines on stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=SOURCE, help="class subfolders of images, answered in --db")
    ap.add_argument("--db", default="/work/bench/imagenette.db")
    ap.add_argument("--label-map", default="/work/bench/labels.toml")
    ap.add_argument("--teacher", default="local")
    ap.add_argument("--per-class", type=int, default=None, help="use the first N images of each class")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, both processes)")
    ap.add_argument("--pool", type=int, default=16, help="distinct in-memory batches the bound cycles through")
    ap.add_argument("--turn", type=int, default=5, help="steps per turn of each loop")
    ap.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "trainer":
        return trainer_child(json.loads(args.config), args.threads, args.turn)
    with tempfile.TemporaryDirectory(prefix="distill-train-bench-") as work:
        result = bench(args, Path(work))
    print_report(result)


# -- the trainer, in a child process -----------------------------------------------------------


def trainer_child(config: dict, threads: int | None, turn: int) -> None:
    import torch

    from distill_app.training.trainer import TrainConfig, train

    if threads:
        torch.set_num_threads(threads)
    clock = {"resumed": time.perf_counter(), "started": time.perf_counter(), "done": 0}

    def pause(message: dict) -> None:
        now, used = time.perf_counter(), cpu_usage()
        send({**message, "seconds": now - clock["resumed"], **{k: used[k] - clock[k] for k in used}})
        sys.stdin.readline()  # the bound's turn
        clock.update(cpu_usage(), resumed=time.perf_counter())

    def progress(epoch, step, steps, info):
        phase = info.get("phase")
        if phase == "pixels" and step == 1:
            clock["pixels_first"] = time.perf_counter()
        elif phase == "pixels" and step == steps:  # preparation ends; the first turn starts here
            now = time.perf_counter()
            send({"kind": "prepared", "cache_seconds": now - clock.get("pixels_first", now),
                  "seconds": now - clock["started"]})
            clock.update(cpu_usage(), resumed=now)
        elif phase == "train" and (step % turn == 0 or step == steps):
            pause({"kind": "steps", "epoch": epoch, "steps": step - clock["done"]})
            clock["done"] = 0 if step == steps else step
        elif phase == "epoch":  # this turn was validation and checkpoints
            pause({"kind": "epoch", "epoch": epoch, "metrics": info})

    summary = train(TrainConfig(**{"unlabeled": "off", **config}), progress)  # one training: its speed
    send({"kind": "done", "summary": summary, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def cpu_usage() -> dict:
    """CPU seconds in user space and in the kernel, and page faults, of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "sys": r.ru_stime, "faults": r.ru_minflt}


def send(message: dict) -> None:
    print(MARK + json.dumps(message, default=str), flush=True)


def receive(child: subprocess.Popen) -> dict:
    for line in child.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"the trainer exited ({child.wait()}) without reporting: see its log")


# -- the bound, in this process ----------------------------------------------------------------


class Bound:
    """A bare loop: the same student and optimizer, float inputs already in memory."""

    def __init__(self, args, pixels, classes: int):
        import numpy as np
        import torch

        from distill_app.data.pixels import to_input
        from distill_app.training.loop import make_optimizer
        from students import create_student

        torch.manual_seed(0)
        self.model = create_student("mobilenetv2", classes, args.width, args.image_size)
        self.model = self.model.to(memory_format=torch.channels_last).train()
        self.optimizer = make_optimizer(self.model, 1e-3, 0.05)
        b = args.batch_size
        self.inputs = [to_input(torch.from_numpy(np.array(pixels[i * b:(i + 1) * b])))
                       for i in range(min(args.pool, len(pixels) // b))]
        self.targets = torch.softmax(torch.randn(b, classes), dim=1)
        self.hard = torch.zeros(b, dtype=torch.int64)
        self.steps = 0

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` optimizer steps."""
        from distill_app.training.losses import distill_loss

        started = time.perf_counter()
        for _ in range(steps):
            x = self.inputs[self.steps % len(self.inputs)]
            loss = distill_loss(self.model(x), self.targets, self.hard)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
        return time.perf_counter() - started


def data_path_ms(pixels, args, rounds: int = 20) -> float:
    """Median ms per step of the trainer's data path (PixelBatches item: read, crop/flip, normalise)."""
    import numpy as np
    import torch

    from distill_app.data.pixels import PixelBatches, augment_params

    rng = np.random.default_rng(0)
    items = []
    for _ in range(rounds):
        rows = np.sort(rng.choice(len(pixels), args.batch_size, replace=False))
        items.append((rows, *augment_params(len(rows), args.image_size, torch.Generator().manual_seed(0))))
    batches = PixelBatches(pixels, items)
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        batches[i]
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


# -- the run -----------------------------------------------------------------------------------


def bench(args, work: Path) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    images = link_subset(Path(args.images), work / "images", args.per_class) if args.per_class else Path(args.images)
    env = {**os.environ, "DISTILL_CACHE_DIR": str(work / "pixel-cache")}  # a cold cache: epoch 1 builds it
    config = {"images": str(images), "db": args.db, "teachers": [args.teacher], "label_map": args.label_map,
              "width": args.width, "image_size": args.image_size, "batch_size": args.batch_size,
              "epochs": args.epochs, "out": str(work / "run"), "device": "cpu"}
    command = [sys.executable, __file__, "--role", "trainer", "--config", json.dumps(config), "--turn", str(args.turn)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    log = open(work / "trainer.log", "w")
    child = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        result = take_turns(args, work, child)
        child.wait(timeout=120)
    except BaseException:
        log.flush()
        sys.stderr.write((work / "trainer.log").read_text()[-3000:])
        raise
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    return {"args": vars(args), **result, "bound_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def take_turns(args, work: Path, child: subprocess.Popen) -> dict:
    """Trainer turn, bound turn, ... until the trainer is done; per-epoch and per-turn figures."""
    import numpy as np

    bound, turns, epochs, out = None, [], [], {}
    current = {"loop_seconds": 0.0, "bound_seconds": 0.0, "bound_images": 0}
    while True:
        message = receive(child)
        if message["kind"] == "prepared":
            out.update(prepare_seconds=message["seconds"], cache_build_seconds=message["cache_seconds"])
            continue
        if message["kind"] == "done":
            return {**out, "epochs": epochs, "turns": turns, "summary": message["summary"],
                    "trainer_maxrss_mb": message["maxrss_mb"]}
        if message["kind"] == "steps":
            if bound is None:  # the pixel cache is on disk once the trainer has started
                pixels = np.load(next((work / "pixel-cache").glob("pixels-*.npy")), mmap_mode="r")
                out["data_path_ms"] = data_path_ms(pixels, args)
                bound = Bound(args, pixels, classes_of(args.label_map))
            before = cpu_usage()
            seconds = bound.run(message["steps"])
            used = {k: v - before[k] for k, v in cpu_usage().items()}
            turns.append({"epoch": message["epoch"], "steps": message["steps"], "trainer_seconds": message["seconds"],
                          "bound_seconds": seconds, **{f"trainer_{k}": message[k] for k in used},
                          **{f"bound_{k}": v for k, v in used.items()}})
            current["loop_seconds"] += message["seconds"]
            current["bound_seconds"] += seconds
            current["bound_images"] += message["steps"] * args.batch_size
        else:  # the end of an epoch: its validation and checkpoints took message["seconds"]
            m = message["metrics"]
            images = round(m["images_per_s"] * m["train_seconds"])
            epochs.append({"epoch": m["epoch"], "images": images, **current, "val_ckpt_seconds": message["seconds"],
                           "trainer_loop": images / current["loop_seconds"],
                           "trainer_epoch": images / (current["loop_seconds"] + message["seconds"]),
                           "bound": current["bound_images"] / current["bound_seconds"]})
            current = {"loop_seconds": 0.0, "bound_seconds": 0.0, "bound_images": 0}
        child.stdin.write("go\n")
        child.stdin.flush()


def classes_of(label_map: str | None) -> int:
    """The student's outputs: the label map's classes; without one, an ImageNet teacher's 1,000
    (the head is a small part of the cost either way)."""
    from distill_app.data.targets import load_label_map

    return len(load_label_map(label_map).classes) if label_map else 1000


def link_subset(source: Path, dest: Path, per_class: int) -> Path:
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (dest / folder.name).mkdir(parents=True)
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)[:per_class]:
            (dest / folder.name / path.name).symlink_to(path.resolve())
    return dest


# -- the report --------------------------------------------------------------------------------


def print_report(r: dict) -> None:
    a, epochs = r["args"], r["epochs"]
    print(f"\nMobileNetV2 x{a['width']}, {a['image_size']} px, batch {a['batch_size']}, CPU, "
          f"{r['threads']} torch threads (OMP_WAIT_POLICY={r['omp_wait_policy']}), "
          f"{r['summary']['images']['train']} training images, turns of {a['turn']} steps\n")
    print("| epoch | trainer loop img/s | trainer epoch img/s (+val, ckpt) | bound img/s | loop / bound |")
    print("|---|---|---|---|---|")
    for e in epochs:
        e["ratio"] = e["trainer_loop"] / e["bound"]
        print(f"| {e['epoch']} | {e['trainer_loop']:.1f} | {e['trainer_epoch']:.1f} | {e['bound']:.1f} | {e['ratio']:.3f} |")
    later = [e for e in epochs if e["epoch"] > 1] or epochs
    r["later_ratio_pooled"] = (sum(e["images"] for e in later) / sum(e["loop_seconds"] for e in later)) / \
        (sum(e["bound_images"] for e in later) / sum(e["bound_seconds"] for e in later))
    full = [t for t in r["turns"] if t["epoch"] > 1 and t["steps"] == a["turn"]] or r["turns"]
    r["later_ratio_median_turn"] = statistics.median(t["bound_seconds"] / t["trainer_seconds"] for t in full)
    print(f"\n- later epochs, loop / bound: {r['later_ratio_pooled']:.3f} pooled; "
          f"{r['later_ratio_median_turn']:.3f} median of {len(full)} turns of {a['turn']} steps "
          f"(the trainer's last turn of an epoch has the merged last batch: left out)")
    first = epochs[0]
    r["first_epoch_with_cache"] = first["images"] / (first["loop_seconds"] + r["cache_build_seconds"])
    print(f"- first epoch: pixel cache built in {r['cache_build_seconds']:.1f} s "
          f"(start to first step: {r['prepare_seconds']:.1f} s); loop + cache build: "
          f"{r['first_epoch_with_cache']:.1f} img/s; loop alone {first['trainer_loop']:.1f} img/s")
    per_step = {f"{who}_{k}": sum(t[f"{who}_{k}"] for t in full) / sum(t["steps"] for t in full)
                for who in ("trainer", "bound") for k in ("seconds", "user", "sys", "faults")}
    r["later_per_step"] = per_step
    print("- per step, later epochs: " + "; ".join(
        f"{who} {per_step[who + '_seconds']:.2f} s wall, {per_step[who + '_user']:.2f} s user, "
        f"{per_step[who + '_sys']:.2f} s kernel, {per_step[who + '_faults']:.0f} page faults" for who in ("trainer", "bound")))
    val = statistics.median(e["val_ckpt_seconds"] for e in epochs)
    print(f"- validation + checkpoints: {val:.1f} s per epoch ({r['summary']['images']['val']} images)")
    step_ms = 1000 * a["batch_size"] / statistics.median(e["trainer_loop"] for e in later)
    print(f"- trainer data path (memmap read, crop/flip, normalise): {r['data_path_ms']:.1f} ms of "
          f"{step_ms:.0f} ms per step")
    print(f"- peak RSS: trainer {r['trainer_maxrss_mb']:.0f} MB, bound {r['bound_maxrss_mb']:.0f} MB "
          f"(with its {a['pool']} float batches)")
    print(json.dumps({k: v for k, v in r.items() if k not in ("summary", "turns")}))


if __name__ == "__main__":
    main()
