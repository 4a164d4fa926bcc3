"""The trainer: the user's images + the teachers' stored answers -> a student run folder.

Reads top to bottom: configuration, data (images, answers, targets, split, pixels), batches and
augmentation, the learning-rate schedule, one epoch, evaluation, checkpoints, and :func:`train`,
which strings them together. The harvest never happens here: the store is only read.

Repeatability: every epoch draws its order, augmentation and dropout from generators seeded by
``(seed, epoch)``, so a run resumed from ``last.pt`` computes exactly what an uninterrupted run
would have (on CPU; CUDA kernels are not all deterministic).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cache import StoreError, default_db_path, open_store
from students import STUDENT_MEAN, STUDENT_STD, StudentConfig, create_student

from .checkpoint import atomic_save, save_student
from .device import resolve_device
from .errors import DistillError
from .images import Skip, load, scan
from .losses import LOSSES, distill_loss
from .pixels import load_pixels
from .teachers.resolve import canonical_spec, stored_teacher
from .targets import (LabelMap, build_targets, default_classes, ensemble, hard_labels, load_label_map,
                      one_hot, teacher_argmax, with_other)

log = logging.getLogger(__name__)

CHECKPOINT, MODEL, METRICS, CONFIG, CURVES = "last.pt", "model.pt", "metrics.jsonl", "config.json", "curves.png"
LOG_EVERY = 10  # steps between loss values sent to progress: each .item() is a CPU-GPU sync point
MIN_LR_RATIO = 0.01  # the cosine schedule ends at 1% of the peak learning rate
RESUME_OVERRIDES = ("epochs", "device", "num_workers")  # what --resume may change; the rest is the run's

# progress(epoch, step, steps, info): epoch 0 is preparation (info["phase"] "images" or
# "pixels"); epochs 1..N report "train" steps, then one "epoch" call with the epoch's metrics.
Progress = Callable[[int, int, int, dict], None]


@dataclass
class TrainConfig:
    """The flags of ``distill train`` (SPEC "Training"); written resolved to ``config.json``."""

    images: str
    db: str | None = None  # default: $DISTILL_DB or ./distill.db
    teachers: list[str] = field(default_factory=lambda: ["local:efficientnet_lite0"])  # SPEC[@WEIGHT]
    label_map: str | None = None
    other: bool = False
    max_classes: int | None = None
    student: str = "mobilenetv2"
    width: float = 1.0
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 64
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
        (cfg.max_classes is None or cfg.max_classes >= 2, f"--max-classes must be at least 2, got {cfg.max_classes}"),
        (bool(cfg.teachers), "at least one --teacher is needed"),
        (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


def parse_teacher(text: str) -> tuple[str, float]:
    """``"SPEC"`` or ``"SPEC@WEIGHT"`` -> (stored spec, weight); ``local`` is ``local:efficientnet_lite0``.

    Unlike ``teachers.resolve.parse_weighted``, an ``@`` followed by something that is not a
    number is part of the spec (``torchscript:/models@v2/m.pt``), not a bad weight.
    """
    text = text.strip()
    spec, at, weight = text.rpartition("@")
    try:
        w = float(weight) if at else None
    except ValueError:  # an "@" that is part of the spec (a path), not a weight
        w = None
    if w is None:
        spec, w = text, 1.0
    if not (w > 0 and math.isfinite(w)):
        raise DistillError(f"teacher weight must be a positive number, got {text!r}")
    if not spec:
        raise DistillError(f"empty teacher spec in {text!r}")
    return canonical_spec(spec), w


def teacher_label(spec: str, weight: float) -> str:
    return spec if weight == 1.0 else f"{spec}@{weight:g}"


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
    if not Path(root).is_dir():
        raise DistillError(f"--images {root} is not a folder")
    files, skips = scan(root)
    found: dict[str, tuple[str, str | None]] = {}
    skipped = len(skips)
    # Threads: reading and hashing release the GIL; decoding (the check) partly does.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, item in enumerate(pool.map(_hash_one, files)):
            if isinstance(item, Skip):
                skipped += 1
                log.debug("skipped %s: %s", item.path, item.reason)
            else:
                found.setdefault(item[0], item[1:])
            if progress:
                progress(0, i + 1, len(files), {"phase": "images"})
    if not found:
        raise DistillError(f"no usable images under {root} ({skipped} files skipped): check --images")
    return found, skipped


def _hash_one(file):
    loaded = load(file)
    return loaded if isinstance(loaded, Skip) else (loaded.sha256, loaded.path, loaded.label)


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


# -- batches and augmentation ------------------------------------------------------------------


def epoch_batches(indices: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This epoch's shuffled batches of ``indices``; a last batch of one joins the one before
    (BatchNorm cannot train on a single image whose feature map is 1x1)."""
    order = np.random.default_rng([seed, epoch]).permutation(indices)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


class PixelBatches(torch.utils.data.Dataset):
    """Batch i as ((B, S, S, 3) uint8, (B,) int64 indices). Workers reopen the memory-mapped
    file rather than receive a pickled copy of the whole array."""

    def __init__(self, pixels: np.ndarray, batches: list[np.ndarray]):
        self.file = getattr(pixels, "filename", None)
        self.pixels = pixels
        self.batches = batches

    def __getstate__(self):
        return {**self.__dict__, "pixels": None if self.file else self.pixels}

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        if self.pixels is None:
            self.pixels = np.load(self.file, mmap_mode="r")
        idx = self.batches[i]
        return torch.from_numpy(np.asarray(self.pixels[idx])), torch.from_numpy(idx.astype(np.int64))


def crop_padding(size: int) -> int:
    """Reflect padding of the random crop: 1/8 of the side, at least 4 px (less than the side)."""
    return min(max(4, size // 8), size - 1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (reflect-padded) and horizontal flip of a (B, S, S, 3) uint8 batch, batched.

    One gather per batch: the crop window and the flip become row/column index tables, and
    reflection is index arithmetic, so the uint8 batch is never padded or looped over.
    """
    b, s = x.shape[0], x.shape[1]
    pad = crop_padding(s)
    offsets = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=generator) - pad
    flip = torch.rand(b, generator=generator) < 0.5
    base = torch.arange(s)[None, :]
    rows, cols = _reflect(base + offsets[0], s), _reflect(base + offsets[1], s)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return x[batch, rows[:, :, None], cols[:, None, :]]


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back in (edge pixel not repeated, as ``mode="reflect"``)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised with STUDENT_MEAN/STD, channels_last."""
    mean = torch.tensor(STUDENT_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STUDENT_STD, device=x.device).view(1, 3, 1, 1) * 255
    # NHWC permuted to NCHW is already channels_last in memory: no copy.
    x = x.permute(0, 3, 1, 2).float()
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


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
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    targets: torch.Tensor  # (N, C) what the loss fits: soft targets or one-hot teacher argmax
    hard: torch.Tensor  # (N,) int64 hard labels
    top1: torch.Tensor  # (N,) int64 teacher argmax
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0  # last completed epoch
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

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


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def train_epoch(run: Run, epoch: int, progress: Progress | None) -> dict:
    """One pass over the training images; returns train_loss, lr, images_per_s."""
    cfg, model, opt = run.cfg, run.model, run.optimizer
    generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
    torch.manual_seed(_epoch_seed(cfg.seed, epoch))  # dropout draws from the global generator
    batches = epoch_batches(run.train_idx, cfg.batch_size, cfg.seed, epoch)
    loader = torch.utils.data.DataLoader(PixelBatches(run.pixels, batches), batch_size=None,
                                         num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda")
    total_steps = cfg.epochs * run.steps_per_epoch
    warmup = min(total_steps, round(cfg.warmup_epochs * run.steps_per_epoch))
    model.train()
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no sync per step
    seen, lr, started = 0, cfg.lr, time.perf_counter()
    for i, (x, idx) in enumerate(loader):
        lr = get_lr(run.step, total_steps, warmup, cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x = to_input(augment(x.to(run.device, non_blocking=True), generator))
        idx = idx.to(run.device, non_blocking=True)
        with run.autocast():
            logits = model(x)
        loss = run.loss(logits, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step += 1
        loss_sum += loss.detach() * len(idx)
        seen += len(idx)
        if progress:
            info = {"phase": "train", "lr": lr}
            if (i + 1) % LOG_EVERY == 0 or i + 1 == len(batches):
                info["loss"] = loss.item()  # CPU-GPU sync point, hence only every LOG_EVERY steps
            progress(epoch, i + 1, len(batches), info)
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum.item() / max(seen, 1), "lr": lr,
            "images_per_s": seen / max(seconds, 1e-9), "train_seconds": seconds}


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """val_loss (same loss as training), val_accuracy (vs hard labels), val_agreement (vs teacher top-1)."""
    run.model.eval()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    agree = torch.zeros((), dtype=torch.int64, device=run.device)
    val = run.val_idx
    for start in range(0, len(val), 2 * run.cfg.batch_size):
        idx_np = val[start:start + 2 * run.cfg.batch_size]
        x = to_input(torch.from_numpy(np.asarray(run.pixels[idx_np])).to(run.device))
        idx = torch.from_numpy(idx_np).to(run.device)
        with run.autocast():
            logits = run.model(x)
        loss_sum += run.loss(logits, idx) * len(idx)
        pred = logits.argmax(dim=1)
        correct += (pred == run.hard[idx]).sum()
        agree += (pred == run.top1[idx]).sum()
    n = max(len(val), 1)
    return {"val_loss": loss_sum.item() / n, "val_accuracy": correct.item() / n, "val_agreement": agree.item() / n}


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


def build_run(cfg: TrainConfig, data: TrainData, pixels: np.ndarray, ckpt: dict | None) -> Run:
    """Model, optimizer and device tensors; restored from ``ckpt`` when resuming."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the initial weights
    try:
        model = create_student(cfg.student, len(data.classes), cfg.width, cfg.image_size, cfg.pretrained, cfg.init)
    except ValueError as e:
        raise DistillError(str(e)) from None
    model = model.to(device, memory_format=torch.channels_last)
    # As nanoGPT: weight decay on weight matrices and kernels only, never on norms and biases.
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    targets = data.soft_targets if cfg.targets == "soft" else one_hot(data.teacher_top1, len(data.classes))
    n_train = int((~data.is_val).sum())
    run = Run(cfg, data, pixels, model, optimizer, device, torch.from_numpy(targets).to(device),
              torch.from_numpy(data.hard_labels).to(device), torch.from_numpy(data.teacher_top1).to(device),
              steps_per_epoch=len(epoch_batches(np.arange(n_train), cfg.batch_size, 0, 0)))
    if ckpt is not None:
        if ckpt["classes"] != data.classes:
            raise DistillError(f"the classes differ from the checkpoint's in {cfg.out} (new answers or label map?): "
                               "start a new run with another --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
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
            "teachers": [teacher_label(*parse_teacher(t)) for t in cfg.teachers], "metrics": dict(metrics),
            "config": asdict(cfg), "label_map": run.data.label_map.to_dict() if run.data.label_map else None}


def end_epoch(run: Run, metrics: dict, out: Path) -> None:
    """Record an epoch: best model.pt, then last.pt, then the metrics line (a crash between the
    two files repeats the epoch on resume, which rewrites metrics.jsonl from last.pt)."""
    run.history.append(metrics)
    run.epoch = metrics["epoch"]
    if is_better(metrics, run.best):
        run.best = {k: metrics[k] for k in ("epoch", "val_agreement", "val_loss", "val_accuracy")}
        save_student(out / MODEL, run.model, student_meta(run, metrics))
    save_checkpoint(run, out / CHECKPOINT)
    with open(out / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss (train, val) and accuracy (val vs hard labels, agreement with teacher) per epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    loss_ax.plot(epochs, [m["val_loss"] for m in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.plot(epochs, [m["val_accuracy"] for m in history], "o-", label="accuracy (hard labels)")
    acc_ax.plot(epochs, [m["val_agreement"] for m in history], "o-", label="agreement with teacher")
    acc_ax.set(xlabel="epoch", ylabel="fraction", title="Validation", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarize(run: Run, out: Path, seconds: float) -> dict:
    data, best, hist = run.data, run.best, run.history
    throughput = [m["images_per_s"] for m in hist]
    return {"out": str(out), "epochs": run.epoch, "best_epoch": best.get("epoch"),
            "val_accuracy": best.get("val_accuracy"), "agreement": best.get("val_agreement"),
            "val_loss": best.get("val_loss"),
            "images": {"train": int((~data.is_val).sum()), "val": int(data.is_val.sum())},
            **data.counts, "classes": len(data.classes),
            "teachers": [teacher_label(*parse_teacher(t)) for t in run.cfg.teachers],
            "seconds": round(seconds, 2), "images_per_s": round(float(np.mean(throughput)), 1) if throughput else None}


# -- the trainer -------------------------------------------------------------------------------


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict:
    """Train a student as ``cfg`` says; returns the summary (also what ``--json`` prints).

    Writes into the run folder: config.json, metrics.jsonl (one line per epoch), last.pt (every
    epoch, atomic), model.pt (best on validation), curves.png (at the end).
    """
    started = time.perf_counter()
    check_config(cfg)
    out = resolve_out(cfg)
    # A copy: the caller's object is left as it was given.
    cfg = replace(cfg, out=str(out), teachers=[teacher_label(*parse_teacher(t)) for t in cfg.teachers])
    ckpt = load_checkpoint(out / CHECKPOINT) if cfg.resume else None
    if ckpt is not None:
        cfg = resumed_config(cfg, ckpt, out)
    data = prepare_data(cfg, progress)
    done = itertools.count(1)  # load_pixels reports one image at a time
    pixels = load_pixels(data.shas, data.paths, cfg.image_size, progress=progress and (
        lambda _: progress(0, next(done), len(data.shas), {"phase": "pixels"})))
    out.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, data, pixels, ckpt)
    (out / CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
    # From last.pt on resume: drops any line an interrupted epoch wrote after its checkpoint.
    (out / METRICS).write_text("".join(json.dumps(m) + "\n" for m in run.history), encoding="utf-8")
    log.info("training %s on %d images (%d validation), %d classes, into %s",
             cfg.student, int((~data.is_val).sum()), int(data.is_val.sum()), len(data.classes), out)
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        metrics = {"epoch": epoch, **train_epoch(run, epoch, progress), **evaluate(run)}
        metrics.update(step=run.step, epoch_seconds=time.perf_counter() - epoch_started)
        end_epoch(run, metrics, out)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        if progress:
            progress(epoch, run.steps_per_epoch, run.steps_per_epoch, {"phase": "epoch", **metrics})
    if run.history:
        plot_curves(run.history, out / CURVES)
    return summarize(run, out, time.perf_counter() - started)
