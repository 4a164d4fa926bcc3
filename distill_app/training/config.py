"""The flags of ``distill train``: the configuration, its checks, and what ``--resume`` may change."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from students import PRETRAINED_MODES

from ..errors import DistillError
from ..teachers.spec import DEFAULT_LOCAL
from .losses import LOSSES

log = logging.getLogger(__name__)

# What --resume may change; the rest is the run's. accum_steps and the number of processes only
# change how each batch is cut up, not what it is.
RESUME_OVERRIDES = ("epochs", "device", "num_workers", "accum_steps", "compile")

# progress(epoch, step, steps, info): epoch 0 is preparation (info["phase"] "images" or
# "pixels"); epochs 1..N report "train" steps, then one "epoch" call with the epoch's metrics.
Progress = Callable[[int, int, int, dict], None]

KEEP = ("auto", "best", "last")  # --keep

# --label-map folders: the map `distill labels suggest` drafts from the class folders, applied as is
# (a map file of that name is ./folders).
FOLDERS = "folders"


@dataclass
class TrainConfig:
    """The flags of ``distill train`` (SPEC "Training"); written resolved to ``config.json``."""

    images: str
    db: str | None = None  # default: $DISTILL_DB or ./distill.db
    teachers: list[str] = field(default_factory=lambda: [DEFAULT_LOCAL])  # SPEC[@WEIGHT]
    label_map: str | None = None  # a TOML/JSON file, or FOLDERS
    other: bool = False
    max_classes: int | None = None
    student: str = "mobilenetv2"
    width: float = 1.0
    image_size: int = 224
    epochs: int | None = None  # None: auto_epochs(training images), resolved once the data is known
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
    pretrained: str = "auto"  # auto | on | off: ImageNet weights (students.pretrained)
    init: str | None = None  # a weights file to start from (may carry its normalize mean/std)
    # With pretrained weights (an init file too): the backbone's learning rate, times --lr; the new head
    # gets --lr. Measured (1,000 Imagenette calls, x1.0 at 112 px, ImageNet init, 10 epochs): 0.1 kept
    # 91.1% from epoch 1 on; 1.0 fell from 77% to 54% by epoch 3 and ended at 76.6% (BENCHMARKS.md).
    backbone_lr: float = 0.1
    accum_steps: int = 1  # forward passes per optimizer step: each sees batch_size / (processes * this)
    compile: bool = False  # torch.compile the student (falls back to eager, with a warning, if it fails)
    # DisturbLabel (losses.disturb_labels): this fraction of each batch's hard labels redrawn at random.
    disturb_label: float = 0.0
    # DSD (dsd.py): dense -> sparse at dsd_sparsity -> dense; dsd_phases: epochs of each (default thirds).
    dsd: bool = False
    dsd_sparsity: float = 0.5
    dsd_phases: list[int] | None = None
    # What model.pt holds: best, the epoch that agreed best with the teacher on the validation split
    # (SPEC: "best-on-validation kept"); last, the final epoch's weights (with --ema, the better of the
    # average and the live ones). Measured (Imagenette, x0.5 @112 random init, 40 epochs, 18 runs at 500
    # and 1,000 calls): last was +1.8 points better on held-out photos on average, better in 13 of 18:
    # with the cosine schedule the final weights are the settled ones, and a 45-image split picks noise.
    # auto: last for both runs of Noisy Student (--unlabeled noisy, resolved from auto), best otherwise.
    # Its student starts from its labeller and restarts the learning rate, so its early epochs sit near
    # the labeller and a ~100-image split picks among them by chance; the labeller's model.pt labels the
    # rest and starts the student, so it is the settled final epoch too (labeller alone, 3 seeds: final
    # 49.0% against best 46.5% at 500 calls, 58.8% against 58.6% at 1,000). Measured (1,000 calls +
    # 3,000 unanswered, 3 seeds): best 65.0 / 57.5 / 61.0%, last 64.4 / 63.8 / 61.1% (seed 1 kept epoch 2
    # of 25); the labeller alone 60.2 / 59.0 / 56.8% (BENCHMARKS.md, "Noisy Student by default").
    keep: str = "auto"
    # Random-resized crop of the training images: each a window of U(crop_scale, 1) of the area (aspect
    # 3/4..4/3) resized to --image-size, and flipped half the time (data.pixels.resized_crop_params).
    # 1.0: the shift-and-flip crop only (a reflect-padded shift of up to 1/8 of the side).
    crop_scale: float = 1.0
    # Mixup of images and their soft targets within each batch (losses.mixup): Beta(alpha, alpha); 0: off.
    mixup: float = 0.0
    # EMA of the weights (timm ModelEmaV3, with its warm-up), evaluated every epoch beside the live
    # weights; model.pt holds whichever agrees better with the teacher. 0: off.
    ema: float = 0.0
    # The images under --images with no usable answer (the budget did not reach them, or their answer
    # maps to no class). noisy: Noisy Student (pseudo.py): a first run on the answers alone (OUT/labeller)
    # labels them, then this run trains on both, starting from the first run's weights
    # (trainer.warm_start). fixmatch: consistency on them during this one run (unlabeled.py). auto: noisy
    # when they are at least NOISY_MIN_SHARE of the answered images, else off; the run's config.json
    # holds what auto resolved to. Measured (Imagenette, x0.5 @112, random init, 3 seeds, today's
    # defaults): 65.3% at 1,000 calls + 3,034 unanswered, +5.5 points over the supervised run
    # (--unlabeled off) and +3.5 over its labeller's final epoch; 52.9% at 500 + 3,516, +3.3 and +2.3;
    # FixMatch +0.4 at 1,000 (one seed, an older recipe) for 2.6x the time (BENCHMARKS.md).
    unlabeled: str = "auto"
    # A trained student (run folder or model.pt) whose soft predictions become the targets of the
    # images with no usable answer, which then train beside the answered ones (pseudo.py: Noisy Student).
    pseudo_labels: str | None = None


# --epochs left out: enough epochs for AUTO_STEPS optimizer steps, within [AUTO_MIN, AUTO_MAX].
# Measured (1,000 Imagenette calls, x0.5 at 112 px, random init): at 40 epochs (560 steps) the
# best epoch was the 39th of 40, still climbing, where the old default of 10 stopped at 140 steps.
# Doubling 1,500 steps to 3,000 (x0.5 @112, random init) lifted, at 1,000 calls over 3 seeds, the
# supervised run's final epoch from 58.8% to 61.8% and Noisy Student's student from 63.1% to 64.5%
# (a quarter of the spread; 65.3% once the labeller handed over its final epoch); at 4,000 calls
# 72.4% (one seed) to 75.2% +- 0.9 (3 seeds) (BENCHMARKS.md, "Longer training by default"). 3,000 steps of 64
# images are ~12 minutes on 2 CPU cores at 112 px, whatever the data size: 4,000 images get 53-55
# epochs, 1,000 get 200-215, 500 get 375-429 (the upper figures where some answers map to no class,
# as in the benchmark). The cap was 200 until measured at 500 calls over 3 seeds: 3,000
# steps instead of its 1,400 lifted the supervised run (best on val) from 46.5% +- 5.3 to 49.6% +- 2.9
# and Noisy Student's student from 51.5% +- 3.1 to 52.9% +- 2.2. The cap of 500 now only bounds the
# per-epoch validation and checkpoint of a run on a few hundred images or fewer.
AUTO_STEPS, AUTO_MIN, AUTO_MAX = 3000, 10, 500

UNLABELED = ("auto", "noisy", "fixmatch", "off")  # --unlabeled
# --unlabeled auto trains a second student (Noisy Student) only when the unanswered images are at least
# this share of the answered ones: a few stray photos are not worth doubling the training time for.
NOISY_MIN_SHARE = 0.25


def auto_epochs(n_train: int, batch_size: int) -> int:
    """Epochs for about AUTO_STEPS optimizer steps over ``n_train`` images, clamped."""
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return min(AUTO_MAX, max(AUTO_MIN, math.ceil(AUTO_STEPS / steps_per_epoch)))


def check_config(cfg: TrainConfig) -> None:
    """DistillError, echoing the value, for anything out of range."""
    checks = [
        (cfg.epochs is None or cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
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
        (cfg.pretrained in PRETRAINED_MODES, f"--pretrained must be one of {', '.join(PRETRAINED_MODES)}, "
                                             f"got {cfg.pretrained!r}"),
        (0 < cfg.backbone_lr <= 1, f"--backbone-lr must be in (0, 1] (a multiple of --lr), got {cfg.backbone_lr}"),
    ]
    checks += [
        (0 <= cfg.disturb_label < 1, f"--disturb-label must be in [0, 1), got {cfg.disturb_label}"),
        (not cfg.disturb_label or cfg.hard_weight > 0,
         f"--disturb-label {cfg.disturb_label} disturbs the hard-label term only: give it a weight with --hard-weight"),
        (cfg.keep in KEEP, f"--keep must be one of {', '.join(KEEP)}, got {cfg.keep!r}"),
        (0 < cfg.crop_scale <= 1, f"--crop-scale must be in (0, 1] (the smallest crop's share of the area), "
                                   f"got {cfg.crop_scale}"),
        (cfg.mixup >= 0, f"--mixup must be >= 0 (the Beta distribution's alpha), got {cfg.mixup}"),
        (cfg.unlabeled in UNLABELED, f"--unlabeled must be one of {', '.join(UNLABELED)}, got {cfg.unlabeled!r}"),
        (not (cfg.pseudo_labels and cfg.unlabeled in ("fixmatch", "off")),
         f"--pseudo-labels and --unlabeled {cfg.unlabeled} both decide what the unanswered images do: choose one"),
        (0 <= cfg.ema < 1, f"--ema must be in [0, 1) (the decay; 0 is off), got {cfg.ema}"),
        (0 < cfg.dsd_sparsity < 1, f"--dsd-sparsity must be between 0 and 1, got {cfg.dsd_sparsity}"),
        (cfg.dsd_phases is None or cfg.epochs is None or (cfg.dsd and len(cfg.dsd_phases) == 3
                                                          and min(cfg.dsd_phases) >= 1
                                                          and sum(cfg.dsd_phases) == cfg.epochs),
         f"--dsd-phases needs --dsd and three epoch counts of 1 or more adding up to --epochs {cfg.epochs}, "
         f"got {cfg.dsd_phases}"),
        (not cfg.dsd or cfg.dsd_phases is not None or cfg.epochs is None or cfg.epochs >= 3,
         f"--dsd needs --epochs 3 or more (dense, sparse, dense), got {cfg.epochs}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


def resumed_config(cfg: TrainConfig, ckpt: dict, out: Path) -> TrainConfig:
    """The checkpoint's configuration, with only RESUME_OVERRIDES taken from ``cfg``."""
    saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in fields(TrainConfig)}}
    if isinstance(saved.get("pretrained"), bool):  # runs from before auto|on|off
        saved["pretrained"] = "on" if saved["pretrained"] else "off"
    if saved.get("unlabeled") == "auto":  # runs from before noisy|fixmatch: auto was FixMatch (new runs save
        saved["unlabeled"] = "fixmatch"   # what auto resolved to)
    if saved.get("pseudo_labels") and saved.get("unlabeled") == "off":  # --pseudo-labels runs from then too
        saved["unlabeled"] = "noisy"
    given = {k: getattr(cfg, k) for k in RESUME_OVERRIDES if not (k == "epochs" and cfg.epochs is None)}
    merged = TrainConfig(**{**saved, **given, "resume": True, "out": str(out)})
    if merged.epochs != saved.get("epochs"):
        log.info("--resume with %d epochs instead of %s: the cosine schedule is stretched from here on",
                 merged.epochs, saved.get("epochs"))
    resolved = {"unlabeled": "auto", "pseudo_labels": None}  # what a run resolves by itself (trainer._setup)
    if merged.unlabeled == "noisy" and cfg.pseudo_labels is None:  # and its own labeller's warm start
        resolved.update(init=cfg.init, backbone_lr=cfg.backbone_lr)
    for f in fields(TrainConfig):
        if f.name in resolved and getattr(cfg, f.name) == resolved[f.name]:
            continue
        if f.name not in RESUME_OVERRIDES + ("resume", "out") and getattr(cfg, f.name) != getattr(merged, f.name):
            log.warning("--resume keeps the run's %s=%r (ignoring %r)", f.name, getattr(merged, f.name), getattr(cfg, f.name))
    return merged
