"""Decode-once pixel cache: every image resized to S x S and kept as uint8 in a .npy file.

Training and evaluation read from the memory-mapped array, so epochs after the first do no JPEG
decoding and the resident memory is the page cache, not a float tensor of the whole set.
Preprocessing: shorter side resized to S (bicubic), centre crop S x S, EXIF orientation applied.
The cache key is the ordered list of image hashes plus S, so new images or another size make
another file (old ones can be deleted at will: they are only a cache).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .images import decode_rgb

CACHE_VERSION = "1"


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE_DIR") or Path.home() / ".cache" / "distill" / "pixels")


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: shorter side to ``size``, then centre crop."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_pixels(
    shas: Sequence[str],
    paths: Sequence[str],
    size: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, size, size, 3) uint8 array (memory-mapped, read-only) for the images, in order.

    ``paths[i]`` is a file whose bytes hash to ``shas[i]``. Built once per (image list, size).
    """
    key = hashlib.sha256(("\n".join(shas) + f"\n{size}\n{CACHE_VERSION}").encode()).hexdigest()[:24]
    target = cache_dir() / f"pixels-{size}-{len(shas)}-{key}.npy"
    if target.exists():
        try:
            return np.load(target, mmap_mode="r")
        except (ValueError, OSError):  # a damaged cache file is rebuilt, never trusted
            target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npy.tmp")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(shas), size, size, 3))
        for i, path in enumerate(paths):
            with open(path, "rb") as f:
                out[i] = resize_center_crop(decode_rgb(f.read()), size)
            if progress:
                progress(1)
        out.flush()
        del out
        os.replace(tmp, target)  # atomic: a killed build leaves only a stray .tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return np.load(target, mmap_mode="r")
