"""uint8 pixels: the decode-once cache, and what the trainer does to them on the way to the model.

The cache: every image resized to S x S and kept as uint8 in a .npy file, read memory-mapped, so
epochs after the first do no JPEG decoding and the resident memory is the page cache, not a
float tensor of the whole set. Preprocessing: shorter side resized to S (bicubic), centre crop
S x S, EXIF orientation applied. The cache key is the ordered list of image hashes plus S, so new
images or another size make another file (old ones can be deleted at will: they are only a cache).

Per batch: a random crop and flip done on the uint8 pixels (one gather), then normalisation into
the channels_last float input of the model (one pass), in :class:`PixelBatches`, so DataLoader
workers can do both when there are any.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from students import STUDENT_MEAN, STUDENT_STD

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


def cache_path(shas: Sequence[str], size: int) -> Path:
    """Where the pixels of these images at this size live (whether built yet or not)."""
    key = hashlib.sha256(("\n".join(shas) + f"\n{size}\n{CACHE_VERSION}").encode()).hexdigest()[:24]
    return cache_dir() / f"pixels-{size}-{len(shas)}-{key}.npy"


def load_pixels(
    shas: Sequence[str],
    paths: Sequence[str],
    size: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, size, size, 3) uint8 array (memory-mapped, read-only) for the images, in order.

    ``paths[i]`` is a file whose bytes hash to ``shas[i]``. Built once per (image list, size).
    """
    target = cache_path(shas, size)
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
        # Threads: PIL releases the GIL while decoding and resizing; map() keeps the order.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, pixels in enumerate(pool.map(functools.partial(_decode_resized, size=size), paths)):
                out[i] = pixels
                if progress:
                    progress(1)
        out.flush()
        del out
        os.replace(tmp, target)  # atomic: a killed build leaves only a stray .tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return np.load(target, mmap_mode="r")


def _decode_resized(path: str, size: int) -> np.ndarray:
    with open(path, "rb") as f:
        return resize_center_crop(decode_rgb(f.read()), size)


# -- augmentation and normalisation of (B, S, S, 3) uint8 batches ---------------------------------


def crop_padding(size: int) -> int:
    """Reflect padding of the random crop: 1/8 of the side, at least 4 px (less than the side)."""
    return min(max(4, size // 8), size - 1)


def augment_params(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets (2, n) int64 in [-pad, pad] (rows, columns) and flips (n,) bool."""
    pad = crop_padding(size)
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator) - pad
    return offsets, torch.rand(n, generator=generator) < 0.5


def resized_crop_params(n: int, size: int, generator: torch.Generator, scale: float,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, ...]:
    """Random-resized-crop windows, as torchvision's RandomResizedCrop draws them (area a fraction
    U(scale, 1) of the image, aspect ratio log-uniform in ``ratio``, placed at random), but one per
    image of a batch, from ``generator``: (top-left offsets (2, n), flips (n,), window sizes (2, n)),
    all int64 / bool, for :func:`crop_flip`. A side that comes out longer than the image is cut to
    it (torchvision redraws up to 10 times instead): one draw per image keeps the batch vectorised."""
    area = (scale + (1 - scale) * torch.rand(n, generator=generator)) * size * size
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    h = (area / log_ratio).sqrt().round().clamp(1, size).long()
    w = (area * log_ratio).sqrt().round().clamp(1, size).long()
    window = torch.stack([h, w])
    offsets = (torch.rand(2, n, generator=generator) * (size - window + 1)).long()
    return offsets, torch.rand(n, generator=generator) < 0.5, window


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (reflect-padded) and horizontal flip of a (B, S, S, 3) uint8 batch."""
    return crop_flip(x, *augment_params(x.shape[0], x.shape[1], generator))


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor,
              window: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, S, 3) shifted by ``offsets`` (2, B) with reflection at the borders, and mirrored
    where ``flip`` (B,) is set. With ``window`` (2, B) (heights, widths): the window of that size
    at ``offsets`` resized to S x S, nearest pixel (a random-resized crop, :func:`resized_crop_params`).

    One ``index_select`` of whole pixels: the crop window and the flip become a table of source
    pixels, and reflection is index arithmetic, so nothing is padded or looped over. (Indexing
    with three broadcast index tensors, the obvious way, is ~3x slower on CPU.)
    """
    b, s = x.shape[0], x.shape[1]
    base = torch.arange(s)[None, :]
    if window is None:
        rows, cols = _reflect(base + offsets[0][:, None], s), _reflect(base + offsets[1][:, None], s)
    else:  # nearest-pixel resize as index arithmetic too: output pixel i reads window pixel i * h // S
        rows = offsets[0][:, None] + base * window[0][:, None] // s
        cols = offsets[1][:, None] + base * window[1][:, None] // s
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    source = (torch.arange(b)[:, None, None] * s + rows[:, :, None]) * s + cols[:, None, :]
    pixels = x.reshape(b * s * s, -1)  # a view for the contiguous batches the loader makes
    return pixels.index_select(0, source.view(-1).to(x.device)).view(x.shape)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back in (edge pixel not repeated, as ``mode="reflect"``)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


@functools.lru_cache(maxsize=16)
def _affine(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them from Python lists on CUDA is a blocking copy every step.
    mean_t = torch.tensor(mean) * 255
    std_t = torch.tensor(std) * 255
    return (1 / std_t).to(device), (-mean_t / std_t).to(device)


def to_input(x: torch.Tensor, mean=STUDENT_MEAN, std=STUDENT_STD) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, ``(x / 255 - mean) / std`` per channel, channels_last.

    The one normalisation of student input: training, eval, export and prune all call it with the
    student's own ``mean``/``std`` (its :class:`students.StudentConfig`).
    """
    scale, shift = _affine(x.device, tuple(float(m) for m in mean), tuple(float(s) for s in std))
    y = x.contiguous().to(torch.float32)
    torch.addcmul(shift, y, scale, out=y)  # (x - mean) / std in one pass, in place
    # NHWC permuted to NCHW is channels_last in memory: no copy.
    return y.permute(0, 3, 1, 2)


class PixelBatches(torch.utils.data.Dataset):
    """Item i: micro-batch i as (input, (n,) int64 image rows): ``items[i]`` is (rows (n,) int64,
    crop offsets (2, n), flips (n,)[, window sizes (2, n)]). ``normalise``: the float input of
    :func:`to_input` with the student's ``mean``/``std`` (CPU training), else the augmented
    (n, S, S, 3) uint8 (4x less to copy to a GPU, normalised there).

    Workers reopen the memory-mapped file rather than receive a pickled copy of the whole array.
    """

    def __init__(self, pixels: np.ndarray, items: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]],
                 normalise: bool = True, mean=STUDENT_MEAN, std=STUDENT_STD):
        self.file = getattr(pixels, "filename", None)
        self.pixels = pixels
        self.items = items
        self.normalise = normalise
        self.mean, self.std = tuple(mean), tuple(std)

    def __getstate__(self):
        return {**self.__dict__, "pixels": None if self.file else self.pixels}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        if self.pixels is None:
            self.pixels = np.load(self.file, mmap_mode="r")
        rows, *augmentation = self.items[i]  # (offsets, flips) or (offsets, flips, windows)
        x = crop_flip(torch.from_numpy(self.pixels[rows]), *augmentation)  # fancy indexing copies
        return (to_input(x, self.mean, self.std) if self.normalise else x), torch.from_numpy(rows.astype(np.int64))
