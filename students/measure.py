"""How big and how costly a student is: parameters, multiply-accumulates (MACs), and what its
depthwise-separable convolutions save over standard ones."""

from __future__ import annotations

import math

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


def separable_costs(model: nn.Module, image_size: int) -> list[dict]:
    """Every depthwise-separable pair in ``model``: a depthwise conv (groups == in == out
    channels > 1) whose output (after its BN and activation) next feeds a 1x1 conv: MobileNetV1's
    pointwise conv, MobileNetV2's projection. With its measured cost against the standard conv
    it replaces.

    One zero (1, 3, image_size, image_size) image goes through the model in eval mode; forward
    hooks record each conv's input and output shapes, so strides, padding and pruned widths are as run,
    not as configured. Per pair, with M input channels, N outputs, a D_K x D_K kernel and an
    H x W output (Howard et al. 2017, section 3.1)::

        separable_macs = H·W·M·D_K² (depthwise) + H·W·M·N (pointwise)
        standard_macs  = H·W·M·N·D_K² (one D_K x D_K conv M -> N at the depthwise stride)
        ratio = separable / standard, which should equal formula = 1/N + 1/D_K²

    ``block`` is the smallest module holding both convs (``features.3``; ``features.3.conv``
    in torchvision's MobileNetV2). Returns [] for a model without such pairs.
    """
    convs = dict(model.named_modules())
    order: list[tuple[str, tuple, tuple]] = []  # (conv name, input shape, output shape) as run

    def record(name: str):
        return lambda module, inputs, output: order.append((name, tuple(inputs[0].shape), tuple(output.shape)))

    hooks = [m.register_forward_hook(record(name)) for name, m in convs.items() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    pairs = []
    for i, (dw_name, _, dw_shape) in enumerate(order):
        dw = convs[dw_name]
        if not _depthwise(dw):
            continue
        # The depthwise output's consumer: the next conv run on a tensor of its shape. Convs on
        # other shapes in between are a side branch (squeeze-excitation works on pooled 1x1 maps).
        after = next(((name, out) for name, inp, out in order[i + 1:] if inp == dw_shape), None)
        if after is None:
            continue
        pw_name, pw_shape = after
        pw = convs[pw_name]
        if pw.kernel_size != (1, 1) or pw.groups != 1:
            continue
        _, m, h, w = dw_shape
        n = pw.out_channels
        area = dw.kernel_size[0] * dw.kernel_size[1]  # D_K²
        separable = _conv_macs(dw, dw_shape) + _conv_macs(pw, pw_shape)
        standard = h * w * m * n * area
        pairs.append({
            "block": _common_prefix(dw_name, pw_name), "depthwise": dw_name, "pointwise": pw_name,
            "in": m, "out": n, "kernel": dw.kernel_size[0], "out_hw": (h, w),
            "separable_macs": separable, "standard_macs": standard,
            "ratio": separable / standard, "formula": 1 / n + 1 / area,
        })
    return pairs


def _depthwise(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and 1 < conv.groups == conv.in_channels == conv.out_channels


def _conv_macs(conv: nn.Conv2d, out_shape: tuple[int, ...]) -> int:
    """MACs of one forward of ``conv``: each output element sums kernel area × (in / groups) products."""
    per_output = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
    return math.prod(out_shape) * per_output


def _common_prefix(a: str, b: str) -> str:
    """The deepest module name both dotted names lie under ("" for the model itself)."""
    shared = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        shared.append(x)
    return ".".join(shared)
