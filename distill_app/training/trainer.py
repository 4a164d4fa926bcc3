"""The trainer: the user's images + the teachers' stored answers -> a student run folder.

Reads top to bottom: configuration, data (images, answers, targets, split, pixels), processes
(torchrun), the per-epoch plan of micro-batches, the learning-rate schedule, one epoch,
evaluation, checkpoints, and :func:`train`, which strings them together. The harvest never
happens here: the store is only read.

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
import itertools
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

# GNU OpenMP (torch's CPU threads) spins at each of the hundreds of barriers in a step before it
# sleeps. On a CPU shared with anything else (other jobs, DataLoader workers, a second rank) the
# spinning thread burns the time slice the thread it waits for needs: 2 threads on 2 busy cores
# measured 5-10x slower per step than with PASSIVE, which was as fast as 1 thread there. libgomp
# reads this once, when torch loads it, so it only takes effect if nothing imported torch yet
# (the CLI); the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cache import StoreError, default_db_path, open_store  # noqa: E402
from students import StudentConfig, create_student  # noqa: E402

from .checkpoint import atomic_save, save_student  # noqa: E402
from .distributed import Ranks, all_sum, join_processes, on_main  # noqa: E402
from ..errors import DistillError  # noqa: E402
from ..data.images import scan_images as scan_images_in  # noqa: E402
from .losses import LOSSES, distill_loss  # noqa: E402
from ..data.pixels import PixelBatches, augment, augment_params, crop_padding, load_pixels, to_input  # noqa: E402,F401
from ..teachers.spec import DEFAULT_LOCAL, normalise_teacher, parse_teacher, stored_teacher  # noqa: E402,F401
from ..data.targets import (LabelMap, build_targets, default_classes, ensemble, hard_labels,  # noqa: E402
                      load_label_map, one_hot, teacher_argmax, with_other)

log = logging.getLogger(__name__)

CHECKPOINT, MODEL, METRICS, CONFIG, CURVES = "last.pt", "model.pt", "metrics.jsonl", "config.json", "curves.png"
LOG_EVERY = 10  # steps between loss values sent to progress: each .item() is a CPU-GPU sync point
MIN_LR_RATIO = 0.01  # the cosine schedule ends at 1% of the peak learning rate
# What --resume may change; the rest is the run's. accum_steps and the number of processes only
# change how each batch is cut up, not what it is.
RESUME_OVERRIDES = ("epochs", "device", "num_workers", "accum_steps", "compile")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt() parameters (malloc.h)

# progress(epoch, step, steps, info): epoch 0 is preparation (info["phase"] "images" or
# "pixels"); epochs 1..N report "train" steps, then one "epoch" call with the epoch's metrics.
Progress = Callable[[int, int, int, dict], None]


@dataclass
class TrainConfig:
    """The flags of ``distill train`` (SPEC "Training"); written resolved to ``config.json``."""

    images: str
    db: str | None = None  # default: $DISTILL_DB or ./distill.db
    teachers: list[str] = field(default_factory=lambda: [DEFAULT_LOCAL])  # SPEC[@WEIGHT]
    label_map: str | None = None
    other: bool = False
    max_classes: int | None = None
    student: str = "mobilenetv2"
    width: float = 1.0
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 64  # images per optimizer step, over all processes and accumulation steps
    lr: float = 2e-3  # peak, AdamW
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warm-up, then cosine; fractions allowed
    targets: str = "soft"  # soft | hard (one-hot teacher argmax: the baseline)
    loss: str = "mse"  # mse | kl
    temperature: float = 1.0
    hard_weight: float = 0.0
    out: str | None = None  # default runs/<student>-<n>, next free n
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    val_fraction: float = 0.1
    num_workers: int = 0
    pretrained: bool = False
    init: str | None = None
    accum_steps: int = 1  # forward passes per optimizer step: each sees batch_size / (processes * this)
    compile: bool = False  # torch.compile the student (falls back to eager, with a warning, if it fails)


def check_config(cfg: TrainConfig) -> None:
    """DistillError, echoing the value, for anything out of range."""
    checks = [
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"weight decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.warmup_epochs >= 0, f"warm-up epochs must be >= 0, got {cfg.warmup_epochs}"),
        (cfg.targets in ("soft", "hard"), f"--targets must be soft or hard, got {cfg.targets!r}"),
        (cfg.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}"),
        (cfg.temperature > 0, f"--temperature must be positive, got {cfg.temperature}"),
        (cfg.hard_weight >= 0, f"--hard-weight must be >= 0, got {cfg.hard_weight}"),
        (0 < cfg.val_fraction < 1, f"validation fraction must be between 0 and 1, got {cfg.val_fraction}"),
        (cfg.num_workers >= 0, f"--workers must be >= 0, got {cfg.num_workers}"),
        (cfg.accum_steps >= 1, f"--accum-steps must be at least 1, got {cfg.accum_steps}"),
        (cfg.max_classes is None or cfg.max_classes >= 2, f"--max-classes must be at least 2, got {cfg.max_classes}"),
        (bool(cfg.teachers), "at least one --teacher is needed"),
        (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


# -- data: images, answers, targets, split -----------------------------------------------------


@dataclass
class TrainData:
    """Every usable image, sorted by hash (so order never depends on the file system or DB)."""

    shas: list[str]
    paths: list[str]
    soft_targets: np.ndarray  # (N, C) float32, rows sum to 1 (teacher ensemble)
    hard_labels: np.ndarray  # (N,) int64: folder label when it names a class, else teacher argmax
    teacher_top1: np.ndarray  # (N,) int64 argmax of soft_targets
    is_val: np.ndarray  # (N,) bool
    classes: list[str]  # target columns (with "other" when asked)
    label_map: LabelMap | None  # the user's map, None for the teacher's own vocabulary
    counts: dict = field(default_factory=dict)  # skipped, unanswered, unmapped, labelled


def scan_images(root: str, progress: Progress | None) -> tuple[dict[str, tuple[str, str | None]], int]:
    """(sha256 -> (path, folder label), files skipped); the same content twice is one image."""
    report = progress and (lambda done, total: progress(0, done, total, {"phase": "images"}))
    scanned = scan_images_in(root, report)
    found = {i.sha256: (i.path, i.label) for i in scanned.distinct()}
    skipped = sum(scanned.skipped.values())
    if not found:
        raise DistillError(f"no usable images under {root} ({skipped} files skipped): check --images")
    return found, skipped


def read_answers(cfg: TrainConfig, shas: list[str]) -> list[tuple[str, float, str, dict]]:
    """Per teacher: (spec, weight, score kind, {sha256: [(label, score), ...]}) for ``shas``."""
    db = cfg.db or default_db_path()
    if not Path(db).exists():
        raise DistillError(f"database {db} not found: run `distill harvest --images {cfg.images}` first or pass --db")
    try:
        store = open_store(db)
    except StoreError as e:
        raise DistillError(str(e)) from None
    try:
        result = []
        for text in cfg.teachers:
            spec, weight = parse_teacher(text)
            row = stored_teacher(store, spec)
            answers = store.answers(row["id"], shas)
            if not answers:
                raise DistillError(f"no answers from teacher {spec} in {db} for the images under {cfg.images}: "
                                   f"run `distill harvest --images {cfg.images} --teacher {spec}` first")
            result.append((spec, weight, row["score_kind"], answers))
        return result
    finally:
        store.close()


def make_targets(cfg: TrainConfig, answers) -> tuple[list[str], np.ndarray, list[str], LabelMap | None]:
    """(shas, soft targets (N, C), target columns, the user's label map as used) from the answers."""
    if cfg.label_map:
        user_map = load_label_map(cfg.label_map)
        label_map = user_map = LabelMap(user_map.classes[:cfg.max_classes], user_map.sources[:cfg.max_classes])
    else:
        user_map = None
        label_map = LabelMap.identity(default_classes([a for *_, a in answers], cfg.max_classes))
    columns = with_other(label_map.classes, cfg.other)
    if len(columns) < 2:
        raise DistillError(f"targets have {len(columns)} class ({', '.join(columns) or 'none'}); "
                           "training needs at least 2: check --label-map, --max-classes or --other")
    parts = []
    for spec, weight, kind, teacher_answers in answers:
        shas, targets = build_targets(teacher_answers, kind, label_map, cfg.other)
        log.info("teacher %s: %d of %d answers map to the classes", spec, len(shas), len(teacher_answers))
        if shas:
            parts.append((shas, targets, weight))
    if not parts:
        where = f"the label map {cfg.label_map}" if cfg.label_map else "the class list"
        raise DistillError(f"no teacher answer maps to any class of {where}: "
                           "check its teacher labels (`distill cache labels`) or pass --other")
    shas, soft = ensemble(parts)
    return shas, soft, columns, user_map


def split_val(shas: list[str], fraction: float) -> np.ndarray:
    """(N,) bool: validation when int(sha[:8], 16) % 1000 < fraction * 1000 (stable across runs).

    A tiny set whose hashes all fall on one side lends its lowest (or highest) hash to the
    other side, so both are non-empty whenever there are two images.
    """
    key = np.array([int(s[:8], 16) % 1000 for s in shas], dtype=np.int64)
    is_val = key < fraction * 1000
    if len(shas) >= 2 and not is_val.any():
        is_val[int(key.argmin())] = True
    if len(shas) >= 2 and is_val.all():
        is_val[int(key.argmax())] = False
    return is_val


def prepare_data(cfg: TrainConfig, progress: Progress | None) -> TrainData:
    """Scan, match to answers, build targets and hard labels, split; every failure is a DistillError."""
    found, skipped = scan_images(cfg.images, progress)
    answers = read_answers(cfg, sorted(found))
    answered = set().union(*(a for *_, a in answers))
    shas, soft, columns, user_map = make_targets(cfg, answers)
    order = np.argsort(np.array(shas))
    shas, soft = [shas[i] for i in order], soft[order]
    if len(shas) < 2:
        raise DistillError(f"only {len(shas)} image has a usable teacher answer; training needs at least 2")
    folder = [found[s][1] for s in shas]
    hard = hard_labels(soft, columns, folder)
    folded = {c.casefold() for c in columns}
    labelled = sum(1 for f in folder if f is not None and f.casefold() in folded)
    counts = {"skipped": skipped, "unanswered": len(found) - len(answered),
              "unmapped": len(answered) - len(shas), "labelled": labelled}
    return TrainData(shas, [found[s][0] for s in shas], soft, hard, teacher_argmax(soft),
                     split_val(shas, cfg.val_fraction), columns, user_map, counts)


# -- batches: who trains on what ---------------------------------------------------------------


def epoch_batches(indices: np.ndarray, batch_size: int, seed: int, epoch: int, min_size: int = 2) -> list[np.ndarray]:
    """This epoch's shuffled batches of ``indices``; a last batch under ``min_size`` joins the one
    before (BatchNorm cannot train on a single image whose feature map is 1x1, and a batch cut
    into parts needs 2 images per part)."""
    order = np.random.default_rng([seed, epoch]).permutation(indices)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


@dataclass(frozen=True)
class MicroBatch:
    """One forward and backward pass of this process."""

    rows: np.ndarray  # (n,) int64 image indices, sorted (sequential reads from the pixel cache)
    offsets: torch.Tensor  # (2, n) crop offsets in pixels
    flip: torch.Tensor  # (n,) bool
    weight: float  # loss multiplier: the summed gradients are those of the whole batch's mean loss
    seed: int  # dropout
    last: bool  # the optimizer steps after this one


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def epoch_plan(cfg: TrainConfig, train_idx: np.ndarray, epoch: int, ranks: Ranks) -> list[MicroBatch]:
    """This process's micro-batches for ``epoch``, ``cfg.accum_steps`` per optimizer step.

    Every batch is cut into ``world * accum_steps`` parts; part ``k * world + rank`` is this
    process's k-th. Images, augmentation and dropout depend on (seed, epoch, batch, part) only,
    so the cut changes nothing but float rounding and BatchNorm statistics.
    """
    parts = ranks.world * cfg.accum_steps
    plan = []
    for i, batch in enumerate(epoch_batches(train_idx, cfg.batch_size, cfg.seed, epoch, min_size=2 * parts)):
        batch = np.sort(batch)
        generator = torch.Generator().manual_seed(_seed(cfg.seed, epoch, i))
        offsets, flip = augment_params(len(batch), cfg.image_size, generator)
        cuts = np.array_split(np.arange(len(batch)), parts)
        for k in range(cfg.accum_steps):
            j = k * ranks.world + ranks.rank
            at = torch.from_numpy(cuts[j])
            weight = len(at) / len(batch) * ranks.world  # DDP divides the summed gradients by world
            plan.append(MicroBatch(batch[cuts[j]], offsets[:, at], flip[at], weight, _seed(cfg.seed, epoch, i, j),
                                   last=k == cfg.accum_steps - 1))
    return plan


# -- schedule ----------------------------------------------------------------------------------


def get_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine down to 1% of it."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = base_lr * MIN_LR_RATIO
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


# -- one epoch, evaluation ---------------------------------------------------------------------


@dataclass
class Run:
    """The state one training run carries from epoch to epoch."""

    cfg: TrainConfig
    data: TrainData
    pixels: np.ndarray
    model: torch.nn.Module  # the student itself: evaluated, saved
    net: torch.nn.Module  # what the training steps call: the student, wrapped by DDP and/or torch.compile
    ddp: torch.nn.parallel.DistributedDataParallel | None  # the DDP wrapper, under torchrun
    optimizer: torch.optim.Optimizer
    ranks: Ranks
    targets: torch.Tensor  # (N, C) what the loss fits: soft targets or one-hot teacher argmax
    hard: torch.Tensor  # (N,) int64 hard labels
    top1: torch.Tensor  # (N,) int64 teacher argmax
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0  # last completed epoch
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    compiling: bool = False  # torch.compile not yet proven on a first step

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(~self.data.is_val)

    @property
    def val_idx(self) -> np.ndarray:
        return np.flatnonzero(self.data.is_val)

    def loss(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return distill_loss(logits, self.targets[idx], self.hard[idx], c.loss, c.temperature, c.hard_weight)

    def autocast(self):
        # bf16 on CUDA only (SPEC): on CPU, float32 keeps runs repeatable and bf16 buys little.
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda")


def micro_step(run: Run, micro: MicroBatch, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients add up (and DDP waits to all-reduce
    them) until ``micro.last``. Returns the micro-batch's mean loss."""
    torch.manual_seed(micro.seed)  # dropout
    x = x.to(run.device, non_blocking=True)
    if x.dtype == torch.uint8:  # a GPU gets uint8 (4x less to copy) and normalises it itself
        x = to_input(x)
    idx = idx.to(run.device, non_blocking=True)
    with run.ddp.no_sync() if run.ddp is not None and not micro.last else nullcontext():
        with run.autocast():
            logits = run.net(x)
        loss = run.loss(logits, idx)
        (loss * micro.weight).backward()
    return loss


def _compiled_step(run: Run, micro: MicroBatch, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The first step with torch.compile, where compilation happens: on failure, warn and go eager."""
    try:
        loss = micro_step(run, micro, x, idx)
    except Exception as e:  # dynamo, inductor, the C++ compiler: many types, one remedy
        message = (str(e).strip().splitlines() or [""])[0][:200]
        log.warning("--compile failed (%s: %s); training without torch.compile", type(e).__name__, message)
        run.net = getattr(run.net, "_orig_mod", run.net)
        run.optimizer.zero_grad(set_to_none=True)
        loss = micro_step(run, micro, x, idx)
    run.compiling = False
    return loss


def train_epoch(run: Run, epoch: int, progress: Progress | None) -> dict:
    """One pass over the training images; returns train_loss, lr, images_per_s (all processes)."""
    cfg, opt = run.cfg, run.optimizer
    plan = epoch_plan(cfg, run.train_idx, epoch, run.ranks)
    on_cuda = run.device.type == "cuda"
    loader = torch.utils.data.DataLoader(PixelBatches(run.pixels, [(m.rows, m.offsets, m.flip) for m in plan],
                                                      normalise=not on_cuda),
                                         batch_size=None, num_workers=cfg.num_workers, pin_memory=on_cuda)
    total_steps = cfg.epochs * run.steps_per_epoch
    warmup = min(total_steps, round(cfg.warmup_epochs * run.steps_per_epoch))
    run.model.train()
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no sync per step
    seen, lr, done, started = 0, cfg.lr, 0, time.perf_counter()
    steps = len(plan) // cfg.accum_steps
    for micro, (x, idx) in zip(plan, loader):
        lr = get_lr(run.step, total_steps, warmup, cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = (_compiled_step if run.compiling else micro_step)(run, micro, x, idx)
        loss_sum += loss.detach() * len(idx)
        seen += len(idx)
        if not micro.last:
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.step += 1
        done += 1
        if progress:
            info = {"phase": "train", "lr": lr}
            if done % LOG_EVERY == 0 or done == steps:
                info["loss"] = loss.item()  # CPU-GPU sync point, hence only every LOG_EVERY steps
            progress(epoch, done, steps, info)
    seconds = time.perf_counter() - started
    loss_total, images = all_sum(run.ranks, [loss_sum.item(), seen])
    return {"train_loss": loss_total / max(images, 1), "lr": lr,
            "images_per_s": images / max(seconds, 1e-9), "train_seconds": seconds}


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """val_loss (same loss as training), val_accuracy (vs hard labels), val_agreement (vs teacher
    top-1); each process evaluates its share of the validation images with rank 0's BatchNorm
    statistics (those saved), and the sums are added up."""
    run.model.eval()
    ranks = run.ranks
    if ranks.world > 1:
        for buffer in run.model.buffers():
            dist.broadcast(buffer, src=0)
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    agree = torch.zeros((), dtype=torch.int64, device=run.device)
    val = run.val_idx[ranks.rank::ranks.world]
    chunk = 2 * max(1, run.cfg.batch_size // (ranks.world * run.cfg.accum_steps))  # no gradients: 2x
    for start in range(0, len(val), chunk):
        idx_np = val[start:start + chunk]
        x = to_input(torch.from_numpy(run.pixels[idx_np]).to(run.device))
        idx = torch.from_numpy(idx_np).to(run.device)
        with run.autocast():
            logits = run.model(x)
        loss_sum += run.loss(logits, idx) * len(idx)
        pred = logits.argmax(dim=1)
        correct += (pred == run.hard[idx]).sum()
        agree += (pred == run.top1[idx]).sum()
    loss, right, agreed = all_sum(ranks, [loss_sum.item(), correct.item(), agree.item()])
    n = max(len(run.val_idx), 1)
    return {"val_loss": loss / n, "val_accuracy": right / n, "val_agreement": agreed / n}


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
    if cfg.resume and not (out / CHECKPOINT).exists():
        raise DistillError(f"nothing to resume in {out}: no {CHECKPOINT}; drop --resume to start a new run")
    if not cfg.resume and (out / CHECKPOINT).exists():
        raise DistillError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    return out


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"cannot read checkpoint {path} ({type(e).__name__}): start a new run with another --out") from None


def resumed_config(cfg: TrainConfig, ckpt: dict, out: Path) -> TrainConfig:
    """The checkpoint's configuration, with only RESUME_OVERRIDES taken from ``cfg``."""
    saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in fields(TrainConfig)}}
    merged = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}, "resume": True, "out": str(out)})
    if cfg.epochs != saved.get("epochs"):
        log.info("--resume with %d epochs instead of %s: the cosine schedule is stretched from here on",
                 cfg.epochs, saved.get("epochs"))
    for f in fields(TrainConfig):
        if f.name not in RESUME_OVERRIDES + ("resume", "out") and getattr(cfg, f.name) != getattr(merged, f.name):
            log.warning("--resume keeps the run's %s=%r (ignoring %r)", f.name, getattr(merged, f.name), getattr(cfg, f.name))
    return merged


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; as nanoGPT, weight decay on weight matrices and kernels only, never on norms and biases.
    The fused kernel (CPU and CUDA) does the whole update in one pass: ~4x faster than the loop."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, ranks: Ranks):
    """(what the training steps call, the DDP wrapper or None): DistributedDataParallel under
    torchrun, then torch.compile if asked."""
    ddp = None
    if ranks.world > 1:
        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    net = model if ddp is None else ddp
    if cfg.compile:
        net = torch.compile(net)  # compiles lazily: failures surface in the first step (_compiled_step)
    return net, ddp


def build_run(cfg: TrainConfig, data: TrainData, pixels: np.ndarray, ckpt: dict | None, ranks: Ranks) -> Run:
    """Model, optimizer and device tensors; restored from ``ckpt`` when resuming."""
    device = ranks.device
    n_train, parts = int((~data.is_val).sum()), ranks.world * cfg.accum_steps
    if min(n_train, cfg.batch_size) < 2 * parts:
        raise DistillError(f"--batch-size {cfg.batch_size} with {n_train} training images cannot be cut into "
                           f"{ranks.world} processes x {cfg.accum_steps} accumulation steps of 2 images or more: "
                           f"use --batch-size >= {2 * parts} (and as many images), or fewer --accum-steps")
    torch.manual_seed(cfg.seed)  # the initial weights
    try:
        model = create_student(cfg.student, len(data.classes), cfg.width, cfg.image_size, cfg.pretrained, cfg.init)
    except ValueError as e:
        raise DistillError(str(e)) from None
    model = model.to(device, memory_format=torch.channels_last)
    if ckpt is not None:
        if ckpt["classes"] != data.classes:
            raise DistillError(f"the classes differ from the checkpoint's in {cfg.out} (new answers or label map?): "
                               "start a new run with another --out")
        model.load_state_dict(ckpt["model"])
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    targets = data.soft_targets if cfg.targets == "soft" else one_hot(data.teacher_top1, len(data.classes))
    run = Run(cfg, data, pixels, model, *wrap_model(model, cfg, ranks), optimizer, ranks,
              torch.from_numpy(targets).to(device), torch.from_numpy(data.hard_labels).to(device),
              torch.from_numpy(data.teacher_top1).to(device), compiling=cfg.compile,
              steps_per_epoch=len(epoch_batches(np.arange(n_train), cfg.batch_size, 0, 0, min_size=2 * parts)))
    if ckpt is not None:
        run.step, run.epoch, run.best, run.history = ckpt["step"], ckpt["epoch"], ckpt["best"], ckpt["history"]
    return run


def save_checkpoint(run: Run, path: Path) -> None:
    """Everything needed to resume and to audit: weights, optimizer, step, best, history, config."""
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
                 "epoch": run.epoch, "best": run.best, "history": run.history, "classes": run.data.classes,
                 "config": asdict(run.cfg), "rng": rng}, path)


def student_meta(run: Run, metrics: dict) -> dict:
    """The model.pt metadata (layout in checkpoint.py), plus the label map eval needs."""
    cfg = run.cfg
    student = StudentConfig(cfg.student, len(run.data.classes), cfg.width, cfg.image_size)
    return {"student": student.to_dict(), "classes": list(run.data.classes),
            "teachers": [normalise_teacher(t) for t in cfg.teachers], "metrics": dict(metrics),
            "config": asdict(cfg), "label_map": run.data.label_map.to_dict() if run.data.label_map else None}


def end_epoch(run: Run, metrics: dict, out: Path) -> None:
    """Record an epoch (every process; rank 0 writes): best model.pt, then last.pt, then the
    metrics line (a crash between the two files repeats the epoch on resume, which rewrites
    metrics.jsonl from last.pt)."""
    run.history.append(metrics)
    run.epoch = metrics["epoch"]
    better = is_better(metrics, run.best)
    if better:
        run.best = {k: metrics[k] for k in ("epoch", "val_agreement", "val_loss", "val_accuracy")}
    if not run.ranks.main:
        return
    if better:
        save_student(out / MODEL, run.model, student_meta(run, metrics))
    save_checkpoint(run, out / CHECKPOINT)
    with open(out / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")


def summarize(run: Run, out: Path, seconds: float) -> dict:
    data, best, hist = run.data, run.best, run.history
    throughput = [m["images_per_s"] for m in hist]
    return {"out": str(out), "epochs": run.epoch, "best_epoch": best.get("epoch"),
            "val_accuracy": best.get("val_accuracy"), "agreement": best.get("val_agreement"),
            "val_loss": best.get("val_loss"),
            "images": {"train": int((~data.is_val).sum()), "val": int(data.is_val.sum())},
            **data.counts, "classes": len(data.classes),
            "teachers": [normalise_teacher(t) for t in run.cfg.teachers],
            "seconds": round(seconds, 2), "images_per_s": round(float(np.mean(throughput)), 1) if throughput else None}


# -- the trainer -------------------------------------------------------------------------------


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict:
    """Train a student as ``cfg`` says; returns the summary (also what ``--json`` prints).

    Writes into the run folder: config.json, metrics.jsonl (one line per epoch), last.pt (every
    epoch, atomic), model.pt (best on validation), curves.png (at the end). Under torchrun, every
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


def _setup(cfg: TrainConfig, progress: Progress | None) -> tuple[TrainConfig, Path, TrainData]:
    """Rank 0's part: the run folder, the resolved configuration, the data."""
    out = resolve_out(cfg)
    # A copy: the caller's object is left as it was given.
    cfg = replace(cfg, out=str(out), teachers=[normalise_teacher(t) for t in cfg.teachers])
    if cfg.resume:
        cfg = resumed_config(cfg, load_checkpoint(out / CHECKPOINT), out)
    data = prepare_data(cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, out, data


def _pixels(data: TrainData, size: int, ranks: Ranks, progress: Progress | None) -> np.ndarray:
    """The pixel cache: built by local rank 0 (one per machine) while the others wait, then read."""
    done = itertools.count(1)  # load_pixels reports one image at a time
    report = progress and (lambda _: progress(0, next(done), len(data.shas), {"phase": "pixels"}))
    pixels = load_pixels(data.shas, data.paths, size, progress=report) if ranks.local_rank == 0 else None
    if ranks.world > 1:
        dist.barrier()
    return load_pixels(data.shas, data.paths, size) if pixels is None else pixels


def _train(cfg: TrainConfig, ranks: Ranks, progress: Progress | None, started: float) -> dict:
    cfg, out, data = on_main(ranks, lambda: _setup(cfg, progress))
    ckpt = load_checkpoint(out / CHECKPOINT) if cfg.resume else None  # every rank: the same weights
    pixels = _pixels(data, cfg.image_size, ranks, progress)
    run = build_run(cfg, data, pixels, ckpt, ranks)
    if ranks.main:
        (out / CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
        # From last.pt on resume: drops any line an interrupted epoch wrote after its checkpoint.
        (out / METRICS).write_text("".join(json.dumps(m) + "\n" for m in run.history), encoding="utf-8")
        log.info("training %s on %d images (%d validation), %d classes, %d process(es), into %s", cfg.student,
                 int((~data.is_val).sum()), int(data.is_val.sum()), len(data.classes), ranks.world, out)
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        metrics = {"epoch": epoch, **train_epoch(run, epoch, progress), **evaluate(run)}
        metrics.update(step=run.step, epoch_seconds=time.perf_counter() - epoch_started)
        end_epoch(run, metrics, out)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        if progress:
            progress(epoch, run.steps_per_epoch, run.steps_per_epoch, {"phase": "epoch", **metrics})
    if ranks.main and run.history:
        from ..deploy.report import plot_curves  # matplotlib: imported only when needed

        plot_curves(run.history, out / CURVES)
    return summarize(run, out, time.perf_counter() - started)
