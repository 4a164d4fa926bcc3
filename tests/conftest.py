"""Shared fixtures: an isolated workspace per test and small real photos to work on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from distill_app.demo import make_variants, sample_photo_paths


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own pixel cache and no inherited store/keys."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "pixel-cache"))
    for var in ("DISTILL_DB", "HF_TOKEN", "GOOGLE_API_KEY", "AZURE_VISION_KEY", "AZURE_VISION_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
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


@pytest.fixture
def photos(tmp_path) -> Path:
    return write_photos(tmp_path / "photos")
