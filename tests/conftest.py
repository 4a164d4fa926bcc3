"""Shared fixtures: an isolated workspace per test and small real photos to work on."""

from __future__ import annotations

import json
import os
import random
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from hypothesis import settings
import torch
from PIL import Image
from torch import nn

from distill_app.demo import make_variants, sample_photo_paths


# Property tests draw the same examples on every run (CI included), so a red run is a real
# regression, reproducible here; HYPOTHESIS_PROFILE=explore draws new examples when hunting bugs.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models: a second thread gains nothing, and on a shared 2-core machine
    OpenMP's spinning barriers make each step 10-100x slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own pixel cache and no inherited store/keys."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "pixel-cache"))
    for var in ("DISTILL_DB", "HF_TOKEN", "GOOGLE_API_KEY", "AZURE_VISION_KEY", "AZURE_VISION_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    # Weights: empty caches of our own, and never a download (tests must not need the network).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("DISTILL_OFFLINE", "1")
    return tmp_path


def write_photos(root: Path, classes=("cat", "coffee"), per_class: int = 4, size: int = 64,
                 seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg``: crops of the real sample photos (cat = Chelsea, coffee = cup)."""
    rng = random.Random(seed)
    photos = sample_photo_paths()
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        with Image.open(photos[cls]) as photo:
            for i, view in enumerate(make_variants(photo, per_class, rng, size=size)):
                view.save(root / cls / f"{cls}-{i}.jpg", quality=90)
    return root


def store_folder_answers(photos: Path, db, score: float, teacher: str = "local:efficientnet_lite0") -> None:
    """Record every photo under ``photos`` in a real store at ``db`` as answered by ``teacher``:
    its folder label with ``score``, "other thing" with the rest (the teacher is tested elsewhere)."""
    from cache import ImageRow, Response, open_store
    from distill_app.data.images import sha256_bytes

    files = sorted(photos.rglob("*.jpg"))
    shas = [sha256_bytes(f.read_bytes()) for f in files]
    store = open_store(str(db))
    store.add_images(ImageRow(s, str(f), 64, 64, f.stat().st_size, f.parent.name) for s, f in zip(shas, files))
    t = store.teacher_id(teacher, "distribution")
    store.record(t, [Response(s, [(f.parent.name, score), ("other thing", round(1 - score, 6))])
                     for s, f in zip(shas, files)])
    store.close()


@pytest.fixture
def photos(tmp_path) -> Path:
    return write_photos(tmp_path / "photos")


class TinyTeacher(nn.Module):
    """(N, 3, H, W) -> (N, 10) logits from the mean colour: a real, fast local model whose
    answers differ between photos (for the HTTP tests, served by serve-teacher)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 10)
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(-3, 3, 30).reshape(10, 3))
            self.fc.bias.copy_(torch.linspace(-1, 1, 10))

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


def save_tiny_teacher(path: Path) -> Path:
    """Script and save :class:`TinyTeacher` at ``path``; use it as ``torchscript:PATH``."""
    torch.jit.save(torch.jit.script(TinyTeacher()), str(path))
    return path


class QuietHandler(BaseHTTPRequestHandler):
    """Base of the tests' own loopback HTTP servers: keep-alive, no request log, one way to reply."""

    protocol_version = "HTTP/1.1"

    def reply(self, status: int, data, content_type: str = "application/json") -> None:
        """Send ``data`` (bytes, str, or an object written as JSON) with ``status``."""
        if not isinstance(data, (bytes, str)):
            data = json.dumps(data)
        data = data.encode() if isinstance(data, str) else data
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher_spec(tmp_path) -> str:
    """A real local teacher (:class:`TinyTeacher`, scripted) as a ``torchscript:PATH`` spec."""
    return f"torchscript:{save_tiny_teacher(tmp_path / 'tiny-teacher.pt')}"


SERVER_TOKEN = "test-token-5e1f0c"


@pytest.fixture
def start_server(teacher_spec):
    """start(**ServeOptions fields) -> a running serve-teacher of the tiny teacher on 127.0.0.1:<free
    port>, with ``SERVER_TOKEN`` unless the test says otherwise; all stopped after the test."""
    from distill_app.teachers.serve import ServeOptions, serve, stop

    servers = []

    def start(**kwargs):
        kwargs.setdefault("token", SERVER_TOKEN)
        server, _ = serve(ServeOptions(teacher=teacher_spec, port=0, device="cpu", **kwargs))
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop(server)


def decisive_student(num_classes: int = 2, size: int = 32, batches: int = 3, head_std: float | None = 0.05):
    """A random MobileNetV2 x0.35 whose predictions differ between images, without training.

    Straight from torchvision's init its logits are ~1e-9 (all classes tied, so the argmax is
    float noise and could differ between batch sizes); batch-norm statistics from a few random
    batches (and a larger classifier, unless ``head_std`` is None) make the outputs O(1).
    """
    from students import create_student

    torch.manual_seed(0)
    model = create_student("mobilenetv2", num_classes, width=0.35, image_size=size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(16, 3, size, size) * 4 - 2)
    if head_std is not None:
        torch.nn.init.normal_(model.classifier[-1].weight, 0, head_std)
    return model.eval()


def save_test_student(path: Path, model: nn.Module, classes, teachers=("local:efficientnet_lite0",),
                      size: int = 32, width: float = 0.35, **fields) -> Path:
    """Write ``model`` as a distill ``model.pt`` at ``path`` (a run folder's file), as a run of
    MobileNetV2 x``width`` at ``size`` px trained on ``teachers`` would; ``fields`` add or replace
    StudentFile fields (config, label_map, metrics, ...)."""
    from distill_app.training.checkpoint import StudentFile, save_student
    from students import StudentConfig

    meta = StudentFile(StudentConfig("mobilenetv2", len(classes), width, size), list(classes), list(teachers),
                       config={"label_map": None})
    for key, value in fields.items():
        setattr(meta, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_student(path, model, meta)
    return path
