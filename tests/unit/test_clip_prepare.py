"""clip's CPU prepare stage (``prepare_in: tasks``, the default with a GPU), without Ray.

The stage decodes and resizes in Ray tasks and hands the model actor packed pixels; the actor
must then embed exactly what it would have embedded decoding the images itself, reject the same
rows for the same reasons, and leave no trace of the hand-over column in its output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ground.schema import IMAGE_TYPE
from operators.models import loading
from operators.models.base import read_embeddings
from operators.models.clip import ClipConfig, ClipEmbedder, ClipPrepare, pack_array, prepared_column, unpack_array
from tests.unit.test_models_clip import make_batch


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


def garbled(batch: pa.Table) -> pa.Table:
    """``batch`` with every image's bytes replaced by junk (the prepared column is kept)."""
    junk = [{"bytes": b"junk", "path": p["path"]} for p in batch["image"].to_pylist()]
    return batch.set_column(batch.column_names.index("image"), "image", pa.array(junk, type=IMAGE_TYPE))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_actor_embeds_what_the_stage_prepared_exactly_as_if_it_had_decoded_itself(tiny, kind):
    cfg = ClipConfig(model=tiny[kind], prefix=kind, prepare_in="tasks")
    batch = make_batch(6, junk=(2,), reasons=[None, None, None, "decode:truncated", None, None])
    staged = ClipPrepare(cfg)(batch)
    col = prepared_column(cfg)
    assert col == f"_{kind}_prepared"
    # bad bytes are rejected by the stage with the reason the actor gives; rejected rows get no work
    assert staged["reject_reason"].to_pylist() == [None, None, f"{kind}:bad_image", "decode:truncated", None, None]
    assert [v is not None for v in staged[col].to_pylist()] == [True, True, False, False, True, True]

    embedder = ClipEmbedder(cfg)
    # the actor must use the prepared pixels: with the image bytes garbled it still embeds every row
    out = embedder(garbled(staged))
    ref = ClipEmbedder(ClipConfig(model=tiny[kind], prefix=kind, prepare_in="actor"))(batch)
    assert col not in out.column_names
    assert out.column_names == ref.column_names
    assert out["reject_reason"].to_pylist() == ref["reject_reason"].to_pylist()
    for name in (f"{kind}_image_embedding", f"{kind}_text_embedding"):
        got, got_valid = read_embeddings(out[name])
        want, want_valid = read_embeddings(ref[name])
        assert (got_valid == want_valid).all() and got_valid.sum() == 4
        np.testing.assert_array_equal(got, want)
    assert out[f"{kind}_score"].to_pylist() == ref[f"{kind}_score"].to_pylist()


def test_packed_inputs_round_trip_for_both_kinds_of_processor_output():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)  # the plain recipe's uint8 pixels
    values = rng.standard_normal((3, 32, 48)).astype(np.float32)  # another processor's pixel_values
    for a in (pixels, values):
        packed = pack_array(a)
        for held in (packed, pa.py_buffer(packed)):  # bytes, or a view of an Arrow column's buffer
            back = unpack_array(held)
            assert back.dtype == a.dtype and back.shape == a.shape
            np.testing.assert_array_equal(back, a)
    # a uint8 row ships a quarter of float32's bytes (plus a 16-byte header)
    assert len(pack_array(pixels)) == 224 * 224 * 3 + 16
    with pytest.raises(ValueError, match="3-D uint8 or float32"):
        pack_array(values.astype(np.float64))


def test_the_stage_stages_only_the_processor_files_of_an_object_storage_model(tiny, s3):
    fs, opts, bucket = s3
    fs.put(str(tiny["clip"]), f"{bucket}/models/clip", recursive=True)
    url = f"s3://{bucket}/models/clip"
    local = Path(loading.resolve_local(url, opts, files=loading.PROCESSOR_FILES))
    staged = sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    # the processor's settings (transformers 5 saves them in processor_config.json) and the
    # model config, never the weights or the tokenizer
    assert staged and set(staged) <= set(loading.PROCESSOR_FILES)
    # a whole-model staging of the same URL is an entry of its own, with the weights
    whole = Path(loading.resolve_local(url, opts))
    assert whole != local and any(p.name.endswith(".safetensors") for p in whole.iterdir())
    cfg = ClipConfig(model=url, storage_options=opts, prepare_in="tasks")
    staged_batch = ClipPrepare(cfg)(make_batch(2))
    assert all(v is not None for v in staged_batch[prepared_column(cfg)].to_pylist())
