"""Pixel-level helpers shared by decode and model operators."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# White is what viewers show behind transparent pixels; flattening onto it keeps logos
# and line art legible for captioning and CLIP.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB for any PIL mode: CMYK, palette, LA/RGBA (flattened on white), 16/32-bit, float."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode bytes to an upright 8-bit RGB image (EXIF orientation applied)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))
