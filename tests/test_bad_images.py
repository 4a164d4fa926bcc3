"""Every kind of bad or odd image file: a counted, reasoned skip or a correct upload; never a crash."""

import io
import os
import struct
import zlib

import pytest
from PIL import Image

from cache import open_store
from distill_app.data import images as imgs
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.harvest.upload import prepare_upload


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.new("RGB", (40, 20), "green"), "JPEG", exif=exif.tobytes())


GOOD = {  # file name -> bytes: odd but valid, must be answered
    "cmyk.jpg": lambda: _save(Image.new("CMYK", (32, 32), (0, 128, 128, 0)), "JPEG"),
    "sixteen_bit.png": lambda: _save(Image.new("I;16", (32, 32), 40000), "PNG"),
    "palette_alpha.png": lambda: _save(_palette_with_transparency(), "PNG"),
    "animated.gif": lambda: _save(Image.new("P", (16, 16)), "GIF", save_all=True,
                                  append_images=[Image.new("P", (16, 16), 3)], duration=50),
    "rotated.jpg": _exif_rotated,
    "one_pixel.png": lambda: _save(Image.new("RGB", (1, 1), "red"), "PNG"),
    "really_png.jpg": lambda: _save(Image.new("RGB", (20, 20), "blue"), "PNG"),  # wrong extension
}
BAD = {  # file name -> (bytes, reason prefix)
    "zero.jpg": (lambda: b"", "empty file"),
    "truncated.jpg": (lambda: _save(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300],
                      "not a readable image"),
    "text.jpg": (lambda: b"just some text\n" * 10, "not a readable image"),
    "bomb.png": (lambda: _png_with_declared_size(100_000, 100_000), "too many pixels"),
}


def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    return im


@pytest.fixture
def zoo(tmp_path):
    root = tmp_path / "zoo"
    root.mkdir()
    for name, make in GOOD.items():
        (root / name).write_bytes(make())
    for name, (make, _) in BAD.items():
        (root / name).write_bytes(make())
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")  # unreadable: points nowhere
    (root / "loop").symlink_to(root)  # a symlink loop
    with open(os.path.join(os.fsencode(root), b"caf\xe9-latin1.png"), "wb") as f:  # not UTF-8
        f.write(_save(Image.new("RGB", (8, 8), "white"), "PNG"))
    return root


def test_each_bad_file_is_a_reasoned_skip(zoo):
    files, _ = imgs.scan(zoo)
    loaded = {os.path.basename(f.path): imgs.load(f) for f in files}
    for name, (_, reason) in BAD.items():
        assert isinstance(loaded[name], imgs.Skip) and loaded[name].reason.startswith(reason), name
    assert loaded["dangling.jpg"].reason.startswith("unreadable")
    for name in GOOD:
        assert isinstance(loaded[name], imgs.LoadedImage), name


@pytest.mark.parametrize("name", list(GOOD))
def test_odd_but_valid_files_upload_correctly(name):
    data, mime = prepare_upload(GOOD[name](), max_side=64)
    out = Image.open(io.BytesIO(data))
    assert out.mode in ("RGB", "RGBA") and max(out.size) <= 64
    assert not out.getexif()
    if name == "rotated.jpg":
        assert out.size == (20, 40)
    if name == "sixteen_bit.png":  # scaled to 8 bits, not clipped to white
        assert out.getpixel((0, 0))[0] == pytest.approx(40000 / 256, abs=2)


def test_harvest_over_the_zoo_never_crashes(zoo):
    s = harvest(HarvestConfig(images=str(zoo), db="zoo.db", batch_size=4))
    assert s["succeeded"] == len(GOOD) + 1  # + the non-UTF-8 name
    assert s["failed"] == 0
    assert s["skipped_files"] == len(BAD) + 1  # + the dangling link
    store = open_store("zoo.db")
    stored = [r["path"] for r in store.db["paths"].rows]
    assert any("caf" in p and p.endswith("-latin1.png") for p in stored)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions(tmp_path):
    p = tmp_path / "locked.jpg"
    p.write_bytes(_exif_rotated())
    p.chmod(0)
    out = imgs.load(imgs.ImageFile(str(p), None))
    assert isinstance(out, imgs.Skip) and out.reason.startswith("unreadable")
