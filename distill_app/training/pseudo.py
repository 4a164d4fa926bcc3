"""Noisy Student self-training (Xie et al. 2020) on the images no call reached: ``--pseudo-labels RUN``.

A student already trained on the answers (RUN: a run folder or ``model.pt`` with the same classes;
with ``--unlabeled auto|noisy`` the trainer trains it first, in ``OUT/labeller``, and the new
student starts from its weights) labels each unlabeled image once: the mean of its softmax on the
centre crop at its own resolution and on the mirrored crop (flip test-time augmentation: measured
on Imagenette, the labels' top-1 rose by 0.9-1.4 points for one more forward pass), soft and
unsharpened (Noisy Student's soft pseudo-labels). Those rows join the training split, never the
validation split (which stays the teacher's answers), so the new student, trained with the run's
augmentation as its noise, regresses the teacher's targets and the pseudo-targets alike. A pseudo
row's hard label is the labeller's argmax, never its folder: nothing was paid for that image.

The pseudo-targets are written to the run folder before the first epoch, and a resumed run reads
them back instead of asking the labeller again, so it repeats an uninterrupted run exactly even
when the labeller's file has gone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data.pixels import load_pixels, to_input
from ..device import resolve_device
from ..errors import DistillError
from .data import TrainData

log = logging.getLogger(__name__)

PSEUDO_FILE = "pseudo_labels.npz"  # in the run folder: (shas, targets) the labeller gave
LABELLER_DIR = "labeller"  # --unlabeled noisy|auto: the first run, on the answers alone, inside the run folder


def add_pseudo_labels(data: TrainData, labeller: str, out: Path, resume: bool,
                      device: torch.device | str = "auto", batch_size: int = 256) -> TrainData:
    """``data`` with its unlabeled images moved into the training split, targets from ``labeller``
    (read back from the run folder when ``resume``)."""
    saved = out / PSEUDO_FILE
    if resume and saved.exists():
        with np.load(saved) as f:
            shas, targets = [str(s) for s in f["shas"]], f["targets"]
    elif not data.unlabeled:
        log.info("--pseudo-labels: every image has an answer; nothing to label")
        return replace(data, counts={**data.counts, "pseudo_labelled": 0})
    else:
        shas = [sha for sha, _ in data.unlabeled]
        targets = predict(labeller, data, device, batch_size)
        out.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_name(saved.name + ".tmp.npz")
        np.savez(tmp, shas=np.array(shas), targets=targets)
        tmp.replace(saved)
    paths = dict(data.unlabeled)
    if set(shas) != set(paths) or targets.shape != (len(shas), len(data.classes)):
        raise DistillError(f"{saved} labels other images or classes than the run's unlabeled ones "
                           "(the folder, the store or the label map changed since): start a new run")
    merged = np.array(data.shas + shas)
    order = np.argsort(merged)  # TrainData stays sorted by hash
    every_path = data.paths + [paths[s] for s in shas]
    top1 = targets.argmax(axis=1).astype(np.int64)
    cat = lambda a, b: np.concatenate([a, b])[order]  # noqa: E731
    log.info("--pseudo-labels: %d unlabeled images join the %d answered ones, labelled by %s",
             len(shas), len(data.shas), labeller)
    return replace(data, shas=[str(s) for s in merged[order]],
                   paths=[every_path[i] for i in order],
                   soft_targets=cat(data.soft_targets, targets.astype(np.float32)),
                   hard_labels=cat(data.hard_labels, top1), teacher_top1=cat(data.teacher_top1, top1),
                   is_val=cat(data.is_val, np.zeros(len(shas), bool)),
                   counts={**data.counts, "pseudo_labelled": len(shas)}, unlabeled=[])


@torch.no_grad()
def predict(labeller: str, data: TrainData, device: torch.device | str = "auto",
            batch_size: int = 256) -> np.ndarray:
    """(U, C) float32: the labeller's softmax on each unlabeled image (centre crop at its resolution,
    averaged with the mirrored crop's)."""
    from .checkpoint import open_student

    model, meta = open_student(labeller)  # a DistillError when it is no student
    if list(meta.classes) != list(data.classes):
        raise DistillError(f"--pseudo-labels {labeller} predicts {len(meta.classes)} classes "
                           f"({', '.join(meta.classes[:3])}, ...), this run trains on {len(data.classes)} "
                           f"({', '.join(data.classes[:3])}, ...): train it with the same label map")
    dev = device if isinstance(device, torch.device) else resolve_device(device)  # the trainer passes its rank's
    model = model.to(dev).eval()
    s = meta.student
    shas, paths = map(list, zip(*data.unlabeled))
    started = time.monotonic()
    pixels = load_pixels(shas, paths, s.image_size)
    out = []
    for start in range(0, len(shas), batch_size):
        x = to_input(torch.from_numpy(np.array(pixels[start:start + batch_size])).to(dev), s.mean, s.std)
        probs = torch.softmax(model(x).float(), dim=1) + torch.softmax(model(x.flip(3)).float(), dim=1)
        out.append((probs / 2).cpu())
    log.info("--pseudo-labels: %d images labelled in %.1fs", len(shas), time.monotonic() - started)
    return torch.cat(out).numpy()
