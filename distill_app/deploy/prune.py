"""Filter pruning of a MobileNetV2 student: remove the weakest hidden channels, then fine-tune on
the teacher's stored answers with the distillation loss, and write the result as a new run folder.

The network really gets smaller (students/pruned.py does the surgery): fewer parameters, fewer
MACs, a smaller file. Channels are ranked by the L1 norm of their expand filter (Li et al. 2017,
"Pruning Filters for Efficient ConvNets"). Folding the following batch norm's scale into the
norm looks more principled but measured worse on an Imagenette student (30% pruned, before
fine-tuning: agreement with the unpruned model 47% folded, 54% random, 65% raw L1): a channel
with a small BN scale can still emit a large constant (its BN shift), and removing it moves
every later activation. With ``steps > 1`` the amount is removed in equal slices, with
fine-tuning after each (iterative pruning loses less than one big cut).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cache import default_db_path
from students import StudentConfig, count_macs, count_params
from students.pruned import (PRUNED_NAME, expanded_blocks, hidden_channels, keep_block_channels,
                             keep_head_channels)

from ..data.pixels import load_pixels
from ..data.targets import OTHER, LabelMap
from ..device import resolve_device
from ..errors import DistillError
from ..training.checkpoint import CONFIG_FILE, METRICS_FILE, MODEL_FILE, StudentFile, open_student, save_student
from ..training.config import TrainConfig
from ..training.data import TrainData, prepare_data
from ..training.distributed import Ranks
from ..training.loop import Run, check_batches, evaluate, new_run, train_epoch
from .measure import interleaved_latency, ratio, torch_candidate

log = logging.getLogger(__name__)

CRITERION = "L1 norm of each expand (and head) conv filter; the smallest are removed"

# progress(step, done, total, info): fine-tuning batches of one pruning step.
Progress = Callable[[int, int, int, dict], None]


@dataclass
class PruneConfig:
    """The flags of ``distill prune``; written resolved to the new run's ``config.json``."""

    student: str  # run folder (or model.pt) of a trained mobilenetv2 student
    amount: float = 0.3  # fraction of hidden channels removed in all, 0 < amount < 1
    steps: int = 1  # prune amount/steps at a time, fine-tuning after each
    epochs: int = 3  # fine-tuning epochs after each step (0: prune only)
    images: str | None = None  # default: the student's training images (from its config)
    db: str | None = None  # default: the student's training store if it exists, else $DISTILL_DB
    out: str | None = None  # default: <student run folder>-pruned<percent>
    batch_size: int = 64
    lr: float = 1e-3  # peak AdamW learning rate of each fine-tuning, cosine to 1%
    head: bool = True  # also prune the last 1x1 conv (last_channel) and the classifier's inputs
    round_to: int = 8  # kept widths are multiples of this: SIMD kernels like whole vectors
    device: str = "auto"
    seed: int = 0
    latency_runs: int = 10


def check_config(cfg: PruneConfig) -> None:
    checks = [
        (0 < cfg.amount < 1, f"--amount must be between 0 and 1 (a fraction of channels), got {cfg.amount}"),
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        (cfg.epochs >= 0, f"--epochs must be >= 0, got {cfg.epochs}"),
        (cfg.batch_size >= 2, f"--batch-size must be at least 2 (batch norm), got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.round_to >= 1, f"channel rounding must be >= 1, got {cfg.round_to}"),
        (cfg.latency_runs >= 1, f"latency runs must be >= 1, got {cfg.latency_runs}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


# -- which channels go --------------------------------------------------------------------------


def channel_scores(conv: nn.Conv2d) -> torch.Tensor:
    """(out_channels,) L1 norm of each output filter of ``conv``."""
    return conv.weight.detach().abs().flatten(1).sum(dim=1)


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices of the ``keep`` highest scores (sorted: channel order is preserved)."""
    return torch.topk(scores, keep).indices.sort().values


def target_widths(original: list[int], amount: float, round_to: int, head: bool) -> list[int]:
    """Widths after removing ``amount`` of each layer's original channels, rounded to
    ``round_to`` (at least ``round_to``, never more than the original)."""
    def shrink(width: int) -> int:
        kept = round_to * round(width * (1 - amount) / round_to)
        return min(width, max(round_to, kept))

    widths = [shrink(w) for w in original[:-1]]
    return widths + [shrink(original[-1]) if head else original[-1]]


def prune_to(model: nn.Module, widths: list[int]) -> None:
    """Remove the lowest-scoring hidden channels until each layer has ``widths`` (in place)."""
    for (_, block), width in zip(expanded_blocks(model), widths):
        expand_conv = block.conv[0][0]
        if width < expand_conv.out_channels:
            keep_block_channels(block, top_channels(channel_scores(expand_conv), width))
    head_conv = model.features[-1][0]
    if widths[-1] < head_conv.out_channels:
        keep_head_channels(model, top_channels(channel_scores(head_conv), widths[-1]))


# -- the data: the student's own training images and targets --------------------------------------


@dataclass
class FineTune:
    """The student's training set rebuilt from the store, and the trainer's configuration that
    fine-tunes on it: the student's loss and targets, this command's lr, epochs and batch size."""

    cfg: TrainConfig
    data: TrainData
    pixels: np.ndarray  # (N, S, S, 3) uint8
    ranks: Ranks  # one process

    def run(self, model: nn.Module, student: StudentConfig, seed: int | None = None) -> Run:
        """A trainer's run at step 0 around ``model`` (fresh optimizer: pruning replaced the parameters)."""
        cfg = self.cfg if seed is None else replace(self.cfg, seed=seed)
        return new_run(cfg, self.data, self.pixels, student, model, self.ranks)


def fine_tune_data(cfg: PruneConfig, meta: StudentFile) -> FineTune:
    """The student's images, targets and split, rebuilt from the store as the trainer builds them."""
    config = meta.config
    images = cfg.images or config.get("images")
    if not images:
        raise DistillError("the student does not record its training images: pass --images DIR")
    classes = list(meta.classes)
    # The student's own class list and label map, so the targets have exactly its columns
    # whatever the store holds now.
    label_map = (LabelMap.from_dict(meta.label_map, origin=f"the label map of {cfg.student}") if meta.label_map
                 else LabelMap.identity([c for c in classes if c != OTHER]))
    s = meta.student
    train_cfg = TrainConfig(
        images=str(images), db=_default_db(cfg, config), teachers=list(meta.teachers or ["local"]),
        other=bool(config["other"]) if "other" in config else OTHER in classes,
        val_fraction=float(config.get("val_fraction", 0.1)),
        student=s.name, width=s.width, image_size=meta.image_size,
        # This command's schedule: no warm-up (the weights are trained already), cosine from --lr.
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, warmup_epochs=0.0, device=cfg.device, seed=cfg.seed,
        # As the student was trained.
        weight_decay=float(config.get("weight_decay", 0.05)), targets=config.get("targets", "soft"),
        loss=config.get("loss", "mse"), temperature=float(config.get("temperature", 1.0)),
        hard_weight=float(config.get("hard_weight", 0.0)))
    data = prepare_data(train_cfg, None, label_map)
    if data.classes != classes:
        raise DistillError(f"the store's answers give classes {data.classes[:5]}..., the student has "
                           f"{classes[:5]}...: pass the --db and --images it was trained on")
    pixels = load_pixels(data.shas, data.paths, meta.image_size)
    return FineTune(train_cfg, data, pixels, Ranks(resolve_device(cfg.device)))


def _default_db(cfg: PruneConfig, config: dict) -> str:
    if cfg.db:
        return cfg.db
    trained_with = config.get("db")
    return trained_with if trained_with and Path(trained_with).exists() else default_db_path()


# -- fine-tuning: the trainer's epochs and validation -----------------------------------------------


def fine_tune(model: nn.Module, ft: FineTune, student: StudentConfig, step: int,
              progress: Progress | None = None) -> list[dict]:
    """``ft.cfg.epochs`` epochs of distillation on the training split; one metrics dict per epoch."""
    # The trainer seeds batches, augmentation and dropout by (seed, epoch, batch), and every
    # pruning step starts again at epoch 1: a seed of its own keeps the steps from repeating
    # one another's batches.
    seed = int(np.random.SeedSequence([ft.cfg.seed, step]).generate_state(1)[0])
    check_batches(ft.cfg, ft.data, ft.ranks)
    run = ft.run(model, student, seed)
    total = ft.cfg.epochs * run.steps_per_epoch
    report = progress and (lambda epoch, done, steps, info: progress(step, (epoch - 1) * steps + done, total, info))
    history = []
    for epoch in range(1, ft.cfg.epochs + 1):
        history.append({"prune_step": step, **train_epoch(run, epoch, report), **validate(run)})
        log.info("prune step %d epoch %d: %s", step, epoch, history[-1])
    return history


def validate(run: Run) -> dict:
    """The trainer's validation metrics (val_loss, val_accuracy, val_agreement), plus val_images."""
    return {**evaluate(run), "val_images": len(run.val_idx)}


# -- the whole job -----------------------------------------------------------------------------------


def prune_student(cfg: PruneConfig, progress: Progress | None = None) -> dict:
    """Prune ``cfg.student``, fine-tune, save a run folder; returns the before/after summary.

    The new folder holds model.pt (student name ``mobilenetv2_pruned``: ``open_student``
    rebuilds it from the weights' shapes), config.json and metrics.jsonl (one line per
    fine-tuning epoch, the keys of the trainer's, so eval's curves work).
    """
    check_config(cfg)
    original, meta = open_student(cfg.student)
    _check_prunable(original, meta)
    out = resolve_out(cfg)
    ft = fine_tune_data(cfg, meta)
    model = copy.deepcopy(original).to(ft.ranks.device, memory_format=torch.channels_last)
    widths_before = hidden_channels(model)
    before = {**model_size(original, meta), **validate(ft.run(model, meta.student))}
    history, steps = [], []
    for step in range(1, cfg.steps + 1):
        widths = target_widths(widths_before, cfg.amount * step / cfg.steps, cfg.round_to, cfg.head)
        prune_to(model, widths)
        # The surgery builds new layers on the CPU: back to the device, in the trainer's layout.
        model = model.to(ft.ranks.device, memory_format=torch.channels_last)
        student = pruned_config(meta.student, model)
        pruned = validate(ft.run(model, student))  # before fine-tuning: what the cut cost
        lines = fine_tune(model, ft, student, step, progress) if cfg.epochs else []
        history += [{"epoch": len(history) + k + 1, **line} for k, line in enumerate(lines)]
        steps.append({"step": step, "hidden_channels": hidden_channels(model),
                      "parameters": count_params(model), "pruned": pruned,
                      "fine_tuned": {k: v for k, v in lines[-1].items() if k.startswith("val_")} if lines else pruned})
    after = {**model_size(model, meta), **validate(ft.run(model, pruned_config(meta.student, model)))}
    model = model.cpu().eval()
    latency = _latency_before_after(original, model, meta, cfg.latency_runs)
    summary = {"out": str(out), "student": str(cfg.student), "amount": cfg.amount, "steps": cfg.steps,
               "epochs_per_step": cfg.epochs, "criterion": CRITERION,
               "hidden_channels_before": widths_before, "hidden_channels": hidden_channels(model),
               "before": {**before, **latency["before"]}, "after": {**after, **latency["after"]},
               "latency": latency["about"], "per_step": steps,
               "images": {"train": int((~ft.data.is_val).sum()), "val": int(ft.data.is_val.sum())}}
    _save_run(out, model, meta, cfg, summary, history)
    summary["file_bytes"] = (out / MODEL_FILE).stat().st_size
    return summary


def pruned_config(student: StudentConfig, model: nn.Module) -> StudentConfig:
    """``student`` as ``model`` now is: the pruned architecture, with its kept widths."""
    return replace(student, name=PRUNED_NAME, hidden_channels=hidden_channels(model))


def _check_prunable(model: nn.Module, meta: StudentFile) -> None:
    name = meta.student.name
    if name not in ("mobilenetv2", PRUNED_NAME) or not expanded_blocks(model):
        raise DistillError(f"pruning works on mobilenetv2 students, got {name!r}: "
                           "train one with --student mobilenetv2")


def resolve_out(cfg: PruneConfig) -> Path:
    """--out, else ``<run folder>-pruned<percent>``; never over an existing student."""
    if cfg.out:
        out = Path(cfg.out)
    else:
        run = Path(cfg.student)
        run = run.parent if run.suffix == ".pt" else run
        out = run.with_name(f"{run.name}-pruned{round(cfg.amount * 100)}")
    if (out / MODEL_FILE).exists():
        raise DistillError(f"{out} already holds a student: pass another --out or delete it")
    return out


def model_size(model: nn.Module, meta: StudentFile) -> dict:
    return {"parameters": int(count_params(model)), "macs": int(count_macs(model, meta.image_size))}


def _latency_before_after(original: nn.Module, pruned: nn.Module, meta: StudentFile, runs: int) -> dict:
    """CPU latency of both models at batch 1 and 32, measured interleaved (a shared machine's
    noise then hits both alike)."""
    size = meta.image_size
    candidates = [torch_candidate("before", original.cpu().eval(), size),
                  torch_candidate("after", pruned, size)]
    ms = interleaved_latency(candidates, batches=(1, 32), runs=runs)
    return {"before": ms["before"], "after": ms["after"],
            "about": {"device": "cpu", "threads": torch.get_num_threads(), "runs": runs,
                      "speedup_batch1": ratio(ms["before"]["ms_batch1"], ms["after"]["ms_batch1"])}}


def _save_run(out: Path, model: nn.Module, meta: StudentFile, cfg: PruneConfig, summary: dict,
              history: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    after = summary["after"]
    pruning = {k: summary[k] for k in ("amount", "steps", "epochs_per_step", "criterion",
                                        "hidden_channels_before", "hidden_channels", "before", "after")}
    save_student(out / MODEL_FILE, model, replace(
        meta, student=pruned_config(meta.student, model),
        metrics={k: after[k] for k in ("val_loss", "val_accuracy", "val_agreement")},
        pruning={**pruning, "from": str(cfg.student), "config": asdict(cfg)}))
    (out / CONFIG_FILE).write_text(json.dumps({**meta.config, "pruning": asdict(cfg)}, indent=2) + "\n",
                                   encoding="utf-8")
    (out / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history), encoding="utf-8")
