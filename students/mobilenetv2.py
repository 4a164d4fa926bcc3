"""MobileNetV2 student (Sandler et al. 2018) with width multiplier alpha and input resolution rho.

The architecture is torchvision's ``mobilenet_v2``: a well-kept reference implementation of
inverted residuals, linear bottlenecks and ReLU6, with the ``t, c, n, s`` table and
``_make_divisible`` channel rounding. We reuse it rather than rewrite it; this module only adds
width validation (in the registry), ImageNet weights for the widths that have them, and ``init``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from .registry import load_init, register_student
from .weights import copy_by_position, first_line

# Widths with published ImageNet weights. timm's mobilenetv2_XXX has exactly torchvision's
# tensor layout (same order and shapes), so its weights are copied in by position.
TIMM_WEIGHTS = {0.5: "mobilenetv2_050", 1.4: "mobilenetv2_140"}


@register_student("mobilenetv2")
def create_mobilenetv2(
    num_classes: int, width: float, image_size: int, pretrained: bool, init: str | None
) -> nn.Module:
    """(N, 3, image_size, image_size) -> (N, num_classes) logits; any image_size works because
    the network ends in global average pooling (image_size changes cost, not parameters)."""
    if init:  # a local file is the offline way to start from ImageNet (or any earlier run)
        model = mobilenet_v2(width_mult=width, num_classes=num_classes)
        load_init(model, init)
        return model
    if not pretrained:
        return mobilenet_v2(width_mult=width, num_classes=num_classes)
    model = _imagenet_mobilenetv2(width)
    if num_classes != 1000:
        head = nn.Linear(model.last_channel, num_classes)
        nn.init.normal_(head.weight, 0, 0.01)  # torchvision's own classifier init
        nn.init.zeros_(head.bias)
        model.classifier[-1] = head
    return model


def _imagenet_mobilenetv2(width: float) -> nn.Module:
    """A 1000-class MobileNetV2 with ImageNet weights; ValueError when they cannot be had."""
    if width != 1.0 and width not in TIMM_WEIGHTS:
        have = ", ".join(str(w) for w in sorted([1.0, *TIMM_WEIGHTS]))
        raise ValueError(
            f"no ImageNet weights for width {width} (available: {have}); "
            "pass init=PATH or drop pretrained"
        )
    try:
        if width == 1.0:
            return mobilenet_v2(weights=MobileNet_V2_Weights.DEFAULT)
        import timm

        source = timm.create_model(TIMM_WEIGHTS[width], pretrained=True)
    except Exception as exc:  # URLError, HF hub errors, ... all mean "could not download"
        raise ValueError(
            f"cannot download ImageNet weights for mobilenetv2 width {width} "
            f"({first_line(exc)}); no network: pass init=PATH"
        ) from exc
    model = mobilenet_v2(width_mult=width)
    copy_by_position(source.state_dict(), model, TIMM_WEIGHTS[width])
    return model
