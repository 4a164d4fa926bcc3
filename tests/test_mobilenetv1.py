"""The MobileNetV1 student: shapes, size and cost against the paper's closed forms, one training
step, weights provenance, and the measured depthwise-separable savings (students.separable_costs)."""

from itertools import pairwise

import pytest
import torch
from torch import nn

from students import (
    StudentConfig,
    build_student,
    count_macs,
    count_params,
    create_student,
    separable_costs,
    student_names,
)

# Stem width, then the 13 blocks' output widths, worked out by hand from the paper's 32, 64, 128,
# 128, 256, 256, 512 x6, 1024, 1024 times alpha, rounded as torchvision rounds MobileNetV2
# (nearest multiple of 8, bumped up by 8 when that falls more than 10% short: 0.35 * 32 = 11.2 -> 16).
WIDTHS = {
    0.5: [16, 32, 64, 64, 128, 128] + [256] * 6 + [512, 512],
    0.35: [16, 24, 48, 48, 88, 88] + [176] * 6 + [360, 360],
}


def expected_params(widths: list[int], num_classes: int) -> int:
    """Closed-form parameter count: stem 3x3x3 conv (no bias) + BN scale/shift; per block a
    3x3 depthwise conv + BN on M channels, a 1x1 conv M -> N + BN on N; the final Linear."""
    c0 = widths[0]
    total = 27 * c0 + 2 * c0
    for m, n in pairwise(widths):
        total += 9 * m + 2 * m + m * n + 2 * n
    return total + widths[-1] * num_classes + num_classes


def test_registered():
    assert "mobilenetv1" in student_names()


@pytest.mark.parametrize("width,size", [(0.35, 32), (0.5, 96), (1.0, 64), (0.5, 113)])
def test_output_shape_for_widths_and_image_sizes(width, size):
    model = create_student("mobilenetv1", 7, width=width, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("width", sorted(WIDTHS))
def test_parameter_count_matches_the_closed_form(width):
    model = create_student("mobilenetv1", 10, width=width, image_size=64)
    assert count_params(model) == expected_params(WIDTHS[width], 10)
    assert model.last_channel == WIDTHS[width][-1]


def test_full_width_matches_the_paper():
    # Howard et al. 2017, Table 8: 1.0 MobileNet-224 has 569 M mult-adds and 4.2 M parameters.
    model = create_student("mobilenetv1", 1000, width=1.0, image_size=224)
    assert count_macs(model, 224) == pytest.approx(569e6, rel=0.02)
    assert count_params(model) == pytest.approx(4.2e6, rel=0.02)
    assert count_params(model) == expected_params([32, 64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024], 1000)


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = create_student("mobilenetv1", 3, width=0.35, image_size=32).train()
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    head = model.classifier[-1].weight.detach().clone()
    stem = model.features[0][0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.classifier[-1].weight, head)
    assert not torch.equal(model.features[0][0].weight, stem)  # gradients reach the stem


def test_every_block_saves_what_the_paper_says():
    model = create_student("mobilenetv1", 10, width=0.5, image_size=96)
    blocks = separable_costs(model, 96)
    assert len(blocks) == 13
    widths = WIDTHS[0.5]
    side = 48  # the stem halves 96 px; blocks 2, 4, 6 and 12 halve it again
    for i, (block, m, n) in enumerate(zip(blocks, widths, widths[1:])):
        side //= 2 if i in (1, 3, 5, 11) else 1
        assert (block["in"], block["out"], block["kernel"], block["out_hw"]) == (m, n, 3, (side, side))
        assert block["block"] == f"features.{i + 1}"
        assert block["separable_macs"] == side * side * m * (9 + n)
        assert block["standard_macs"] == side * side * m * n * 9
        assert block["formula"] == pytest.approx(1 / n + 1 / 9, abs=1e-12)
        assert abs(block["ratio"] - block["formula"]) < 1e-9


def test_separable_costs_on_mobilenetv2_and_a_pruned_one():
    from students.pruned import expanded_blocks, slice_conv

    model = create_student("mobilenetv2", 10, width=0.5, image_size=64)
    blocks = separable_costs(model, 64)
    assert len(blocks) == 17  # one depthwise conv and its 1x1 projection per inverted residual
    assert all(abs(b["ratio"] - b["formula"]) < 1e-9 for b in blocks)
    assert blocks[1]["block"] == "features.2.conv" and blocks[1]["pointwise"] == "features.2.conv.2"

    # Halve the hidden width of the first expanded block by hand: the measurement follows.
    _, block = expanded_blocks(model)[0]
    keep = torch.arange(block.conv[1][0].in_channels // 2)
    block.conv[0][0] = slice_conv(block.conv[0][0], out_idx=keep)
    block.conv[0][1] = _slice_bn(block.conv[0][1], keep)
    block.conv[1][0] = slice_conv(block.conv[1][0], out_idx=keep)
    block.conv[1][1] = _slice_bn(block.conv[1][1], keep)
    block.conv[2] = slice_conv(block.conv[2], in_idx=keep)
    pruned = separable_costs(model, 64)
    assert pruned[1]["in"] == blocks[1]["in"] // 2 and pruned[1]["out"] == blocks[1]["out"]
    assert abs(pruned[1]["ratio"] - pruned[1]["formula"]) < 1e-9


def _slice_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep))
    new.load_state_dict({k: v[keep] if v.dim() else v for k, v in bn.state_dict().items()})
    return new


def test_a_model_without_depthwise_convs_has_none():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Flatten())
    assert separable_costs(model, 16) == []


def test_no_imagenet_weights_on_refuses_auto_notes_off_is_silent():
    with pytest.raises(ValueError, match="no ImageNet weights for mobilenetv1 x0.5"):
        build_student("mobilenetv1", 10, width=0.5, pretrained="on")
    model, weights = build_student("mobilenetv1", 10, width=0.5, pretrained="auto")
    assert weights.source == "random" and "random init" in weights.note and "--init FILE" in weights.note
    assert model.classifier[-1].out_features == 10
    _, weights = build_student("mobilenetv1", 10, width=0.5, pretrained="off")
    assert weights.source == "random" and weights.note is None


def test_init_file_and_config_round_trip(tmp_path):
    config = StudentConfig("mobilenetv1", num_classes=4, width=0.35, image_size=32)
    assert StudentConfig.from_dict(config.to_dict()) == config
    torch.manual_seed(1)
    source = config.create().eval()
    rebuilt = config.create()
    rebuilt.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), source(x))

    # An ImageNet-shaped file (1000 classes) loads all but the head, as for MobileNetV2.
    path = tmp_path / "v1.pt"
    torch.save(create_student("mobilenetv1", 1000, width=0.35).state_dict(), path)
    student, weights = build_student("mobilenetv1", 4, width=0.35, init=str(path))
    assert weights.source == f"init:{path}"
    assert torch.equal(student.features[5][1][0].weight, torch.load(path)["features.5.1.0.weight"])
