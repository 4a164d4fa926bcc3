"""Students: the MobileNetV2 registry entry, timm fallback, validation, init, size and cost."""

from pathlib import Path

import pytest
import torch
from torch import nn

import students
from students import (
    STUDENT_MEAN,
    StudentConfig,
    count_macs,
    count_params,
    create_student,
    register_student,
    student_names,
)


def test_mobilenetv2_small_width_and_resolution_forward():
    model = create_student("mobilenetv2", num_classes=10, width=0.5, image_size=96)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 10)


def test_width_shrinks_params_and_resolution_shrinks_macs():
    narrow = create_student("mobilenetv2", 10, width=0.35)
    full = create_student("mobilenetv2", 10, width=1.0)
    assert count_params(narrow) < count_params(full)
    assert count_macs(full, 96) < count_macs(full, 224)
    # MobileNetV2 1.0 at 224 px is ~300 M MACs in the paper; 1000 vs 10 classes barely matters.
    assert 280e6 < count_macs(full, 224) < 320e6


def test_count_macs_keeps_training_mode():
    model = create_student("mobilenetv2", 3, width=0.35).train()
    count_macs(model, 64)
    assert model.training


def test_timm_name_is_accepted():
    model = create_student("mobilenetv3_small_050", num_classes=10, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("width", [0.1, 2.0])
def test_bad_width_names_the_value(width):
    with pytest.raises(ValueError, match=str(width)):
        create_student("mobilenetv2", 10, width=width)


def test_bad_image_size_and_classes_name_the_value():
    with pytest.raises(ValueError, match="1000"):
        create_student("mobilenetv2", 10, image_size=1000)
    with pytest.raises(ValueError, match="0"):
        create_student("mobilenetv2", 0)


def test_unknown_name_lists_registered_names():
    with pytest.raises(ValueError, match="mobilenetv2") as info:
        create_student("not_a_model_xyz", 10)
    assert "not_a_model_xyz" in str(info.value)


def test_register_student_plugin_hook():
    @register_student("tiny_test_student")
    def tiny(num_classes, width, image_size, pretrained, init):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert "tiny_test_student" in student_names()
    assert isinstance(create_student("tiny_test_student", 4), nn.Sequential)


def test_init_loads_weights_and_skips_a_different_classifier(tmp_path):
    source = create_student("mobilenetv2", 1000, width=0.35)
    path = tmp_path / "imagenet.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    student = create_student("mobilenetv2", 5, width=0.35, init=str(path))
    assert torch.equal(student.features[0][0].weight, source.features[0][0].weight)
    assert student.classifier[-1].out_features == 5


def test_init_of_another_width_fails_clearly(tmp_path):
    path = tmp_path / "w035.pt"
    torch.save(create_student("mobilenetv2", 5, width=0.35).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        create_student("mobilenetv2", 5, width=1.0, init=str(path))


def test_pretrained_offline_says_pass_init(monkeypatch):
    real = students.mobilenetv2.mobilenet_v2

    def offline(*args, weights=None, **kwargs):
        if weights is not None:
            raise OSError("Name or service not known")
        return real(*args, **kwargs)

    monkeypatch.setattr(students.mobilenetv2, "mobilenet_v2", offline)
    with pytest.raises(ValueError, match="no network: pass init=PATH"):
        create_student("mobilenetv2", 10, pretrained=True)


def test_pretrained_width_without_weights_is_refused():
    with pytest.raises(ValueError, match="0.75"):
        create_student("mobilenetv2", 10, width=0.75, pretrained=True)


def test_student_config_round_trip():
    config = StudentConfig("mobilenetv2", num_classes=3, width=0.5, image_size=96)
    data = config.to_dict()
    assert data["mean"] == list(STUDENT_MEAN)
    assert StudentConfig.from_dict({**data, "future_field": 1}) == config
    assert config.create()(torch.zeros(1, 3, 96, 96)).shape == (1, 3)
    with pytest.raises(ValueError, match="num_classes"):
        StudentConfig.from_dict({"name": "mobilenetv2"})


def _no_network(monkeypatch):
    """Any connection attempt fails the test (``socket.connect`` is where every download starts)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_pretrained_auto_falls_back_to_random_with_a_notice(monkeypatch):
    _no_network(monkeypatch)
    model, weights = students.build_student("mobilenetv2", 10, width=1.0, pretrained="auto")
    assert weights.source == "random" and not weights.pretrained
    assert "random init" in weights.note and "--init FILE" in weights.note and "\n" not in weights.note
    assert model.classifier[-1].out_features == 10


def test_pretrained_on_fails_in_one_line_and_off_never_looks(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(ValueError, match="no ImageNet weights for mobilenetv2 x0.5") as info:
        students.build_student("mobilenetv2", 10, width=0.5, pretrained="on")
    assert "\n" not in str(info.value)
    monkeypatch.delenv("DISTILL_OFFLINE")  # off must not even try, offline or not
    _, weights = students.build_student("mobilenetv2", 10, width=1.0, pretrained="off")
    assert weights.source == "random" and weights.note is None


def test_pretrained_auto_uses_the_torch_cache(monkeypatch, tmp_path):
    """A torchvision weights file in the torch hub cache is used without any network."""
    from torchvision.models import MobileNet_V2_Weights

    _no_network(monkeypatch)
    source = create_student("mobilenetv2", 1000, width=1.0)
    cache = Path(torch.hub.get_dir(), "checkpoints")
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / MobileNet_V2_Weights.DEFAULT.url.rsplit("/", 1)[-1])
    model, weights = students.build_student("mobilenetv2", 3, width=1.0, pretrained="auto")
    assert weights.source.startswith("torchvision:") and weights.mean == STUDENT_MEAN
    assert torch.equal(model.features[0][0].weight, source.features[0][0].weight)
    assert model.classifier[-1].out_features == 3  # the head is replaced for other class counts


def test_init_file_carries_its_normalisation(tmp_path):
    source = create_student("mobilenetv2", 1000, width=0.35)
    path = tmp_path / "imagenet.pt"
    torch.save({"state_dict": source.state_dict(), "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}, path)
    _, weights = students.build_student("mobilenetv2", 4, width=0.35, init=str(path), pretrained="auto")
    assert weights.source == f"init:{path}" and weights.mean == (0.5,) * 3 and weights.std == (0.5,) * 3
    torch.save({"state_dict": source.state_dict(), "normalize": {"mean": [0.5], "std": [0.5] * 3}}, path)
    with pytest.raises(ValueError, match="normalize"):
        students.build_student("mobilenetv2", 4, width=0.35, init=str(path))
    torch.save(source.state_dict(), path)  # a plain state dict: ImageNet statistics, as before
    assert students.build_student("mobilenetv2", 4, width=0.35, init=str(path))[1].mean == STUDENT_MEAN
