"""How big and how costly a student is: parameters and multiply-accumulates (MACs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass on one (1, 3, image_size, image_size) image.

    Counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs (a multiply
    and an add) per MAC of convolutions and matrix products only; we divide by 2. Batch norm,
    activations and additions are not counted, which matches how MobileNet papers report MACs
    (MobileNetV2 1.0 at 224 px: ~300 M).
    """
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()  # BN in train mode would update running stats from a zero image
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
