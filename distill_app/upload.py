"""What leaves the machine: the image re-encoded, oriented, downscaled, and with no metadata."""

from __future__ import annotations

import io

from PIL import Image, ImageOps


def prepare_upload(data: bytes, max_side: int = 512) -> tuple[bytes, str]:
    """(upload_bytes, mime type) for an image file's bytes.

    EXIF orientation is applied to the pixels, then every piece of metadata (EXIF with GPS,
    ICC, XMP, comments) is left behind because only the pixels are re-encoded: JPEG q=90, or
    PNG when the image has transparency. The longest side is at most ``max_side`` pixels.
    """
    with Image.open(io.BytesIO(data)) as src:
        src.seek(0)  # animated GIF/WebP: the first frame
        im = ImageOps.exif_transpose(src)
        has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        im = im.convert("RGBA" if has_alpha else "RGB")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    out = io.BytesIO()
    if has_alpha:
        im.save(out, format="PNG", optimize=False)
        return out.getvalue(), "image/png"
    im.save(out, format="JPEG", quality=90)
    return out.getvalue(), "image/jpeg"
