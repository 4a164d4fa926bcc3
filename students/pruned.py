"""MobileNetV2 with fewer hidden channels: the surgery that removes them, and the registry entry
``mobilenetv2_pruned`` that rebuilds such a network from its weights alone.

Filter pruning shrinks the *expanded* (hidden) width of each inverted residual block::

    x (c_in) -> 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project -> BN (c_out)
                   ^^^^^^ out      ^^          ^^^^^^^^^ in/out/groups ^^    ^^^^^^^ in

and optionally the last 1x1 convolution (``last_channel``) with the classifier's input. Block
inputs and outputs keep their width, so residual additions still line up.

A pruned network has per-block widths that ``(name, width)`` cannot express, and ``model.pt``
stores only name, width and weights (checkpoint.py). The weights say the widths, though: the
``mobilenetv2_pruned`` factory returns a full-width MobileNetV2 whose ``load_state_dict``
first resizes each layer to the shapes it is given. ``load_student`` then works unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual

from .registry import register_student

PRUNED_NAME = "mobilenetv2_pruned"


def expanded_blocks(model: nn.Module) -> list[tuple[int, InvertedResidual]]:
    """(index in ``model.features``, block) of every inverted residual with a 1x1 expansion."""
    return [(i, m) for i, m in enumerate(model.features)
            if isinstance(m, InvertedResidual) and len(m.conv) == 4]


def hidden_channels(model: nn.Module) -> list[int]:
    """Hidden width of each expanded block, in order, then the last conv's width (last_channel)."""
    widths = [block.conv[0][0].out_channels for _, block in expanded_blocks(model)]
    return widths + [model.features[-1][0].out_channels]


def slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None = None,
               in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    """A new Conv2d holding the kept output filters and/or input channels of ``conv``.

    A depthwise conv (groups == in == out channels) keeps the same channels on both sides,
    so its groups follow ``out_idx``.
    """
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    weight = conv.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx]
    if in_idx is not None and not depthwise:
        weight = weight[:, in_idx]
    out_ch = weight.shape[0]
    in_ch = out_ch if depthwise else weight.shape[1] * conv.groups
    new = nn.Conv2d(in_ch, out_ch, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    groups=out_ch if depthwise else conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach() if out_idx is None else conv.bias.detach()[out_idx])
    return new


def slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    """A new BatchNorm2d with the kept channels' affine parameters and running statistics."""
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach()[idx])
            new.bias.copy_(bn.bias.detach()[idx])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[idx])
            new.running_var.copy_(bn.running_var[idx])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def keep_block_channels(block: InvertedResidual, keep: torch.Tensor) -> None:
    """Keep only hidden channels ``keep`` (sorted indices) of an expanded block, in place."""
    expand, depthwise, project = block.conv[0], block.conv[1], block.conv[2]
    expand[0] = slice_conv(expand[0], out_idx=keep)
    expand[1] = slice_bn(expand[1], keep)
    depthwise[0] = slice_conv(depthwise[0], out_idx=keep)
    depthwise[1] = slice_bn(depthwise[1], keep)
    block.conv[2] = slice_conv(project, in_idx=keep)


def keep_head_channels(model: nn.Module, keep: torch.Tensor) -> None:
    """Keep only channels ``keep`` of the last 1x1 conv and the classifier's matching inputs."""
    head = model.features[-1]
    head[0] = slice_conv(head[0], out_idx=keep)
    head[1] = slice_bn(head[1], keep)
    linear = model.classifier[-1]
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight.detach()[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    model.classifier[-1] = new
    model.last_channel = len(keep)


def set_hidden_channels(model: nn.Module, widths: Sequence[int]) -> None:
    """Resize every expanded block (and the head) to ``widths`` (as :func:`hidden_channels`
    lists them), keeping the first channels: the weights are about to be overwritten."""
    blocks = expanded_blocks(model)
    if len(widths) != len(blocks) + 1:
        raise ValueError(f"expected {len(blocks) + 1} widths (blocks + head), got {len(widths)}")
    for (_, block), width in zip(blocks, widths):
        if block.conv[0][0].out_channels != width:
            keep_block_channels(block, torch.arange(width))
    if model.features[-1][0].out_channels != widths[-1]:
        keep_head_channels(model, torch.arange(widths[-1]))


def _fit_to_state_dict(module, state_dict, prefix, *_):
    """load_state_dict pre-hook: read the widths off the incoming tensors and resize to them."""
    widths = []
    for i, _block in expanded_blocks(module):
        key = f"{prefix}features.{i}.conv.0.0.weight"
        if key not in state_dict:
            return  # not our layout: let load_state_dict report the missing keys
        widths.append(state_dict[key].shape[0])
    head_key = f"{prefix}features.{len(module.features) - 1}.0.weight"
    if head_key not in state_dict:
        return
    set_hidden_channels(module, widths + [state_dict[head_key].shape[0]])


def resizable_mobilenetv2(num_classes: int, width: float) -> nn.Module:
    """Full-width MobileNetV2 that takes the hidden widths of any state dict it loads."""
    model = mobilenet_v2(width_mult=width, num_classes=num_classes)
    model.register_load_state_dict_pre_hook(_fit_to_state_dict)
    return model


@register_student(PRUNED_NAME)
def create_pruned_mobilenetv2(
    num_classes: int, width: float, image_size: int, pretrained: str, init: str | None
) -> nn.Module:
    """A MobileNetV2 shell for pruned weights: its widths come from ``load_state_dict``."""
    if pretrained == "on" or init:
        raise ValueError(f"{PRUNED_NAME} is made by `distill prune` from a trained student; "
                         "train mobilenetv2 with --pretrained/--init instead")
    return resizable_mobilenetv2(num_classes, width)
