"""CUDA paths of the model operators: bf16/fp16, device auto, and a real out-of-memory split.

Skipped without a GPU (tests/conftest.py skips ``gpu``-marked tests when CUDA is absent).
"""

from __future__ import annotations

import numpy as np
import pytest

from operators.models.base import read_embeddings
from operators.models.caption import CaptionConfig, Captioner
from operators.models.clip import ClipConfig, ClipEmbedder, ClipPrepare
from tests.unit.test_models_clip import make_batch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cuda_matches_float32_on_cpu(tiny, dtype):
    batch = make_batch(6)
    gpu = ClipEmbedder(ClipConfig(model=tiny["clip"], dtype=dtype, resources={"num_gpus": 1}))
    assert gpu.device == "cuda" and str(gpu.dtype) == f"torch.{dtype}"
    cpu = ClipEmbedder(ClipConfig(model=tiny["clip"], device="cpu"))
    a, _ = read_embeddings(gpu(batch)["clip_image_embedding"])
    b, _ = read_embeddings(cpu(batch)["clip_image_embedding"])
    assert (a * b).sum(-1).min() > 0.99


def test_the_prepare_stage_feeds_a_cuda_actor_what_it_would_decode_itself(tiny):
    cfg = ClipConfig(model=tiny["clip"], dtype="float16", resources={"num_gpus": 1})
    assert cfg.prepares_in_tasks  # the default for a GPU actor
    batch = make_batch(6)
    staged = ClipEmbedder(cfg)(ClipPrepare(cfg)(batch))
    alone = ClipEmbedder(cfg.model_copy(update={"prepare_in": "actor"}))(batch)
    assert "_clip_prepared" not in staged.column_names
    a, a_valid = read_embeddings(staged["clip_image_embedding"])
    b, b_valid = read_embeddings(alone["clip_image_embedding"])
    assert a_valid.all() and b_valid.all()
    np.testing.assert_allclose(a, b, atol=2e-3)  # same uint8 inputs, same device normalisation


@pytest.mark.parametrize("kind", ["vit_gpt2", "blip"])
def test_captioning_in_half_precision_on_cuda(tiny, kind):
    op = Captioner(CaptionConfig(model=tiny[kind], name=kind, dtype="float16", max_new_tokens=4, device="cuda",
                                 resources={"num_gpus": 1}))
    assert op(make_batch(3))[f"caption_{kind}"].null_count == 0


def test_a_real_cuda_out_of_memory_splits_the_batch(tiny):
    """Fill the GPU so a large batch cannot allocate, then check rows still get embeddings."""
    import torch

    op = ClipEmbedder(ClipConfig(model=tiny["clip"], device="cuda", resources={"num_gpus": 1}))
    calls: list[int] = []
    real = op.embed_pixels
    free, _ = torch.cuda.mem_get_info()
    # One block that leaves ~64 MiB: a forward on many rows asks for more than that.
    hog = torch.empty(int(free - 64 * 2**20), dtype=torch.uint8, device="cuda")

    def sized(pixels):
        calls.append(len(pixels))
        if len(pixels) > 2:  # a real allocation larger than what is left
            torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        return real(pixels)

    op.embed_pixels = sized
    try:
        out = op(make_batch(8))
    finally:
        del hog
        torch.cuda.empty_cache()
    assert out["clip_image_embedding"].null_count == 0
    assert calls[0] == 8 and max(calls[1:]) <= 4 and np.isfinite(read_embeddings(out["clip_image_embedding"])[0]).all()
