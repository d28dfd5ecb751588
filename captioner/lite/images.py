"""Any PIL image -> RGB (modes, 16-bit, transparency, EXIF orientation): the one conversion that the CLI, the app,
the torch captioner and the light one share (media/images.py re-exports it with the file loading)."""

from __future__ import annotations

import os

from PIL import Image, ImageOps

from ..errors import CaptionerError


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit int or float grey -> 8-bit L by scaling (clipping would turn most images white)."""
    import numpy as np  # here, not at import: the CLI parses its arguments without numpy

    a = np.nan_to_num(np.asarray(img, dtype=np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a = a / 257
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, any mode -> RGB (transparency composited onto white)."""
    if getattr(img, "n_frames", 1) > 1 and img.tell() != 0:
        img.seek(0)
    img.load()
    try:  # in place: no copy of the pixels when there is nothing to rotate (most photos)
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a broken EXIF block must not make a fine picture unreadable
        pass
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """A file as an RGB image, within Pillow's own size limit; any failure is one CaptionerError naming the file.
    (The CLI and the app read files with media/images.py's load_image: format checks, --max-pixels, reduced-scale
    JPEG decoding; a LiteCaptioner takes that as its `loader`.)"""
    name = os.fsdecode(path)
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except FileNotFoundError:
        raise CaptionerError(f"{name}: file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CaptionerError(f"{name}: cannot read the image ({' '.join(str(exc).split()) or type(exc).__name__})") from None
