"""What leaves the machine: the image re-encoded, oriented, downscaled, and with no metadata."""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from ..data.images import has_alpha, open_image, to_rgb8


def prepare_upload(data: bytes, max_side: int = 512) -> tuple[bytes, str]:
    """(upload_bytes, mime type) for an image file's bytes.

    EXIF orientation is applied to the pixels, then every piece of metadata (EXIF with GPS,
    ICC, XMP, comments) is left behind because only the pixels are re-encoded: JPEG q=90, or
    PNG when the image has transparency. The longest side is at most ``max_side`` pixels.
    Raises ValueError (short reason) for data that cannot be decoded.
    """
    with open_image(data) as src:
        try:
            upright = ImageOps.exif_transpose(src)  # animations: the first frame
            alpha = has_alpha(upright)
            im = upright.convert("RGBA") if alpha else to_rgb8(upright)
        except Exception as e:
            raise ValueError(f"not a readable image: {type(e).__name__}") from None
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    out = io.BytesIO()
    if alpha:
        im.save(out, format="PNG")
        return out.getvalue(), "image/png"
    im.save(out, format="JPEG", quality=90)
    return out.getvalue(), "image/jpeg"
