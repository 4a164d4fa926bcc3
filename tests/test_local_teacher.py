"""Local teachers: EfficientNet-Lite0 really recognises a cat; timm and torchscript providers."""

import io
import os

import pytest
import skimage
import torch
from PIL import Image
from torch import nn

from distill_app.device import resolve_device
from distill_app.errors import DistillError
from distill_app.teachers import DISTRIBUTION, TeacherOptions, create_teacher
from distill_app.data import images as images_module
from distill_app.teachers import local as local_module

CAT_PATH = os.path.join(os.path.dirname(skimage.__file__), "data", "chelsea.png")


@pytest.fixture(scope="module")
def cat_bytes():
    with open(CAT_PATH, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def lite0():
    # Loading takes a few seconds: once per module.
    return create_teacher("local", TeacherOptions(device="cpu")).load()


def png_bytes(size=(40, 30), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_local_is_lite0_with_its_own_preprocessing(lite0):
    assert lite0.spec == "local:efficientnet_lite0"
    assert lite0.score_kind == DISTRIBUTION and lite0.remote is False
    assert len(lite0.labels) == 1000 and lite0.labels[0] == "tench, Tinca tinca"
    assert lite0.data_config["mean"] == (0.5, 0.5, 0.5)
    assert lite0.data_config["interpolation"] == "bicubic"


def test_lite0_recognises_the_cat(lite0, cat_bytes):
    [answer] = lite0.classify([cat_bytes])
    assert answer.ok and answer.raw is None and answer.latency_ms > 0
    labels = [label for label, _ in answer.scores]
    probs = [p for _, p in answer.scores]
    assert "cat" in labels[0]
    assert probs == sorted(probs, reverse=True)
    assert 0.9 <= sum(probs) <= 1 + 1e-5
    assert min(probs) >= local_module.MIN_PROB
    assert set(labels) <= set(lite0.labels)


def test_bad_image_fails_alone(lite0, cat_bytes):
    answers = lite0.classify([cat_bytes, b"not an image", png_bytes(), b""])
    assert [a.ok for a in answers] == [True, False, True, False]
    assert answers[1].scores is None
    assert answers[1].error.startswith("cannot decode image:")
    assert "cat" in answers[0].scores[0][0]


def test_pixel_limit_stops_decompression_bombs(lite0, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_PIXELS", 100)
    [answer] = lite0.classify([png_bytes(size=(20, 20))])
    assert not answer.ok and "pixel limit" in answer.error


def test_unknown_prefix_lists_valid_ones():
    with pytest.raises(DistillError) as info:
        create_teacher("nope")
    for prefix in ("local", "timm", "torchscript"):
        assert prefix in str(info.value)


def test_unknown_local_variant_and_timm_name_fail_at_once():
    with pytest.raises(DistillError, match="efficientnet_lite0"):
        create_teacher("local:efficientnet_b7")
    with pytest.raises(DistillError, match="not_a_model_xyz"):
        create_teacher("timm:not_a_model_xyz")


class Tiny(nn.Module):
    """(N, 3, H, W) -> (N, 10); logits, or probabilities when ``softmax``."""

    def __init__(self, softmax: bool = False):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 10)
        self.softmax = softmax
        with torch.no_grad():  # input-independent output with a known order: class_9 first
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.arange(10, dtype=torch.float32) * 0.1)

    def forward(self, x):
        z = self.fc(self.pool(x).flatten(1))
        return torch.softmax(z, dim=-1) if self.softmax else z


def scripted(tmp_path, softmax=False):
    path = tmp_path / f"tiny{int(softmax)}.pt"
    torch.jit.save(torch.jit.script(Tiny(softmax)), str(path))
    return f"torchscript:{path}"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated but still supported
@pytest.mark.parametrize("softmax", [False, True])
def test_torchscript_teacher(tmp_path, cat_bytes, softmax):
    teacher = create_teacher(scripted(tmp_path, softmax), TeacherOptions(device="cpu"))
    assert teacher.labels == [f"class_{i}" for i in range(10)]
    [answer] = teacher.classify([cat_bytes])
    assert [label for label, _ in answer.scores] == [f"class_{i}" for i in range(9, -1, -1)]
    # An output that is already a distribution must not be softmaxed a second time.
    expected = torch.softmax(torch.arange(10) * 0.1, dim=0)[9].item()
    assert answer.scores[0][1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_top_k_caps_the_answer(tmp_path, cat_bytes):
    teacher = create_teacher(scripted(tmp_path), TeacherOptions(device="cpu", top_k=3))
    [answer] = teacher.classify([cat_bytes])
    assert [label for label, _ in answer.scores] == ["class_9", "class_8", "class_7"]


def test_torchscript_missing_file(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        create_teacher(f"torchscript:{tmp_path / 'missing.pt'}")


def test_timm_teacher_from_checkpoint(tmp_path, cat_bytes):
    import timm

    model = timm.create_model("mobilenetv3_small_050", num_classes=5)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    teacher = create_teacher(f"timm:mobilenetv3_small_050:{path}", TeacherOptions(device="cpu"))
    assert teacher.spec == f"timm:mobilenetv3_small_050:{path}"
    assert teacher.labels == [f"class_{i}" for i in range(5)]
    [answer] = teacher.classify([cat_bytes])
    assert answer.ok and sum(p for _, p in answer.scores) == pytest.approx(1, abs=1e-3)


def test_timm_spec_splits_after_the_name_only():
    assert local_module.split_timm_spec(r"resnet50:C:\w\m.pth") == ("resnet50", r"C:\w\m.pth")
    assert local_module.split_timm_spec("resnet50") == ("resnet50", "")


def test_timm_without_checkpoint_offline_says_what_to_do(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co")

    teacher = create_teacher("timm:resnet18", TeacherOptions(device="cpu"))  # no network yet
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(DistillError, match="timm:resnet18:CHECKPOINT"):
        teacher.load()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DistillError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistillError, match="--device cpu"):
            resolve_device("cuda")
