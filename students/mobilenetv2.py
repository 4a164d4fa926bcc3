"""MobileNetV2 student (Sandler et al. 2018) with width multiplier alpha and input resolution rho.

The architecture is torchvision's ``mobilenet_v2``: a well-kept reference implementation of
inverted residuals, linear bottlenecks and ReLU6, with the ``t, c, n, s`` table and
``_make_divisible`` channel rounding. We reuse it rather than rewrite it; this module only adds
width validation (in the registry), ImageNet weights for the widths that have them, and ``init``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from .pretrained import RANDOM, Weights, cannot, offline, timm_cached, torchvision_cached
from .registry import load_init, register_student
from .weights import copy_by_position, first_line

# Widths with published ImageNet weights besides torchvision's 1.0 (timm 1.0.31 publishes 050, 100,
# 110d, 120d and 140; 110d/120d are deeper networks, not a width). timm's mobilenetv2_XXX has
# exactly torchvision's tensor layout (same order and shapes), so its weights are copied in by position.
TIMM_WEIGHTS = {0.5: "mobilenetv2_050", 1.4: "mobilenetv2_140"}


@register_student("mobilenetv2")
def create_mobilenetv2(
    num_classes: int, width: float, image_size: int, pretrained: str, init: str | None
) -> tuple[nn.Module, Weights]:
    """(N, 3, image_size, image_size) -> (N, num_classes) logits; any image_size works because
    the network ends in global average pooling (image_size changes cost, not parameters)."""
    if init:  # a local file is the offline way to start from ImageNet (or any earlier run)
        model = mobilenet_v2(width_mult=width, num_classes=num_classes)
        return model, load_init(model, init)
    if pretrained == "off":
        return mobilenet_v2(width_mult=width, num_classes=num_classes), RANDOM
    model, weights = _imagenet_mobilenetv2(width, pretrained)
    if model is None:  # auto, nothing to be had: random init, and the note says why
        return mobilenet_v2(width_mult=width, num_classes=num_classes), weights
    if num_classes != 1000:
        head = nn.Linear(model.last_channel, num_classes)
        nn.init.normal_(head.weight, 0, 0.01)  # torchvision's own classifier init
        nn.init.zeros_(head.bias)
        model.classifier[-1] = head
    return model, weights


def _imagenet_mobilenetv2(width: float, mode: str) -> tuple[nn.Module | None, Weights]:
    """A 1000-class MobileNetV2 with ImageNet weights from the caches or a download; (None, a
    random-init note) when ``auto`` finds none, a ValueError when ``on`` does not."""
    what = f"mobilenetv2 x{width}"
    if width != 1.0 and width not in TIMM_WEIGHTS:
        have = ", ".join(f"{w:g}" for w in sorted([1.0, *TIMM_WEIGHTS]))
        return None, cannot(what, mode, f"weights are published for widths {have} only")
    if width == 1.0:
        source = f"torchvision:{MobileNet_V2_Weights.DEFAULT}"
        if torchvision_cached(MobileNet_V2_Weights.DEFAULT.url) is None and offline():
            return None, cannot(what, mode, f"not in the torch cache {torch.hub.get_dir()}, and downloads are off")
    else:
        source = f"timm:{TIMM_WEIGHTS[width]}"
        cached = timm_cached(TIMM_WEIGHTS[width])
        if cached is None and offline("huggingface.co"):
            return None, cannot(what, mode, "not in the Hugging Face cache, and huggingface.co is off or out of reach")
    try:
        # fork_rng: an attempt (failed or not) leaves the seeded RNG as it was, so a random-init
        # fallback is the same whether or not a download was tried.
        with torch.random.fork_rng(devices=[]):
            if width == 1.0:  # torchvision reuses its cache file, else downloads it
                return mobilenet_v2(weights=MobileNet_V2_Weights.DEFAULT), Weights(source)
            import timm

            overlay = {"file": cached} if cached else None
            timm_model = timm.create_model(TIMM_WEIGHTS[width], pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # URLError, HF hub errors, ... all mean "could not download"
        return None, cannot(what, mode, f"cannot download them: {first_line(exc)}")
    model = mobilenet_v2(width_mult=width)
    copy_by_position(timm_model.state_dict(), model, source)
    cfg = timm_model.pretrained_cfg
    return model, Weights(source, tuple(cfg["mean"]), tuple(cfg["std"]))
