"""Pixel-level helpers shared by decode and model operators."""

from __future__ import annotations

import io
import math
from typing import Any

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




# Pillow's own thumbnail() keeps a reducing gap of 2: the cheap draft/reduce step stops at
# twice the target so the final (processor's) resample still starts from enough pixels.
REDUCING_GAP = 2.0


def probe(data: bytes) -> tuple[int, int, str | None]:
    """(width, height, format) from the image header alone, without decoding pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size[0], img.size[1], img.format


# EXIF orientations that turn the stored image a quarter turn (width and height swap)
QUARTER_TURNS = {5, 6, 7, 8}


def probe_upright(data: bytes) -> tuple[int, int]:
    """(width, height) as viewers show the image (EXIF orientation applied), from the header alone."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112) in QUARTER_TURNS else (w, h)


def needed_scale(size: Any, width: int, height: int) -> float | None:
    """Scale at which a ``width x height`` image still covers what an HF image processor resizes to.

    ``size`` is the processor's ``size`` (a dict or ``SizeDict``): ``shortest_edge``,
    ``longest_edge``, or ``height``/``width`` (an exact resize, so both sides must cover the
    larger of the two). Returns None for layouts it does not know (dynamic-resolution VLMs),
    meaning "decode at full size".
    """
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if not width or not height:
        return None
    if get("shortest_edge"):
        return get("shortest_edge") / min(width, height)
    if get("longest_edge") and not get("height"):
        return get("longest_edge") / max(width, height)
    if get("height") and get("width"):
        return max(get("height"), get("width")) / min(width, height)
    return None


def decode_rgb(data: bytes, size: Any = None) -> Image.Image:
    """Decode bytes to an upright 8-bit RGB image (EXIF orientation applied).

    With ``size`` (an image processor's ``size``), the image is decoded no larger than it needs
    to be for that processor, keeping ``REDUCING_GAP`` times the target: JPEGs through libjpeg's
    DCT scaling (``Image.draft``, so a 12-megapixel photo never exists at full size), other
    formats by ``Image.reduce`` right after decoding. The processor's own resize then runs on
    the smaller image; the result matches a full decode + resize within resampling noise.
    """
    img = Image.open(io.BytesIO(data))
    scale = needed_scale(size, *img.size) if size is not None else None
    if scale is not None and scale * REDUCING_GAP < 1 and img.format == "JPEG":
        w, h = img.size
        s = scale * REDUCING_GAP
        img.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
    img.load()
    # In place: without an orientation tag the default returns a full copy of the pixels
    # (~10 % of decoding a 480 px JPEG), which nothing here needs.
    ImageOps.exif_transpose(img, in_place=True)
    out = to_rgb(img)
    if scale is not None:
        # draft already shrank JPEGs (in steps of 1/2..1/8); reduce what is still too large
        remaining = needed_scale(size, *out.size)
        factor = int(1 / (remaining * REDUCING_GAP)) if remaining and remaining * REDUCING_GAP < 1 else 1
        if factor >= 2:
            out = out.reduce(factor)
    return out
