"""Scanning and reading the user's files: bad files are counted skips, never crashes."""

import io

from PIL import Image

from distill_app.data import images as imgs
from distill_app.harvest.upload import prepare_upload


def test_scan_labels_and_skips(photos):
    (photos / "notes.txt").write_text("hello")
    files, skips = imgs.scan(photos)
    assert len(files) == 8
    assert {f.label for f in files} == {"cat", "coffee"}
    assert [s.reason for s in skips] == ["not an image file type"]


def test_flat_folder_has_no_labels(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    files, _ = imgs.scan(tmp_path)
    assert files[0].label is None


def test_bad_files_become_skips(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    reasons = {}
    for f in imgs.scan(tmp_path)[0]:
        out = imgs.load(f)
        assert isinstance(out, imgs.Skip)
        reasons[f.path.rsplit("/", 1)[1]] = out.reason
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"].startswith("not a readable image")
    assert reasons["truncated.jpg"].startswith("not a readable image")


def test_symlink_loop_is_visited_once(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    files, _ = imgs.scan(tmp_path)
    assert len(files) == 1


def test_upload_strips_metadata_applies_orientation_and_downscales():
    im = Image.new("RGB", (800, 400), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    exif[0x8825] = {2: (1.0, 2.0, 3.0)}  # a GPS block
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    data, mime = prepare_upload(buf.getvalue(), max_side=200)
    out = Image.open(io.BytesIO(data))
    assert mime == "image/jpeg"
    assert out.size == (100, 200)  # rotated to portrait, longest side 200
    assert not out.getexif() and "exif" not in out.info


def test_upload_keeps_alpha_as_png():
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (255, 0, 0, 128)).save(buf, "PNG")
    data, mime = prepare_upload(buf.getvalue())
    assert mime == "image/png" and Image.open(io.BytesIO(data)).mode == "RGBA"
