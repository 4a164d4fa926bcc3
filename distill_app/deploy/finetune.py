"""Fine-tuning a trained student after surgery (``distill prune``, ``distill compress``): its own
training images and targets rebuilt from the store, and the trainer's epochs and validation over
them (training.loop), so a compressed student is judged on the split it was trained with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from cache import default_db_path
from students import StudentConfig

from ..data.pixels import load_pixels
from ..data.targets import OTHER, LabelMap
from ..device import resolve_device
from ..errors import DistillError
from ..training.checkpoint import StudentFile
from ..training.config import TrainConfig
from ..training.data import TrainData, prepare_data
from ..training.distributed import Ranks
from ..training.loop import Run, check_batches, evaluate, new_run, train_epoch

log = logging.getLogger(__name__)

# progress(step, done, total, info): fine-tuning batches of one step (a pruning step, a stage).
Progress = Callable[[int, int, int, dict], None]


@dataclass
class FineTune:
    """The student's training set rebuilt from the store, and the trainer's configuration that
    fine-tunes on it: the student's loss and targets, the command's lr, epochs and batch size."""

    cfg: TrainConfig
    data: TrainData
    pixels: np.ndarray  # (N, S, S, 3) uint8
    ranks: Ranks  # one process

    def run(self, model: nn.Module, student: StudentConfig, seed: int | None = None) -> Run:
        """A trainer's run at step 0 around ``model`` (fresh optimizer: surgery replaced the parameters)."""
        cfg = self.cfg if seed is None else replace(self.cfg, seed=seed)
        return new_run(cfg, self.data, self.pixels, student, model, self.ranks)


def fine_tune_data(meta: StudentFile, student_path: str, images: str | None, db: str | None, epochs: int,
                   batch_size: int, lr: float, device: str, seed: int) -> FineTune:
    """The student's images, targets and split, rebuilt from the store as the trainer builds them
    (``images``/``db``: None for those the student was trained on). The teacher's answers only: a
    --pseudo-labels run's pseudo rows are not rebuilt (recovering from pruning needs the paid
    targets, not another student's guesses)."""
    config = meta.config
    images = images or config.get("images")
    if not images:
        raise DistillError("the student does not record its training images: pass --images DIR")
    classes = list(meta.classes)
    # The student's own class list and label map, so the targets have exactly its columns
    # whatever the store holds now.
    label_map = (LabelMap.from_dict(meta.label_map, origin=f"the label map of {student_path}") if meta.label_map
                 else LabelMap.identity([c for c in classes if c != OTHER]))
    s = meta.student
    train_cfg = TrainConfig(
        images=str(images), db=_default_db(db, config), teachers=list(meta.teachers or ["local"]),
        other=bool(config["other"]) if "other" in config else OTHER in classes,
        val_fraction=float(config.get("val_fraction", 0.1)),
        student=s.name, width=s.width, image_size=meta.image_size,
        # This command's schedule: no warm-up (the weights are trained already), cosine from lr.
        epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=0.0, device=device, seed=seed,
        # As the student was trained.
        weight_decay=float(config.get("weight_decay", 0.05)), targets=config.get("targets", "soft"),
        loss=config.get("loss", "mse"), temperature=float(config.get("temperature", 1.0)),
        hard_weight=float(config.get("hard_weight", 0.0)))
    data = prepare_data(train_cfg, None, label_map)
    if data.classes != classes:
        raise DistillError(f"the store's answers give classes {data.classes[:5]}..., the student has "
                           f"{classes[:5]}...: pass the --db and --images it was trained on")
    pixels = load_pixels(data.shas, data.paths, meta.image_size)
    return FineTune(train_cfg, data, pixels, Ranks(resolve_device(device)))


def _default_db(db: str | None, config: dict) -> str:
    if db:
        return db
    trained_with = config.get("db")
    return trained_with if trained_with and Path(trained_with).exists() else default_db_path()


def fine_tune(model: nn.Module, ft: FineTune, student: StudentConfig, step: int,
              progress: Progress | None = None,
              after_step: Callable[[nn.Module], None] | None = None) -> list[dict]:
    """``ft.cfg.epochs`` epochs of distillation on the training split; one metrics dict per epoch.
    ``after_step(model)`` runs after every optimizer step (a constraint: masks, shared weights)."""
    # The trainer seeds batches, augmentation and dropout by (seed, epoch, batch), and every
    # step starts again at epoch 1: a seed of its own keeps the steps from repeating one
    # another's batches.
    seed = int(np.random.SeedSequence([ft.cfg.seed, step]).generate_state(1)[0])
    check_batches(ft.cfg, ft.data, ft.ranks)
    run = ft.run(model, student, seed)
    run.after_step = after_step
    total = ft.cfg.epochs * run.steps_per_epoch
    report = progress and (lambda epoch, done, steps, info: progress(step, (epoch - 1) * steps + done, total, info))
    history = []
    for epoch in range(1, ft.cfg.epochs + 1):
        history.append({**train_epoch(run, epoch, report), **validate(run)})
        log.info("fine-tuning step %d epoch %d: %s", step, epoch, history[-1])
    return history


def validate(run: Run) -> dict:
    """The trainer's validation metrics (val_loss, val_accuracy, val_agreement), plus val_images."""
    return {**evaluate(run), "val_images": len(run.val_idx)}
