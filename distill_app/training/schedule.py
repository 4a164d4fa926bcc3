"""Who trains on what, and how fast: each epoch's shuffled batches cut into micro-batches, and the
learning-rate schedule; pure functions of (seed, epoch, batch), so a resumed run repeats exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.pixels import augment_params, resized_crop_params
from .config import TrainConfig
from .distributed import Ranks

MIN_LR_RATIO = 0.01  # the cosine schedule ends at 1% of the peak learning rate


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
    window: torch.Tensor | None = None  # (2, n) crop window sizes (--crop-scale < 1), else None: shifts only

    def augmentation(self) -> tuple:
        """What :func:`distill_app.data.pixels.crop_flip` takes after the pixels."""
        return (self.offsets, self.flip) if self.window is None else (self.offsets, self.flip, self.window)


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
        window = None
        if cfg.crop_scale < 1:
            offsets, flip, window = resized_crop_params(len(batch), cfg.image_size, generator, cfg.crop_scale)
        else:  # the shift-and-flip crop, drawn as before --crop-scale existed (runs repeat)
            offsets, flip = augment_params(len(batch), cfg.image_size, generator)
        cuts = np.array_split(np.arange(len(batch)), parts)
        for k in range(cfg.accum_steps):
            j = k * ranks.world + ranks.rank
            at = torch.from_numpy(cuts[j])
            weight = len(at) / len(batch) * ranks.world  # DDP divides the summed gradients by world
            plan.append(MicroBatch(batch[cuts[j]], offsets[:, at], flip[at], weight, _seed(cfg.seed, epoch, i, j),
                                   last=k == cfg.accum_steps - 1, window=None if window is None else window[:, at]))
    return plan


def get_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine down to 1% of it."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = base_lr * MIN_LR_RATIO
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)
