"""One epoch of distillation and one validation pass over a :class:`Run` (model, optimizer, data):
the loop both ``distill train`` and ``distill prune``'s fine-tuning go through."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from students import StudentConfig, Weights, classifier_prefix
from students.pretrained import RANDOM

from ..data.pixels import PixelBatches, to_input
from ..data.targets import one_hot
from ..errors import DistillError, one_line
from .config import Progress, TrainConfig
from .data import TrainData
from .distributed import Ranks, all_sum
from . import unlabeled as semi
from .losses import distill_loss, disturb_labels, mixup
from .schedule import MicroBatch, epoch_batches, epoch_plan, get_lr

log = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between loss values sent to progress: each .item() is a CPU-GPU sync point


@dataclass
class Run:
    """The state one training run carries from epoch to epoch."""

    cfg: TrainConfig
    data: TrainData
    pixels: np.ndarray
    student: StudentConfig  # what the model is; its mean/std normalise the input
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
    # Called after every optimizer step: a constraint on the weights (DSD's masks, compress's shared weights).
    after_step: Callable[[torch.nn.Module], None] | None = None
    weights: Weights = RANDOM  # where the initial weights came from (recorded in model.pt and last.pt)
    ema: torch.nn.Module | None = None  # timm ModelEmaV3 of model (--ema); its .module is the averaged student
    unlabeled: np.ndarray | None = None  # (U, S, S, 3) uint8 pixels of the images without an answer (--unlabeled)
    unlabeled_counts: torch.Tensor | None = None  # this epoch's (seen, passed the mask), on the device

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(~self.data.is_val)

    @property
    def val_idx(self) -> np.ndarray:
        return np.flatnonzero(self.data.is_val)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> the student's normalised float input."""
        return to_input(x, mean=self.student.mean, std=self.student.std)

    def hard_labels(self, idx: torch.Tensor, seed: int | None) -> torch.Tensor:
        """The images' hard labels; with a ``seed`` (training steps), --disturb-label redraws some."""
        hard = self.hard[idx]
        if seed is not None and self.cfg.disturb_label:
            hard = disturb_labels(hard, self.targets.shape[1], self.cfg.disturb_label, torch.Generator().manual_seed(seed))
        return hard

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, seed: int | None = None,
             targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The batch's loss; with a ``seed`` (training steps), --disturb-label redraws hard labels.
        ``targets``: (soft, hard) to use instead of the images' own (mixup's mixed ones)."""
        c = self.cfg
        soft, hard = targets if targets is not None else (self.targets[idx], self.hard_labels(idx, seed))
        return distill_loss(logits, soft, hard, c.loss, c.temperature, c.hard_weight)

    def mixed(self, x: torch.Tensor, idx: torch.Tensor, seed: int):
        """--mixup: (mixed input, (soft, hard) targets mixed alike), the weight drawn from
        Beta(alpha, alpha) seeded per micro-batch (resume repeats it); --disturb-label first
        redraws the hard labels, as it would unmixed."""
        lam = float(np.random.default_rng(seed).beta(self.cfg.mixup, self.cfg.mixup))
        x, soft, hard = mixup(x, self.targets[idx], self.hard_labels(idx, seed), lam)
        return x, (soft, hard)

    def autocast(self):
        # bf16 on CUDA only (SPEC): on CPU, float32 keeps runs repeatable and bf16 buys little.
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   backbone_lr: float = 1.0) -> torch.optim.Optimizer:
    """AdamW; as nanoGPT, weight decay on weight matrices and kernels only, never on norms and biases.
    ``backbone_lr`` < 1 gives every layer but the classifier (the last Linear) that multiple of the
    learning rate (its groups' ``lr_scale``): pretrained features move slowly, the new head fast.
    The fused kernel (CPU and CUDA) does the whole update in one pass: ~4x faster than the loop."""
    head = classifier_prefix(model) if backbone_lr != 1.0 else ""
    groups = []
    for scale, named in ((backbone_lr, [(n, p) for n, p in model.named_parameters() if not (head and n.startswith(head))]),
                         (1.0, [(n, p) for n, p in model.named_parameters() if head and n.startswith(head)])):
        params = [p for _, p in named]
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
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


def check_batches(cfg: TrainConfig, data: TrainData, ranks: Ranks) -> None:
    """DistillError unless every batch can be cut into ``world * accum_steps`` parts of 2 images or
    more (BatchNorm trains on 2 at least)."""
    n_train, parts = int((~data.is_val).sum()), ranks.world * cfg.accum_steps
    if min(n_train, cfg.batch_size) < 2 * parts:
        raise DistillError(f"--batch-size {cfg.batch_size} with {n_train} training images cannot be cut into "
                           f"{ranks.world} processes x {cfg.accum_steps} accumulation steps of 2 images or more: "
                           f"use --batch-size >= {2 * parts} (and as many images), or fewer --accum-steps")


def new_run(cfg: TrainConfig, data: TrainData, pixels: np.ndarray, student: StudentConfig,
            model: torch.nn.Module, ranks: Ranks, pretrained: bool = False) -> Run:
    """A run at step 0 around ``model`` (already on ``ranks.device``): a fresh optimizer (with
    ``cfg.backbone_lr`` when the weights are ``pretrained``), the targets on the device, the
    wrappers ``cfg`` asks for. Training it needs :func:`check_batches` first; evaluating it does not."""
    n_train, parts = int((~data.is_val).sum()), ranks.world * cfg.accum_steps
    device = ranks.device
    targets = data.soft_targets if cfg.targets == "soft" else one_hot(data.teacher_top1, len(data.classes))
    net, ddp = wrap_model(model, cfg, ranks)
    run = Run(cfg, data, pixels, student, model, net, ddp, make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr if pretrained else 1.0), ranks,
              torch.from_numpy(targets).to(device), torch.from_numpy(data.hard_labels).to(device),
              torch.from_numpy(data.teacher_top1).to(device), compiling=cfg.compile,
              steps_per_epoch=len(epoch_batches(np.arange(n_train), cfg.batch_size, 0, 0, min_size=2 * parts)))
    if cfg.ema:
        from timm.utils import ModelEmaV3  # timm is imported only when asked for

        # use_warmup: the decay grows as 1 - (1 + step)^(-2/3) up to --ema, so a short run's
        # average is not dominated by its random initial weights.
        run.ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True)
    return run


def micro_step(run: Run, micro: MicroBatch, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients add up (and DDP waits to all-reduce
    them) until ``micro.last``. Returns the micro-batch's mean loss."""
    torch.manual_seed(micro.seed)  # dropout
    x = x.to(run.device, non_blocking=True)
    if x.dtype == torch.uint8:  # a GPU gets uint8 (4x less to copy) and normalises it itself
        x = run.input(x)
    idx = idx.to(run.device, non_blocking=True)
    seed = (micro.seed + 1) % 2**63  # not dropout's stream
    targets = None
    if run.cfg.mixup:
        x, targets = run.mixed(x, idx, seed)
    strong = None
    if run.unlabeled is not None:
        weak, strong = (run.input(v.to(run.device, non_blocking=True))
                        for v in semi.views(run.unlabeled, len(idx), run.cfg.image_size, (seed + 1) % 2**63))
        with run.autocast():
            pseudo, mask = semi.pseudo_targets(run.ema.module if run.ema is not None else run.model, weak)
        run.unlabeled_counts += torch.stack([torch.tensor(len(mask), device=mask.device), mask.sum()])
    with run.ddp.no_sync() if run.ddp is not None and not micro.last else nullcontext():
        with run.autocast():
            logits = run.net(x if strong is None else torch.cat([x, strong]))
        if strong is not None:
            logits, logits_u = logits[:len(idx)], logits[len(idx):]
        loss = run.loss(logits, idx, seed=None if targets else seed, targets=targets)
        if strong is not None:
            weight = semi.ramp(run.step, run.cfg.epochs * run.steps_per_epoch)
            loss = loss + semi.consistency_loss(logits_u, pseudo, mask, run.cfg.loss, run.cfg.temperature, weight)
        (loss * micro.weight).backward()
    return loss


def _compiled_step(run: Run, micro: MicroBatch, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The first step with torch.compile, where compilation happens: on failure, warn and go eager."""
    try:
        loss = micro_step(run, micro, x, idx)
    except Exception as e:  # dynamo, inductor, the C++ compiler: many types, one remedy
        # The first line only: the rest of a compiler's message is its trace.
        first = (str(e).strip().splitlines() or [""])[0]
        log.warning("--compile failed (%s: %s); training without torch.compile", type(e).__name__, one_line(first, 200))
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
    # On CPU PixelBatches normalises (in the workers, when there are any) with the student's mean/std.
    loader = torch.utils.data.DataLoader(PixelBatches(run.pixels, [(m.rows, *m.augmentation()) for m in plan],
                                                      normalise=not on_cuda, mean=run.student.mean,
                                                      std=run.student.std),
                                         batch_size=None, num_workers=cfg.num_workers, pin_memory=on_cuda)
    total_steps = cfg.epochs * run.steps_per_epoch
    warmup = min(total_steps, round(cfg.warmup_epochs * run.steps_per_epoch))
    run.model.train()
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no sync per step
    seen, lr, done, started = 0, cfg.lr, 0, time.perf_counter()
    run.unlabeled_counts = torch.zeros(2, dtype=torch.int64, device=run.device)
    steps = len(plan) // cfg.accum_steps
    for micro, (x, idx) in zip(plan, loader):
        lr = get_lr(run.step, total_steps, warmup, cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss = (_compiled_step if run.compiling else micro_step)(run, micro, x, idx)
        loss_sum += loss.detach() * len(idx)
        seen += len(idx)
        if not micro.last:
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run.after_step:
            run.after_step(run.model)
        run.step += 1
        if run.ema is not None:
            run.ema.update(run.model, step=run.step)
        done += 1
        if progress:
            info = {"phase": "train", "lr": lr}
            if done % LOG_EVERY == 0 or done == steps:
                info["loss"] = loss.item()  # CPU-GPU sync point, hence only every LOG_EVERY steps
            progress(epoch, done, steps, info)
    seconds = time.perf_counter() - started
    loss_total, images, u_seen, u_passed = all_sum(run.ranks, [loss_sum.item(), seen, *run.unlabeled_counts.tolist()])
    metrics = {"train_loss": loss_total / max(images, 1), "lr": lr,
               "images_per_s": images / max(seconds, 1e-9), "train_seconds": seconds}
    if run.unlabeled is not None:  # how many unlabeled images there are, and the share that taught
        metrics.update(unlabeled=len(run.unlabeled), unlabeled_passed=u_passed / max(u_seen, 1))
    return metrics


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module | None = None) -> dict:
    """val_loss (same loss as training), val_accuracy (vs hard labels), val_agreement (vs teacher
    top-1) of ``model`` (default: the live student); each process evaluates its share of the
    validation images with rank 0's BatchNorm statistics (those saved), and the sums are added up."""
    model = run.model if model is None else model
    model.eval()
    ranks = run.ranks
    if ranks.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    agree = torch.zeros((), dtype=torch.int64, device=run.device)
    val = run.val_idx[ranks.rank::ranks.world]
    chunk = 2 * max(1, run.cfg.batch_size // (ranks.world * run.cfg.accum_steps))  # no gradients: 2x
    for start in range(0, len(val), chunk):
        idx_np = val[start:start + chunk]
        x = run.input(torch.from_numpy(run.pixels[idx_np]).to(run.device))
        idx = torch.from_numpy(idx_np).to(run.device)
        with run.autocast():
            logits = model(x)
        loss_sum += run.loss(logits, idx) * len(idx)
        pred = logits.argmax(dim=1)
        correct += (pred == run.hard[idx]).sum()
        agree += (pred == run.top1[idx]).sum()
    loss, right, agreed = all_sum(ranks, [loss_sum.item(), correct.item(), agree.item()])
    n = max(len(run.val_idx), 1)
    return {"val_loss": loss / n, "val_accuracy": right / n, "val_agreement": agreed / n}
