"""Finding and reading the user's images: recursive scan, content hash, safe decoding.

Every unreadable or non-image file becomes a :class:`Skip` with a short reason; nothing here
raises for a bad file.
"""

from __future__ import annotations

import hashlib
import io
import os
import logging
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from ..errors import DistillError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
# Decompression-bomb guard: PIL warns above MAX_IMAGE_PIXELS and raises above twice that;
# we refuse anything above it (an 80-megapixel photo is already far beyond what we upload).
MAX_PIXELS = 80_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class ImageFile:
    path: str
    label: str | None  # class folder name when the images folder has class subfolders


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


@dataclass(frozen=True)
class LoadedImage:
    path: str
    label: str | None
    sha256: str
    data: bytes
    width: int
    height: int


def scan(root: str | os.PathLike) -> tuple[list[ImageFile], list[Skip]]:
    """Image files under ``root`` (recursive, sorted, symlink loops ignored).

    Labels: when ``root`` has subfolders, a file's label is the name of the top-level
    subfolder holding it; files directly in ``root`` then have no label.
    """
    root = Path(root)
    files: list[ImageFile] = []
    skips: list[Skip] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=None):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop: visit each folder once
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        label = rel.parts[0] if rel.parts else None
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                files.append(ImageFile(path, label))
            elif not name.startswith("."):
                skips.append(Skip(path, "not an image file type"))
    return files, skips


def display_path(path: str) -> str:
    """``path`` as valid UTF-8 text for the store and for printing: bytes of a non-UTF-8 file
    name (kept by Python as surrogates) become U+FFFD. Files are always opened by the real path."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(image: ImageFile) -> bytes | Skip:
    """The file's bytes, or why they cannot be had (unreadable, empty)."""
    try:
        with open(image.path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Skip(image.path, f"unreadable: {e.strerror or type(e).__name__}")
    return data if data else Skip(image.path, "empty file")


def load(image: ImageFile) -> LoadedImage | Skip:
    """Read and check one file: its bytes, hash and size, or why it cannot be used."""
    data = read(image)
    if isinstance(data, Skip):
        return data
    try:
        width, height = check_decodes(data)
    except ValueError as e:
        return Skip(image.path, str(e))
    return LoadedImage(image.path, image.label, sha256_bytes(data), data, width, height)


def check_decodes(data: bytes) -> tuple[int, int]:
    """Fully decode ``data`` (truncated files fail here, not in training); returns (w, h)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                width, height = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"too many pixels (limit {MAX_PIXELS:,})") from None
    except Exception as e:  # PIL raises many types for bad data; all mean "not usable"
        raise ValueError(f"not a readable image: {type(e).__name__}") from None
    if width < 1 or height < 1:
        raise ValueError("image has no pixels")
    return width, height


def open_image(data: bytes) -> Image.Image:
    """Open encoded bytes, refusing decompression bombs on the header, before any decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ValueError(f"too many pixels (limit {MAX_PIXELS:,})") from None
    except Exception as e:
        raise ValueError(f"not a readable image: {type(e).__name__}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is over the {MAX_PIXELS:,} pixel limit")
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB, whatever the mode: 16-bit greyscale is scaled (not clipped), CMYK and palettes
    converted, transparency composited on white (what a viewer shows)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if has_alpha(image):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode to an upright 8-bit RGB image (EXIF orientation applied; first frame of animations).

    Raises ValueError with a short reason for anything undecodable or too large.
    """
    image = open_image(data)
    try:
        with image:
            return to_rgb8(ImageOps.exif_transpose(image))
    except ValueError:
        raise
    except Exception as e:  # truncated data and friends surface only when pixels are read
        raise ValueError(f"not a readable image: {type(e).__name__}") from None


# -- the one scanner: harvest, train, eval and export all see the same images ------------------


@dataclass(frozen=True)
class ScannedImage:
    """A readable image file: what the store records about it (no pixels, no bytes kept)."""

    path: str
    label: str | None
    sha256: str
    width: int
    height: int
    bytes: int


@dataclass
class ScannedFolder:
    """Every image file under a folder, checked: the usable ones in scan order, and why the rest
    cannot be used."""

    root: str
    files: int  # image files found (by suffix)
    images: list[ScannedImage]  # every usable file; the same bytes under two names appear twice
    skipped: Counter  # reason -> files that cannot be used (bad type, unreadable, corrupt, ...)

    def distinct(self) -> list[ScannedImage]:
        """One entry per content hash: the first file (in scan order) holding those bytes."""
        seen: dict[str, ScannedImage] = {}
        for image in self.images:
            seen.setdefault(image.sha256, image)
        return list(seen.values())

    @property
    def duplicates(self) -> int:
        """Files whose bytes equal an earlier file's."""
        return len(self.images) - len({i.sha256 for i in self.images})


def scan_images(root: str | os.PathLike, progress: Callable[[int, int], None] | None = None,
                flag: str = "--images") -> ScannedFolder:
    """Scan ``root``, then read, hash and fully decode every image file (threads: reading and
    hashing release the GIL, decoding partly does). ``progress(done, total)`` per file.

    A missing folder is a DistillError naming ``flag``; bad files are counted in ``skipped``.
    """
    if not os.path.isdir(root):
        raise DistillError(f"{flag} {display_path(str(root))!r} is not a folder")
    files, skips = scan(root)
    skipped = Counter(s.reason for s in skips)
    images: list[ScannedImage] = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for done, item in enumerate(pool.map(_checked, files), 1):
            if isinstance(item, Skip):
                skipped[item.reason] += 1
                log.debug("skipped %s: %s", item.path, item.reason)
            else:
                images.append(item)
            if progress:
                progress(done, len(files))
    return ScannedFolder(str(root), len(files), images, skipped)


def _checked(file: ImageFile) -> ScannedImage | Skip:
    loaded = load(file)
    if isinstance(loaded, Skip):
        return loaded
    return ScannedImage(loaded.path, loaded.label, loaded.sha256, loaded.width, loaded.height, len(loaded.data))


@dataclass
class ImageList:
    """The distinct usable images under a folder, in scan order (what train, eval and export read)."""

    shas: list[str]
    paths: list[str]
    labels: list[str | None]  # folder labels (None: file not in a class folder)
    skipped: dict[str, int]  # reason -> count of files that could not be used
    duplicates: int  # files whose bytes equal an earlier file's (read once)


def list_images(root: str | os.PathLike, progress: Callable[[int, int], None] | None = None,
                flag: str = "--images") -> ImageList:
    """:func:`scan_images`, one entry per content hash; a DistillError when none is usable."""
    found = scan_images(root, progress, flag)
    distinct = found.distinct()
    if not distinct:
        raise DistillError(f"no usable images under {display_path(str(root))} "
                           f"({sum(found.skipped.values())} files skipped): check {flag}")
    return ImageList([i.sha256 for i in distinct], [i.path for i in distinct], [i.label for i in distinct],
                     dict(found.skipped), found.duplicates)
