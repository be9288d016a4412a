"""CUDA out-of-memory handling: halve the batch and retry, reject single rows that still fail.

The OOM is injected through the operator's own config hook (``inject_oom_above_rows``), so
the real splitting code runs on CPU; tests/gpu covers a real CUDA allocation failure.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from operators.models.base import read_embeddings
from operators.models.caption import CaptionConfig, Captioner
from operators.models.clip import ClipConfig, ClipEmbedder
from tests.unit.test_models_clip import make_batch


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


def test_oom_splits_the_batch_and_keeps_every_result(tiny, caplog):
    batch = make_batch(7, reasons=[None, None, "decode:corrupt", None, None, None, None])
    whole = ClipEmbedder(ClipConfig(model=tiny["clip"]))(batch)
    with caplog.at_level(logging.INFO, logger="operators.models.base"):
        split = ClipEmbedder(ClipConfig(model=tiny["clip"], inject_oom_above_rows=2))(batch)
    assert split["reject_reason"].to_pylist() == whole["reject_reason"].to_pylist()
    a, va = read_embeddings(whole["clip_image_embedding"])
    b, vb = read_embeddings(split["clip_image_embedding"])
    assert (va == vb).all() and va.sum() == 6
    np.testing.assert_allclose(a, b, atol=2e-3)
    # 6 pending rows: 6 -> 3+3 -> (1+2)+(1+2): three splits logged, each on more than 2 rows
    assert [r.getMessage() for r in caplog.records if "splitting" in r.getMessage()] == [
        "clip: out of memory on 6 rows; splitting", "clip: out of memory on 3 rows; splitting",
        "clip: out of memory on 3 rows; splitting"]


def test_a_single_row_that_still_runs_out_of_memory_is_rejected_and_the_batch_goes_on(tiny):
    batch = make_batch(3, reasons=[None, "min_side:too_small", None])
    out = Captioner(CaptionConfig(model=tiny["vit_gpt2"], name="vitgpt2", max_new_tokens=3,
                                  inject_oom_above_rows=0))(batch)
    assert out["reject_reason"].to_pylist() == ["caption_vitgpt2:oom", "min_side:too_small", "caption_vitgpt2:oom"]
    assert out["caption_vitgpt2"].to_pylist() == [None, None, None]


def test_a_row_whose_model_call_raises_is_rejected_alone(tiny):
    op = ClipEmbedder(ClipConfig(model=tiny["clip"]))

    def flaky(chunk):
        if 4 in chunk:
            raise ValueError("bad row")
        return [i * 10 for i in chunk]

    results, reasons = op.run_split(flaky, [0, 1, 4, 5])
    assert results == {0: 0, 1: 10, 5: 50} and reasons == {4: "model_error"}


def test_a_batch_where_every_row_fails_is_a_systemic_error(tiny):
    op = ClipEmbedder(ClipConfig(model=tiny["clip"]))

    def broken(chunk):
        raise RuntimeError("weights and code disagree")

    with pytest.raises(RuntimeError, match="every row of a 3-row batch failed"):
        op.run_split(broken, [0, 1, 2])
