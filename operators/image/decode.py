"""Decode, validate and optionally resize / re-encode images (CPU)."""

from __future__ import annotations

import io
import logging
import warnings
from typing import Literal

import pyarrow as pa
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import Field

from operators.base import Operator, OperatorConfig, Resources, pending_mask, register, set_column, with_rejects
from operators.dedup.phash import phash_with_windows
from operators.image.pixels import to_rgb
from ground.schema import IMAGE_TYPE, PHASH_WINDOWS_TYPE

logger = logging.getLogger(__name__)

# Pillow's own default bomb threshold (MAX_IMAGE_PIXELS): ~89.5 megapixels, a 1 GB RGBA buffer.
DEFAULT_MAX_PIXELS = 89_478_485
# Modes stored as they are; anything else is re-encoded to 8-bit RGB when normalize is on.
PLAIN_MODES = ("RGB", "L")
_EXIF_ORIENTATION = 0x0112
JPEG_ALIASES = {"mpo": "jpeg"}


class DecodeConfig(OperatorConfig):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="reject images with more pixels")
    normalize: bool = Field(True, description="re-encode CMYK/palette/alpha/16-bit/rotated images as upright 8-bit RGB")
    resize_max_side: int | None = Field(None, ge=8, description="downscale so the longer side is at most this")
    reencode_format: Literal["jpeg", "png", "webp"] | None = Field(
        None, description="re-encode every stored image to this format (default: only when changed)")
    quality: int = Field(90, ge=1, le=100)
    resources: Resources = Field(default_factory=lambda: Resources(batch_size=64))


@register
class ImageDecoder(Operator):
    """Decodes every pending image once to validate it and measure it.

    Input columns: ``image`` (struct{bytes, path}), ``reject_reason``.
    Output columns: ``width``, ``height`` (int32, after EXIF transpose), ``format`` (stored
    format, lower case), ``phash`` (int64: 64-bit DCT perceptual hash of the upright pixels
    before any resize, see :mod:`operators.dedup.phash`; null on rejected rows), ``phash_windows``
    (the pHashes of 9 sub-windows, which let pHash dedup find crops); ``image`` is
    replaced only when the image is normalised, resized or re-encoded. ``sha256`` keeps the digest of the source bytes.
    Resources: a CPU task pool (``resources``).
    Failure behaviour: ``decode:empty_image`` (zero bytes), ``decode:not_an_image``,
    ``decode:truncated``, ``decode:too_many_pixels`` (checked from the header, before any
    pixel is decoded), ``decode:corrupt`` (any other decoder error). Never raises on data.
    """

    name = "decode"
    Config = DecodeConfig
    input_columns = ("image",)
    output_columns = ("width", "height", "format", "phash", "phash_windows")

    def __init__(self, config: DecodeConfig):
        super().__init__(config)
        # Our max_pixels check comes first; Pillow's process-wide guard (which other operators
        # in this worker rely on) is only raised, never switched off, so it cannot fire sooner.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < config.max_pixels:
            Image.MAX_IMAGE_PIXELS = config.max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        self._phash_warned = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        pending = pending_mask(batch)
        images = batch["image"].to_pylist()
        widths, heights, formats, phashes, windows, reasons = [], [], [], [], [], []
        changed = False
        for i, img in enumerate(images):
            w = h = fmt = phash = wins = reason = None
            if pending[i]:
                data = (img or {}).get("bytes")
                out, w, h, fmt, phash, reason = self._one(data or b"")
                if phash is not None:
                    phash, wins = phash

                if out is not None:
                    images[i] = {"bytes": out, "path": _with_extension(img.get("path"), fmt)}
                    changed = True
            widths.append(w)
            heights.append(h)
            formats.append(fmt)
            phashes.append(phash)
            windows.append(wins)
            reasons.append(reason and f"{self.name}:{reason}")
        out = batch
        if changed:
            out = set_column(out, "image", pa.array(images, type=IMAGE_TYPE))
        out = set_column(out, "width", widths, pa.int32())
        out = set_column(out, "height", heights, pa.int32())
        out = set_column(out, "format", formats, pa.string())
        out = set_column(out, "phash", phashes, pa.int64())
        out = set_column(out, "phash_windows", windows, PHASH_WINDOWS_TYPE)
        return with_rejects(out, reasons)

    def _one(self, data: bytes) -> tuple[bytes | None, int | None, int | None, str | None, int | None, str | None]:
        """(new bytes or None, width, height, format, (phash, window hashes) or None, reject reason)."""
        cfg: DecodeConfig = self.config
        if not data:
            return None, None, None, None, None, "empty_image"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(io.BytesIO(data))
                src_format = (img.format or "").lower()
                # Pillow reports JPEGs carrying an MPF segment (phone photos with gain maps or
                # depth frames) as MPO; the file is a JPEG to every reader and filter.
                src_format = JPEG_ALIASES.get(src_format, src_format)
                if img.width * img.height > cfg.max_pixels:
                    return None, None, None, None, None, "too_many_pixels"
                img.load()
        except Image.DecompressionBombError:
            return None, None, None, None, None, "too_many_pixels"
        except UnidentifiedImageError:
            return None, None, None, None, None, "not_an_image"
        except (OSError, SyntaxError, ValueError) as exc:
            msg = str(exc).lower()
            if "truncated" in msg or "premature" in msg or "end of" in msg or "broken data stream" in msg:
                return None, None, None, None, None, "truncated"
            return None, None, None, None, None, "corrupt"
        except Exception:  # noqa: BLE001 - any decoder fault on one image is that row's problem
            return None, None, None, None, None, "corrupt"
        try:
            rotated = img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
            upright = ImageOps.exif_transpose(img) if rotated else img
            needs_norm = cfg.normalize and (rotated or img.mode not in PLAIN_MODES)
            too_big = cfg.resize_max_side is not None and max(upright.size) > cfg.resize_max_side
            target = cfg.reencode_format or (src_format if needs_norm or too_big else None)
            # Hashed from the upright pixels at full size (before any resize), so the stored
            # image's hash does not depend on resize_max_side.
            phash = self._phash(upright)
            if target is None:
                return None, upright.width, upright.height, src_format, phash, None
            out_img = to_rgb(upright) if (cfg.normalize or target == "jpeg") else upright
            if too_big:
                out_img = out_img.copy()
                out_img.thumbnail((cfg.resize_max_side, cfg.resize_max_side), Image.Resampling.LANCZOS)
            fmt = target if target in ("jpeg", "png", "webp") else "jpeg"
            buf = io.BytesIO()
            save_kw = {"quality": cfg.quality} if fmt in ("jpeg", "webp") else {"optimize": False}
            if fmt == "jpeg" and out_img.mode not in ("RGB", "L"):
                out_img = to_rgb(out_img)
            out_img.save(buf, format=fmt.upper(), **save_kw)
            return buf.getvalue(), out_img.width, out_img.height, fmt, phash, None
        except Exception:  # noqa: BLE001
            return None, None, None, None, None, "corrupt"


    def _phash(self, img: Image.Image) -> tuple[int, list[int]] | None:
        """The image's pHash, or None (logged once) if its mode cannot be flattened to RGB: a
        missing hash must not reject an image that decoded fine."""
        try:
            return phash_with_windows(img)
        except Exception as exc:  # noqa: BLE001 - one odd image mode is that row's problem
            if not self._phash_warned:
                self._phash_warned = True
                logger.warning("decode: cannot hash a %s image (%r); its phash is null", img.mode, exc)
            return None


_EXTENSIONS = {"jpeg": (".jpg", ".jpeg"), "png": (".png",), "webp": (".webp",)}


def _with_extension(path: str | None, fmt: str | None) -> str | None:
    """``path`` with an extension that matches the stored format (re-encoding may change it)."""
    if not path or fmt not in _EXTENSIONS:
        return path
    stem, dot, ext = path.rpartition(".")
    if dot and "/" not in ext and f".{ext.lower()}" in _EXTENSIONS[fmt]:
        return path
    return f"{stem if dot and '/' not in ext else path}{_EXTENSIONS[fmt][0]}"
