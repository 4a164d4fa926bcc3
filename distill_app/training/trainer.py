"""``distill train``: the user's images + the teachers' stored answers -> a student run folder.

Reads top to bottom: the run folder, checkpoints, the best student file, and :func:`train`,
which strings together configuration (config.py), data (data.py), processes (torchrun,
distributed.py) and the epochs (loop.py, on the plan of schedule.py). The harvest never happens
here: the store is only read.

Repeatability: each batch draws its images, augmentation and dropout from generators seeded by
``(seed, epoch, batch)``, so a run resumed from ``last.pt`` computes exactly what an
uninterrupted run would have (on CPU; CUDA kernels are not all deterministic), and ``--batch-size``
images cut into parts for several processes (torchrun) or for gradient accumulation train like
one batch, up to float rounding and BatchNorm statistics.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) every process trains a disjoint part
of every batch (DistributedDataParallel: gloo on CPU, nccl on CUDA); rank 0 alone reads the
store, writes the run folder and reports progress; local rank 0 builds the pixel cache first.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from students import StudentConfig, Weights, build_student
from students.pretrained import RANDOM

from ..data.pixels import load_pixels
from ..errors import DistillError
from ..teachers.spec import normalise_teacher
from . import dsd
from .checkpoint import (CHECKPOINT_FILE, CONFIG_FILE, CURVES_FILE, METRICS_FILE, MODEL_FILE, StudentFile,
                         atomic_save, remove_stale_temps, save_student)
from .config import (AUTO_STEPS, NOISY_MIN_SHARE, Progress, TrainConfig, auto_epochs, check_config,
                     resumed_config)
from .data import TrainData, prepare_data
from .distributed import Ranks, join_processes, on_main
from .loop import Run, check_batches, evaluate, new_run, train_epoch
from .pseudo import LABELLER_DIR, add_pseudo_labels

__all__ = ["TrainConfig", "train"]

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt() parameters (malloc.h)


def is_better(metrics: dict, best: dict) -> bool:
    """Higher agreement with the teacher wins; a tie goes to the lower validation loss."""
    if not best:
        return True
    return (metrics["val_agreement"], -metrics["val_loss"]) > (best["val_agreement"], -best["val_loss"])


# -- setup, checkpoints, outputs ---------------------------------------------------------------


def resolve_out(cfg: TrainConfig) -> Path:
    """The run folder: --out, else runs/<student>-<n> with the next free n."""
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.resume:
        raise DistillError("--resume needs --out RUN_DIR, the run folder to continue")
    else:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.student)
        n = 1
        while Path("runs", f"{stem}-{n}").exists():
            n += 1
        out = Path("runs", f"{stem}-{n}")
    if cfg.resume and not resumable(out):
        raise DistillError(f"nothing to resume in {out}: no {CHECKPOINT_FILE}; drop --resume to start a new run")
    if not cfg.resume and resumable(out):
        raise DistillError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    return out


def resumable(out: str | Path) -> bool:
    """Whether ``out`` holds a run that --resume continues: its checkpoint, or only its labeller's
    (a Noisy Student run killed while the labeller trained)."""
    out = Path(out)
    return (out / CHECKPOINT_FILE).exists() or (out / LABELLER_DIR / CHECKPOINT_FILE).exists()


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"cannot read checkpoint {path} ({type(e).__name__}): start a new run with another --out") from None


def build_run(cfg: TrainConfig, data: TrainData, pixels: np.ndarray, ckpt: dict | None, ranks: Ranks) -> Run:
    """Model, optimizer and device tensors; restored from ``ckpt`` when resuming (its weights'
    provenance too: a resumed run looks for no weights)."""
    check_batches(cfg, data, ranks)
    torch.manual_seed(cfg.seed)  # the initial weights
    try:
        if ckpt is None:
            model, weights = build_student(cfg.student, len(data.classes), cfg.width, cfg.image_size,
                                           cfg.pretrained, cfg.init)
        else:
            model, _ = build_student(cfg.student, len(data.classes), cfg.width, cfg.image_size, "off")
            weights = Weights(**ckpt["weights"]) if "weights" in ckpt else RANDOM
    except ValueError as e:
        raise DistillError(str(e)) from None
    if weights.note and ckpt is None and ranks.main:
        log.warning("%s", weights.note)
    model = model.to(ranks.device, memory_format=torch.channels_last)
    if ckpt is not None:
        if ckpt["classes"] != data.classes:
            raise DistillError(f"the classes differ from the checkpoint's in {cfg.out} (new answers or label map?): "
                               "start a new run with another --out")
        model.load_state_dict(ckpt["model"])
    student = StudentConfig(cfg.student, len(data.classes), cfg.width, cfg.image_size, weights.mean, weights.std)
    run = new_run(cfg, data, pixels, student, model, ranks, pretrained=weights.pretrained)
    run.weights = weights
    if ckpt is not None:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.step, run.epoch, run.best, run.history = ckpt["step"], ckpt["epoch"], ckpt["best"], ckpt["history"]
        if run.ema is not None:
            run.ema.module.load_state_dict(ckpt["ema"])
    return run


def save_checkpoint(run: Run, path: Path) -> None:
    """Everything needed to resume and to audit: weights, optimizer, step, best, history, config.

    No RNG state: every batch reseeds its generators from (seed, epoch, batch) (schedule.py), so
    a resumed run needs none to repeat an uninterrupted one.
    """
    atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
                 "epoch": run.epoch, "best": run.best, "history": run.history, "classes": run.data.classes,
                 "config": asdict(run.cfg), "weights": run.weights.to_dict(),
                 **({"ema": run.ema.module.state_dict()} if run.ema is not None else {})}, path)


def student_file(run: Run, metrics: dict) -> StudentFile:
    """What model.pt holds besides the weights, with the label map eval needs."""
    cfg, data = run.cfg, run.data
    return StudentFile(run.student, list(data.classes), [normalise_teacher(t) for t in cfg.teachers],
                       dict(metrics), asdict(cfg), data.label_map.to_dict() if data.label_map else None,
                       weights=run.weights.to_dict())


def with_ema(run: Run, metrics: dict) -> tuple[torch.nn.Module, dict]:
    """With --ema, the EMA weights' validation figures join ``metrics`` as ema_*; returns (the
    weights that agree better with the teacher, their figures): what model.pt would keep."""
    if run.ema is None:
        return run.model, metrics
    averaged = evaluate(run, run.ema.module)
    metrics.update({f"ema_{k}": v for k, v in averaged.items()})
    ema_better = is_better(averaged, metrics)
    metrics["kept"] = "ema" if ema_better else "live"
    return (run.ema.module, {**metrics, **averaged}) if ema_better else (run.model, metrics)


def end_epoch(run: Run, metrics: dict, out: Path) -> None:
    """Record an epoch (every process; rank 0 writes): best model.pt, then last.pt, then the
    metrics line (a crash between the two files repeats the epoch on resume, which rewrites
    metrics.jsonl from last.pt)."""
    run.history.append(metrics)
    run.epoch = metrics["epoch"]
    model, kept = with_ema(run, metrics)
    better = run.cfg.keep == "last" or is_better(kept, run.best)  # last: every epoch replaces model.pt
    if better:
        run.best = {k: kept[k] for k in ("epoch", "val_agreement", "val_loss", "val_accuracy")}
        if run.ema is not None:
            run.best["weights"] = kept["kept"]
    if not run.ranks.main:
        return
    if better:
        save_student(out / MODEL_FILE, model, student_file(run, kept))
    save_checkpoint(run, out / CHECKPOINT_FILE)
    with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")


def summarize(run: Run, out: Path, seconds: float) -> dict:
    data, best, hist = run.data, run.best, run.history
    throughput = [m["images_per_s"] for m in hist]
    return {"out": str(out), "epochs": run.epoch, "best_epoch": best.get("epoch"),
            "val_accuracy": best.get("val_accuracy"), "agreement": best.get("val_agreement"),
            "val_loss": best.get("val_loss"), **({"kept": best.get("weights")} if run.ema is not None else {}),
            "images": {"train": int((~data.is_val).sum()), "val": int(data.is_val.sum())},
            **data.counts, "classes": len(data.classes),
            "teachers": [normalise_teacher(t) for t in run.cfg.teachers], "weights": run.weights.source,
            "unlabeled": run.cfg.unlabeled,  # what --unlabeled auto resolved to
            # how many images without an answer taught this run (FixMatch's all, or the pseudo-labelled)
            "unlabeled_used": len(run.unlabeled) if run.unlabeled is not None else data.counts.get("pseudo_labelled", 0),
            **({"unlabeled_passed": hist[-1].get("unlabeled_passed")} if run.unlabeled is not None and hist else {}),
            "seconds": round(seconds, 2), "images_per_s": round(float(np.mean(throughput)), 1) if throughput else None}


# -- the trainer -------------------------------------------------------------------------------


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict:
    """Train a student as ``cfg`` says; returns the summary (also what ``--json`` prints).

    Writes into the run folder: config.json, metrics.jsonl (one line per epoch), last.pt (every
    epoch, atomic), model.pt (best on validation, or the last epoch: --keep), curves.png (at the end). Under torchrun, every
    process calls this; rank 0 alone writes and reports ``progress``.
    """
    started = time.perf_counter()
    check_config(cfg)
    ranks = join_processes(cfg.device)
    try:
        with freed_memory_kept():
            return _train(cfg, ranks, progress if ranks.main else None, started)
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


@contextmanager
def freed_memory_kept():
    """While training, glibc's malloc keeps freed memory instead of giving it back to the system.

    A CPU step frees and reallocates ~1 GB of activations. By default glibc serves big blocks
    with mmap and trims the heap top, so every step page-faults much of it in again: measured
    ~110,000 faults and 0.2 s of kernel time per 1.1 s step (MobileNetV2 x0.5, 128 px, batch 64),
    20% slower than the same loop on in-memory tensors. With no mmap and no trimming: ~400 faults,
    for ~5% more peak memory. Restored (and the heap trimmed) afterwards. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        yield
        return
    kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield
    finally:
        if kept:  # glibc's defaults
            mallopt(M_MMAP_MAX, 65536)
            mallopt(M_TRIM_THRESHOLD, 128 * 1024)
            malloc_trim(0)


def _setup(cfg: TrainConfig, progress: Progress | None, device: torch.device | str = "auto",
           data: TrainData | None = None) -> tuple[TrainConfig, Path, TrainData]:
    """Rank 0's part: the run folder, the resolved configuration, the data (``device``: rank 0's,
    where the --pseudo-labels labeller runs)."""
    out = resolve_out(cfg)
    # A copy: the caller's object is left as it was given.
    cfg = replace(cfg, out=str(out), teachers=[normalise_teacher(t) for t in cfg.teachers])
    if cfg.resume and (out / CHECKPOINT_FILE).exists():
        cfg = resumed_config(cfg, load_checkpoint(out / CHECKPOINT_FILE), out)
    elif cfg.resume and (out / CONFIG_FILE).exists():  # killed while its labeller trained: the flags it began with
        cfg = resumed_config(cfg, {"config": json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))}, out)
    if data is None:  # Noisy Student's labeller is given the data its run already read
        data = prepare_data(cfg, progress)
    cfg = replace(cfg, unlabeled=resolve_unlabeled(cfg, data))
    if cfg.keep == "auto":  # config.TrainConfig.keep: last for both runs of Noisy Student (the labeller copies it)
        cfg = replace(cfg, keep="last" if cfg.unlabeled == "noisy" else "best")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # a kill mid-write (of a file this run may not write again)
    if cfg.pseudo_labels:
        data = add_pseudo_labels(data, cfg.pseudo_labels, out, cfg.resume, device)
    if cfg.unlabeled == "noisy" and not cfg.pseudo_labels:
        # The labeller trains first (_train); the epochs wait for the pseudo rows. The run's flags are
        # written now, so that --resume while the labeller trains keeps them.
        (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
        return cfg, out, data
    return with_epochs(cfg, data), out, data


def resolve_unlabeled(cfg: TrainConfig, data: TrainData) -> str:
    """What --unlabeled auto means for this data (config.NOISY_MIN_SHARE); other values as given."""
    if cfg.pseudo_labels:
        return "noisy"
    if cfg.unlabeled == "noisy" and not data.unlabeled:
        log.info("--unlabeled noisy: every image has a usable answer; trained on the answers only")
        return "off"
    if cfg.unlabeled != "auto":
        return cfg.unlabeled
    answered = len(data.shas)
    if data.unlabeled and len(data.unlabeled) >= NOISY_MIN_SHARE * answered:
        log.info("--unlabeled auto: %d unanswered images beside %d answered: Noisy Student (a labeller in %s first)",
                 len(data.unlabeled), answered, LABELLER_DIR)
        return "noisy"
    if data.unlabeled:
        log.info("--unlabeled auto: %d unanswered images, under %.0f%% of the %d answered: trained on the answers only",
                 len(data.unlabeled), 100 * NOISY_MIN_SHARE, answered)
    return "off"


def with_epochs(cfg: TrainConfig, data: TrainData) -> TrainConfig:
    """``cfg`` with --epochs resolved from the training rows when it was left out (config.auto_epochs)."""
    if cfg.epochs is not None:
        return cfg
    cfg = replace(cfg, epochs=auto_epochs(int((~data.is_val).sum()), cfg.batch_size))
    log.info("--epochs %d: about %d steps over %d training images (config.auto_epochs)", cfg.epochs,
             AUTO_STEPS, int((~data.is_val).sum()))
    check_config(cfg)
    return cfg


def train_labeller(cfg: TrainConfig, out: Path, data: TrainData, ranks: Ranks, progress: Progress | None) -> dict:
    """Noisy Student's first run: the same flags on the answers alone, in OUT/labeller (resumed when
    it has a checkpoint, read back when it has finished)."""
    folder = out / LABELLER_DIR
    labeller = replace(cfg, out=str(folder), unlabeled="off", pseudo_labels=None,
                       resume=(folder / CHECKPOINT_FILE).exists())
    if ranks.main:
        log.info("Noisy Student, run 1 of 2: the labeller, on the answered images, into %s", folder)
    tagged = progress and (lambda epoch, step, steps, info: progress(epoch, step, steps, {**info, "run": LABELLER_DIR}))
    # The same images and answers as the run's: no second scan of the folder and the store.
    return _train(labeller, ranks, tagged, time.perf_counter(), data)


def warm_start(labeller: Path, summary: dict) -> dict:
    """The flags that start Noisy Student's student from its labeller's weights (model.pt).

    Measured (Imagenette, 1,000 calls + 3,000 unanswered, x0.5 @112, random init): on seed 0, from
    the labeller 65.0%, from scratch 62.8%, the labeller alone 60.2%; over 3 seeds, with the final
    epoch kept (--keep auto), 63.1% from the labeller against 62.8% from scratch (an earlier
    session's runs): level within the spread, so this is a choice, not a win (BENCHMARKS.md). A
    random-init labeller's backbone trains at the full --lr as it did; one that started from
    ImageNet weights keeps --backbone-lr."""
    flags = {"init": str(labeller / MODEL_FILE)}
    if summary["weights"] == RANDOM.source:
        flags["backbone_lr"] = 1.0
    return flags


def _pixels(data: TrainData, size: int, ranks: Ranks, progress: Progress | None) -> np.ndarray:
    """The pixel cache: built by local rank 0 (one per machine) while the others wait, then read."""
    done = itertools.count(1)  # load_pixels reports one image at a time
    report = progress and (lambda _: progress(0, next(done), len(data.shas), {"phase": "pixels"}))
    pixels = load_pixels(data.shas, data.paths, size, progress=report) if ranks.local_rank == 0 else None
    if ranks.world > 1:
        dist.barrier()
    return load_pixels(data.shas, data.paths, size) if pixels is None else pixels


def dsd_phase(run: Run, epoch: int) -> str | None:
    """With --dsd, the phase of ``epoch``; entering the sparse phase (or resuming in it) prunes the
    smallest weights of each layer and holds them at zero, leaving it lets them train again."""
    cfg = run.cfg
    if not cfg.dsd:
        return None
    phase = dsd.phase_of(epoch, dsd.phase_epochs(cfg.epochs, tuple(cfg.dsd_phases) if cfg.dsd_phases else None))
    if phase == dsd.SPARSE and run.after_step is None:
        masks = dsd.magnitude_masks(run.model, cfg.dsd_sparsity)
        run.after_step = functools.partial(dsd.apply_masks, masks=masks)
        run.after_step(run.model)
        log.info("DSD: epoch %d prunes %.0f%% of every layer's weights", epoch, 100 * cfg.dsd_sparsity)
    elif phase != dsd.SPARSE:
        run.after_step = None
    return phase


def _train(cfg: TrainConfig, ranks: Ranks, progress: Progress | None, started: float,
           data: TrainData | None = None) -> dict:
    cfg, out, data = on_main(ranks, lambda: _setup(cfg, progress, ranks.device, data))
    if cfg.unlabeled == "noisy" and not cfg.pseudo_labels:
        labeller = train_labeller(cfg, out, data, ranks, progress)
        cfg = replace(cfg, pseudo_labels=str(out / LABELLER_DIR), **warm_start(out / LABELLER_DIR, labeller))
        data = on_main(ranks, lambda: add_pseudo_labels(data, cfg.pseudo_labels, out, cfg.resume, ranks.device))
        cfg = with_epochs(cfg, data)
        if ranks.main:
            log.info("Noisy Student, run 2 of 2: %d answered + %d pseudo-labelled images, into %s",
                     len(data.shas) - data.counts["pseudo_labelled"], data.counts["pseudo_labelled"], out)
    # cfg.resume may be set while only the labeller had started: this run then begins afresh.
    # Rank 0 decides for all (their --out may be another machine's folder).
    resume = on_main(ranks, lambda: cfg.resume and (out / CHECKPOINT_FILE).exists())
    ckpt = load_checkpoint(out / CHECKPOINT_FILE) if resume else None  # every rank: the same weights
    pixels = _pixels(data, cfg.image_size, ranks, progress)
    run = build_run(cfg, data, pixels, ckpt, ranks)
    if cfg.unlabeled == "fixmatch" and data.unlabeled:
        shas, paths = map(list, zip(*data.unlabeled))
        run.unlabeled = _pixels(replace(data, shas=shas, paths=paths), cfg.image_size, ranks, progress)
    if ranks.main:
        (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
        # From last.pt on resume: drops any line an interrupted epoch wrote after its checkpoint.
        (out / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in run.history), encoding="utf-8")
        log.info("training %s on %d images (%d validation), %d classes, %d process(es), into %s", cfg.student,
                 int((~data.is_val).sum()), int(data.is_val.sum()), len(data.classes), ranks.world, out)
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        phase = dsd_phase(run, epoch)
        metrics = {"epoch": epoch, **train_epoch(run, epoch, progress), **evaluate(run)}
        if phase:
            metrics.update(dsd_phase=phase, sparsity=round(dsd.sparsity(run.model), 4))
        if data.counts.get("pseudo_labelled"):  # Noisy Student: the unanswered images among the training rows
            metrics.update(unlabeled_used=data.counts["pseudo_labelled"])
        metrics.update(step=run.step, epoch_seconds=time.perf_counter() - epoch_started)
        end_epoch(run, metrics, out)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        if progress:
            progress(epoch, run.steps_per_epoch, run.steps_per_epoch, {"phase": "epoch", "epochs": cfg.epochs, **metrics})
    if ranks.main and run.history:
        from ..deploy.report import plot_curves  # matplotlib: imported only when needed

        plot_curves(run.history, out / CURVES_FILE)
    summary = summarize(run, out, time.perf_counter() - started)
    if cfg.pseudo_labels == str(out / LABELLER_DIR) and ranks.main:  # a resumed run too
        summary["labeller"] = labeller_summary(out / LABELLER_DIR)
    return summary


def labeller_summary(folder: Path) -> dict:
    """What Noisy Student's labeller scored, from its checkpoint (the seconds: its epochs')."""
    ckpt = load_checkpoint(folder / CHECKPOINT_FILE)
    best = ckpt["best"]
    return {"out": str(folder), "epochs": ckpt["epoch"], "best_epoch": best.get("epoch"),
            "val_accuracy": best.get("val_accuracy"), "agreement": best.get("val_agreement"),
            "seconds": round(sum(m["epoch_seconds"] for m in ckpt["history"]), 2)}
