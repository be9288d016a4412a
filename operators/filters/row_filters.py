"""Row filters: each adds a reason to rows that fail, never drops a row.

All of them are cheap, stateless CPU work; consecutive filters share one Ray task stage
(Ray fuses map stages with equal resources).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from operators.base import OperatorConfig, RowFilter, register


def _ints(batch: pa.Table, name: str) -> np.ndarray:
    """Column as float array with NaN for nulls (rows rejected before decode have no size)."""
    return batch[name].to_numpy(zero_copy_only=False).astype("float64")


class _RangeConfig(OperatorConfig):
    @model_validator(mode="after")
    def _ordered(self):
        lo, hi = getattr(self, "min", None), getattr(self, "max", None)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min ({lo}) is greater than max ({hi})")
        return self


class MinSideConfig(OperatorConfig):
    min: int = Field(ge=1, description="shorter side in pixels must be at least this")


@register
class MinSideFilter(RowFilter):
    """Rejects images whose shorter side is below ``min`` pixels.

    Input: ``width``, ``height`` (from ``decode``). Output: ``reject_reason`` =
    ``min_side:too_small``.
    """

    name = "min_side"
    Config = MinSideConfig
    input_columns = ("width", "height")

    def check(self, batch):
        side = np.fmin(_ints(batch, "width"), _ints(batch, "height"))
        return ["too_small" if s < self.config.min else None for s in side]


class AspectConfig(OperatorConfig):
    max: float = Field(gt=1.0, description="longer side / shorter side must be at most this")


@register
class MaxAspectRatioFilter(RowFilter):
    """Rejects images more elongated than ``max`` (long side / short side).

    Input: ``width``, ``height``. Output: ``max_aspect_ratio:too_elongated``.
    """

    name = "max_aspect_ratio"
    Config = AspectConfig
    input_columns = ("width", "height")

    def check(self, batch):
        w, h = _ints(batch, "width"), _ints(batch, "height")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.fmax(w, h) / np.fmin(w, h)
        return ["too_elongated" if r > self.config.max else None for r in ratio]


class FileBytesConfig(_RangeConfig):
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=1)


@register
class FileBytesFilter(RowFilter):
    """Rejects stored images outside ``[min, max]`` bytes.

    Input: ``image``. Output: ``file_bytes:too_small`` / ``file_bytes:too_large``.
    """

    name = "file_bytes"
    Config = FileBytesConfig
    input_columns = ("image",)

    def check(self, batch):
        sizes = pc.binary_length(pc.struct_field(batch["image"], "bytes")).to_numpy(zero_copy_only=False)
        lo, hi = self.config.min, self.config.max
        out = []
        for s in sizes.astype("float64"):
            if lo is not None and s < lo:
                out.append("too_small")
            elif hi is not None and s > hi:
                out.append("too_large")
            else:
                out.append(None)
        return out


class CaptionConfig(_RangeConfig):
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered_pairs(self):
        for lo, hi in ((self.min_words, self.max_words), (self.min_chars, self.max_chars)):
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"minimum ({lo}) is greater than maximum ({hi})")
        return self


@register
class CaptionLengthFilter(RowFilter):
    """Rejects captions outside word / character ranges.

    Input: ``text``. Output: ``caption_length:missing_text`` (null or blank caption while a
    minimum is set), ``too_few_words``, ``too_many_words``, ``too_short``, ``too_long``.
    """

    name = "caption_length"
    Config = CaptionConfig
    input_columns = ("text",)

    def check(self, batch):
        c = self.config
        needs_text = bool(c.min_words) or bool(c.min_chars)
        out = []
        for text in batch["text"].to_pylist():
            text = (text or "").strip()
            words, chars = len(text.split()), len(text)
            if not text and needs_text:
                out.append("missing_text")
            elif c.min_words is not None and words < c.min_words:
                out.append("too_few_words")
            elif c.max_words is not None and words > c.max_words:
                out.append("too_many_words")
            elif c.min_chars is not None and chars < c.min_chars:
                out.append("too_short")
            elif c.max_chars is not None and chars > c.max_chars:
                out.append("too_long")
            else:
                out.append(None)
        return out


class FormatConfig(OperatorConfig):
    allowed: list[str] = Field(min_length=1, description="e.g. [jpeg, png, webp]")


@register
class ImageFormatFilter(RowFilter):
    """Rejects images whose decoded format is not in ``allowed`` (``jpg`` means ``jpeg``).

    Input: ``format`` (from ``decode``). Output: ``image_format:not_allowed``.
    """

    name = "image_format"
    Config = FormatConfig
    input_columns = ("format",)

    def check(self, batch):
        allowed = {"jpeg" if f.lower() == "jpg" else f.lower() for f in self.config.allowed}
        return [None if (f is None or f in allowed) else "not_allowed" for f in batch["format"].to_pylist()]
