"""MobileNetV1 student (Howard et al. 2017): depthwise-separable convolutions, width multiplier alpha.

Written here because torchvision has no MobileNetV1, and timm's width-multiplied builder
(``timm.models.mobilenetv3._gen_mobilenet_v1``) is private API that may change under us. The
network is small enough to state in full, torchvision-style: ``features`` (a stem and 13
:class:`DepthwiseSeparable` blocks), global average pooling, then ``classifier`` (dropout and
one Linear, as torchvision's mobilenet_v2, so ``classifier_prefix`` and ``load_init`` find the head).

No ImageNet weights come with it: ``pretrained`` auto means random init with a note, on is a
ValueError, and ``init`` loads a local file (an earlier run's, for instance).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import _make_divisible
from torchvision.ops.misc import Conv2dNormActivation

from .pretrained import RANDOM, Weights, cannot
from .registry import load_init, register_student

STEM_CHANNELS = 32
# (output channels, stride) of the 13 depthwise-separable blocks, Table 1 of the paper; each
# block's 3x3 depthwise conv takes the stride, its 1x1 pointwise conv sets the channels.
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
DROPOUT = 0.2  # torchvision's mobilenet_v2 classifier; the paper gives none


def channels(width: float) -> list[int]:
    """The stem's output width, then each block's, rounded as torchvision rounds MobileNetV2's
    (multiples of 8, never more than 10% below ``c * width``) so both students' widths agree."""
    return [_make_divisible(c * width, 8) for c in [STEM_CHANNELS] + [c for c, _ in BLOCKS]]


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv (one filter per channel) + BN + ReLU6, then 1x1 pointwise conv + BN + ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            Conv2dNormActivation(in_channels, in_channels, 3, stride, groups=in_channels,
                                 activation_layer=nn.ReLU6),
            Conv2dNormActivation(in_channels, out_channels, 1, activation_layer=nn.ReLU6),
        )


class MobileNetV1(nn.Module):
    """(N, 3, S, S) -> (N, num_classes) logits for any S: the network ends in global pooling."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = DROPOUT) -> None:
        super().__init__()
        widths = channels(width)
        # Conv2dNormActivation leaves out the conv bias: the batch norm after it has its own shift.
        layers: list[nn.Module] = [Conv2dNormActivation(3, widths[0], 3, 2, activation_layer=nn.ReLU6)]
        for (_, stride), c_in, c_out in zip(BLOCKS, widths, widths[1:]):
            layers.append(DepthwiseSeparable(c_in, c_out, stride))
        self.features = nn.Sequential(*layers)
        self.last_channel = widths[-1]
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        # torchvision's mobilenet_v2 init, so the two students start alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_student("mobilenetv1")
def create_mobilenetv1(
    num_classes: int, width: float, image_size: int, pretrained: str, init: str | None
) -> tuple[nn.Module, Weights]:
    """A randomly initialised MobileNetV1 x``width`` (image_size changes cost, not parameters),
    or one holding the weights of the local file ``init``."""
    model = MobileNetV1(num_classes, width)
    if init:
        return model, load_init(model, init)
    if pretrained == "off":
        return model, RANDOM
    # auto: the note says why it is random; on: this raises the ValueError the user sees.
    return model, cannot(f"mobilenetv1 x{width:g}", pretrained,
                         "torchvision publishes none and this student loads no others",
                         "pass --init FILE (an earlier mobilenetv1 run's model.pt, for instance)")
