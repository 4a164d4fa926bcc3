"""DSD training (Han et al. 2017, "Dense-Sparse-Dense"): train dense, prune the smallest weights
of every layer and train on with them held at zero, then let them grow back from zero and train
dense again.

The three phases share ``--epochs`` (default: thirds, the first phase taking what does not divide)
and one warm-up + cosine schedule, so the re-dense phase trains at the lowest learning rates (under
a quarter of the peak), as the paper's re-dense phase does at a tenth of it. The masks are not
stored: the sparse phase's weights hold their zeros, so a run resumed there recomputes the same
masks from the weights by magnitude.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DENSE, SPARSE, REDENSE = "dense", "sparse", "redense"


def phase_epochs(epochs: int, phases: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(dense, sparse, re-dense) epoch counts: ``phases`` as given, else thirds of ``epochs``."""
    if phases is not None:
        return phases
    third = epochs // 3
    return epochs - 2 * third, third, third


def phase_of(epoch: int, counts: tuple[int, int, int]) -> str:
    """The phase epoch ``epoch`` (1-based) trains in."""
    dense, sparse, _ = counts
    if epoch <= dense:
        return DENSE
    return SPARSE if epoch <= dense + sparse else REDENSE


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights DSD prunes: every convolution kernel and Linear matrix (not norms or biases),
    as in the paper, where every layer is pruned to the same sparsity."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, True for the ``1 - sparsity`` largest weights by magnitude (ties kept by rank)."""
    masks = {}
    for name, weight in prunable(model).items():
        flat = weight.detach().abs().flatten()
        keep = max(1, math.ceil((1.0 - sparsity) * flat.numel()))
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(keep, sorted=False).indices] = True
        masks[name] = mask.view_as(weight)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights (after every optimizer step of the sparse phase)."""
    weights = prunable(model)
    for name, mask in masks.items():
        weights[name].mul_(mask)


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Fraction of the prunable weights that are exactly zero."""
    weights = list(prunable(model).values())
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)
