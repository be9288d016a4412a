"""Row filters on hand-built decoded tables: reasons, first failure wins, config validation."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators.base import registry
from operators.filters.row_filters import (CaptionLengthFilter, FileBytesFilter, ImageFormatFilter,
                                           MaxAspectRatioFilter, MinSideFilter)
from ground.schema import IMAGE_TYPE


def decoded(rows: list[dict]) -> pa.Table:
    """A table as it leaves ``decode``: key, image, text, width, height, format, reject_reason."""
    return pa.table({
        "key": [str(i) for i in range(len(rows))],
        "image": pa.array([None if r.get("nbytes") is None else {"bytes": b"x" * r["nbytes"], "path": None}
                           for r in rows], type=IMAGE_TYPE),
        "text": pa.array([r.get("text", "a red circle") for r in rows], type=pa.string()),
        "width": pa.array([r.get("w") for r in rows], type=pa.int32()),
        "height": pa.array([r.get("h") for r in rows], type=pa.int32()),
        "format": pa.array([r.get("format", "jpeg") for r in rows], type=pa.string()),
        "reject_reason": pa.array([r.get("reason") for r in rows], type=pa.string()),
    })


def run(name: str, config: dict, rows: list[dict]) -> list[str | None]:
    """Build the filter the way a pipeline does (by its YAML name) and return the reasons."""
    op_cls = registry.get(name)
    batch = decoded(rows)
    out = op_cls(op_cls.Config.model_validate(config))(batch)
    assert out.num_rows == batch.num_rows
    assert out.drop_columns(["reject_reason"]).equals(batch.drop_columns(["reject_reason"]))
    return out["reject_reason"].to_pylist()


def test_min_side_judges_the_shorter_side():
    rows = [{"w": 100, "h": 50}, {"w": 50, "h": 100}, {"w": 64, "h": 64}, {"w": 300, "h": 200}, {"w": 63, "h": 900}]
    assert run("min_side", {"min": 64}, rows) == [
        "min_side:too_small", "min_side:too_small", None, None, "min_side:too_small"]


def test_max_aspect_ratio_in_both_orientations():
    rows = [{"w": 400, "h": 100}, {"w": 401, "h": 100}, {"w": 100, "h": 401}, {"w": 100, "h": 100}]
    assert run("max_aspect_ratio", {"max": 4.0}, rows) == [
        None, "max_aspect_ratio:too_elongated", "max_aspect_ratio:too_elongated", None]


def test_file_bytes_bounds_are_inclusive_and_either_may_be_open():
    rows = [{"nbytes": n} for n in (9, 10, 100, 101)]
    assert run("file_bytes", {"min": 10, "max": 100}, rows) == [
        "file_bytes:too_small", None, None, "file_bytes:too_large"]
    assert run("file_bytes", {"max": 100}, rows) == [None, None, None, "file_bytes:too_large"]
    assert run("file_bytes", {"min": 10}, rows) == ["file_bytes:too_small", None, None, None]


def test_caption_length_words_and_characters():
    texts = ["cat", "a cat", "a cat on a mat today", None, "   ", "  a  cat  "]
    rows = [{"text": t} for t in texts]
    assert run("caption_length", {"min_words": 2, "max_words": 5}, rows) == [
        "caption_length:too_few_words", None, "caption_length:too_many_words",
        "caption_length:missing_text", "caption_length:missing_text", None]
    assert run("caption_length", {"min_chars": 4, "max_chars": 10}, rows) == [
        "caption_length:too_short", None, "caption_length:too_long",
        "caption_length:missing_text", "caption_length:missing_text", None]
    # Without a minimum a missing caption is fine (captioning models can fill it in later).
    assert run("caption_length", {"max_words": 5}, rows) == [
        None, None, "caption_length:too_many_words", None, None, None]


def test_image_format_accepts_jpg_as_jpeg_in_any_case():
    rows = [{"format": f} for f in ("jpeg", "png", "webp", "gif")]
    assert run("image_format", {"allowed": ["JPG", "png"]}, rows) == [
        None, None, "image_format:not_allowed", "image_format:not_allowed"]


def test_an_earlier_reason_is_never_overwritten_and_null_sizes_are_not_rejudged():
    rows = [
        {"w": 10, "h": 10, "reason": "webdataset:invalid_json"},  # would fail min_side too
        {"w": None, "h": None, "format": None, "nbytes": 0, "text": None, "reason": "decode:truncated"},
        {"w": None, "h": None, "format": None, "reason": "decode:too_many_pixels"},
        {"w": 10, "h": 10},
        {"w": 500, "h": 100, "text": "x"},
        {"w": 100, "h": 100, "nbytes": 50, "text": "a fine caption"},
    ]
    chain = [("min_side", {"min": 32}), ("max_aspect_ratio", {"max": 3.0}), ("file_bytes", {"min": 1}),
             ("caption_length", {"min_words": 2}), ("image_format", {"allowed": ["jpeg"]})]
    batch = decoded([dict(r, nbytes=r.get("nbytes", 10)) for r in rows])
    for name, cfg in chain:
        op_cls = registry.get(name)
        batch = op_cls(op_cls.Config.model_validate(cfg))(batch)
    assert batch["reject_reason"].to_pylist() == [
        "webdataset:invalid_json",
        "decode:truncated",
        "decode:too_many_pixels",
        "min_side:too_small",
        "max_aspect_ratio:too_elongated",  # its one-word caption would fail later: first failure wins
        None,
    ]


def test_filters_add_reject_reason_when_the_batch_has_none():
    batch = decoded([{"w": 10, "h": 10}, {"w": 100, "h": 100}]).drop_columns(["reject_reason"])
    out = MinSideFilter(MinSideFilter.Config(min=32))(batch)
    assert out["reject_reason"].to_pylist() == ["min_side:too_small", None]
    assert "reject_reason" not in batch.column_names


def test_chunked_columns_give_the_same_reasons():
    rows = [{"w": 10, "h": 10}, {"w": 100, "h": 100, "reason": "decode:corrupt"}, {"w": 100, "h": 90}]
    whole = decoded(rows)
    chunked = pa.concat_tables([whole.slice(0, 1), whole.slice(1)])
    op = MinSideFilter(MinSideFilter.Config(min=32))
    assert op(chunked)["reject_reason"].to_pylist() == op(whole)["reject_reason"].to_pylist() == [
        "min_side:too_small", "decode:corrupt", None]


@pytest.mark.parametrize("cls, config", [
    (FileBytesFilter, {"min": 100, "max": 10}),
    (CaptionLengthFilter, {"min_words": 5, "max_words": 2}),
    (CaptionLengthFilter, {"min_chars": 50, "max_chars": 10}),
    (MinSideFilter, {"min": 0}),
    (MinSideFilter, {}),
    (MaxAspectRatioFilter, {"max": 1.0}),
    (ImageFormatFilter, {"allowed": []}),
    (MinSideFilter, {"min": 64, "mni": 32}),
    (CaptionLengthFilter, {"min_word": 2}),
    (FileBytesFilter, {"min": 1, "maximum": 10}),
])
def test_invalid_filter_configs_are_rejected(cls, config):
    with pytest.raises(ValidationError):
        cls.Config.model_validate(config)


def test_min_greater_than_max_names_both_values():
    with pytest.raises(ValidationError, match=r"min \(100\) is greater than max \(10\)"):
        FileBytesFilter.Config(min=100, max=10)
    with pytest.raises(ValidationError, match=r"minimum \(5\) is greater than maximum \(2\)"):
        CaptionLengthFilter.Config(min_words=5, max_words=2)
    # equal bounds are a valid (if narrow) range
    assert FileBytesFilter.Config(min=10, max=10).max == 10
