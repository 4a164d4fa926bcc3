"""Semi-supervised distillation on the images no call reached (``--unlabeled fixmatch``).

FixMatch-style consistency (Sohn et al. 2020), with the EMA student as the pseudo-labeller when
there is one (mean teacher, Tarvainen & Valpola 2017), else the live student without gradients:
for each labelled micro-batch, as many unlabeled images are drawn (seeded by the micro-batch, so
a resumed run repeats them); a weak view (the trainer's crop and flip) is labelled, the label is
sharpened (T = SHARPEN) and kept only where its top probability reaches THRESHOLD; a strong view
(the same crop, then torchvision's TrivialAugmentWide per image) is trained to match it with the
run's own loss form, weighted by the share of images that passed and by a ramp over the first
RAMP of the run. The hard-label term never sees
an unlabeled image.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from ..data.pixels import augment_params, crop_flip
from .losses import distill_loss

THRESHOLD = 0.8  # FixMatch's 0.95 keeps almost nothing while a small-data student is unsure
SHARPEN = 0.5  # temperature of the pseudo-label
WEIGHT = 1.0  # the consistency term's weight, beside the labelled loss, once ramped up
# The weight grows linearly from 0 over this share of the run's steps: a random-init student's
# confident answers are wrong at first. Without it, 500 Imagenette calls + 3,500 unlabeled photos
# collapsed: at epoch 8 of 40, 64% of the pseudo-labels passed the mask while the student's
# validation accuracy was 4.4% (chance is 10%).
RAMP = 0.4


def ramp(step: int, total_steps: int) -> float:
    """The consistency term's weight at optimizer step ``step`` of ``total_steps``."""
    return WEIGHT * min(1.0, step / max(1.0, RAMP * total_steps))


def draw(n_unlabeled: int, n: int, size: int, seed: int):
    """(rows (n,) sorted, crop offsets (2, n), flips (n,)) of the unlabeled images for one micro-batch."""
    rows = np.sort(np.random.default_rng(seed).choice(n_unlabeled, size=min(n, n_unlabeled), replace=False))
    offsets, flip = augment_params(len(rows), size, torch.Generator().manual_seed(seed))
    return rows, offsets, flip


def strong_view(weak: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> the same, each image through TrivialAugmentWide (one op, random
    strength). Per image: a batch call would give every image the same op. torch's global RNG is
    what torchvision draws from, so it is seeded here and restored after."""
    policy = v2.TrivialAugmentWide()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        chw = weak.permute(0, 3, 1, 2)
        return torch.stack([policy(img) for img in chw]).permute(0, 2, 3, 1).contiguous()
    finally:
        torch.random.set_rng_state(state)


def views(pixels: np.ndarray, n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) uint8 views of ``n`` unlabeled images drawn for this micro-batch."""
    rows, offsets, flip = draw(len(pixels), n, size, seed)
    weak = crop_flip(torch.from_numpy(pixels[rows]), offsets, flip)
    return weak, strong_view(weak, seed)


@torch.no_grad()
def pseudo_targets(labeller: torch.nn.Module, weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sharpened targets (B, C), mask (B,) bool) from the labeller's view of the weak images."""
    was_training = labeller.training
    labeller.eval()
    try:
        probs = torch.softmax(labeller(weak).float(), dim=1)
    finally:
        labeller.train(was_training)
    sharp = torch.softmax(torch.log(probs.clamp_min(1e-12)) / SHARPEN, dim=1)
    return sharp, probs.max(dim=1).values >= THRESHOLD


def consistency_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, kind: str,
                     temperature: float, weight: float = WEIGHT) -> torch.Tensor:
    """The run's loss form on the images that passed, times their share and ``weight`` (0 when none did)."""
    if not bool(mask.any()) or not weight:
        return logits.sum() * 0.0  # keeps the graph (DDP expects every parameter to get a gradient)
    share = mask.float().mean()
    return weight * share * distill_loss(logits[mask], targets[mask], None, kind, temperature)
