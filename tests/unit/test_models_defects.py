"""Model-operator defects found on review (issue 8 item 6): each test failed before its fix.

Tiny random models built with the real transformers classes, hand-built Arrow batches, no Ray.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from ground.errors import ConfigError
from ground.schema import IMAGE_TYPE
from jobs.sample_data import draw_image, encode
from jobs.tiny_models import build_head
from operators.models.caption import CaptionConfig, Captioner
from operators.models.clip import ClipConfig, ClipEmbedder
from operators.models.heads import EmbeddingHead, HeadConfig
from pipelines.plan import operator_steps
from tests.helpers import make_config


@pytest.fixture
def tiny(tiny_models):
    """The session's tiny models (read only here; a test that edits one copies it first)."""
    return tiny_models


def batch_of(n: int, same_image: bool = False) -> pa.Table:
    rng = random.Random(11)
    first = encode(draw_image(rng, (48, 40))[0])
    images = [{"bytes": first if same_image else encode(draw_image(rng, (48 + 8 * i, 40))[0]), "path": f"{i}.jpg"}
              for i in range(n)]
    return pa.table({"key": [f"row{i}" for i in range(n)], "image": pa.array(images, type=IMAGE_TYPE),
                     "text": [f"caption {i}" for i in range(n)],
                     "reject_reason": pa.array([None] * n, type=pa.string())})


def test_blip_caption_is_the_generated_text_without_the_prompt(tiny):
    prompt = "a picture of"
    op = Captioner(CaptionConfig(model=tiny["blip"], name="blip", prompt=prompt, max_new_tokens=4))
    captions = op(batch_of(3))["caption_blip"].to_pylist()
    # like VLM captions, a BLIP caption no longer repeats the prompt it continued
    assert all(c is not None and not c.lower().startswith(prompt) for c in captions), captions


def test_encoder_decoder_output_is_not_cut_by_the_prompt_length(tiny):
    # A real encoder-decoder generate: its output holds only decoder tokens, so the prompt length
    # of the encoder input must not be sliced off it (that dropped the first words of the caption).
    import torch
    from transformers import VisionEncoderDecoderModel

    from operators.models.caption import generated_part

    model = VisionEncoderDecoderModel.from_pretrained(tiny["vit_gpt2"]).eval()
    with torch.inference_mode():
        ids = model.generate(pixel_values=torch.rand(2, 3, 32, 32), max_new_tokens=6, do_sample=False)
    assert model.config.is_encoder_decoder
    prompt_len = 5  # a VLM prompt of 5 tokens went to the encoder, not into these ids
    assert torch.equal(generated_part(ids, prompt_len, is_encoder_decoder=True), ids)
    assert generated_part(ids, prompt_len, is_encoder_decoder=False).shape[1] == ids.shape[1] - prompt_len


def test_end_of_sequence_ids_given_as_a_list_load(tiny, tmp_path):
    from transformers import GenerationConfig

    path = tmp_path / "vit_gpt2_eos_list"
    import shutil

    shutil.copytree(tiny["vit_gpt2"], path)
    gen = GenerationConfig.from_pretrained(path)
    gen.eos_token_id = [gen.eos_token_id, 3]  # several end ids, as many hub models list them
    gen.save_pretrained(path)
    op = Captioner(CaptionConfig(model=str(path), name="vitgpt2", max_new_tokens=4))
    assert op(batch_of(2))["caption_vitgpt2"].null_count == 0


def test_seeded_sampling_is_per_row_and_independent_of_batching(tiny):
    cfg = CaptionConfig(model=tiny["vit_gpt2"], name="s", do_sample=True, seed=5, max_new_tokens=8, top_k=0)
    op = Captioner(cfg)
    batch = batch_of(4, same_image=True)
    together = op(batch)["caption_s"].to_pylist()
    one_by_one = [op(batch.slice(i, 1))["caption_s"].to_pylist()[0] for i in range(4)]
    # the same image under four keys gets four draws, not the same noise replayed per batch
    assert len(set(one_by_one)) > 1, one_by_one
    # and a row's caption does not depend on which rows shared its batch
    assert together == one_by_one
    assert Captioner(cfg)(batch.slice(2, 2))["caption_s"].to_pylist() == together[2:]


def test_head_with_a_norm_layer_is_refused_not_silently_skipped(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "head_ln.safetensors"
    save_file({"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.zeros(8),
               "layers.1.weight": torch.ones(8), "layers.1.bias": torch.zeros(8),  # LayerNorm(8)
               "layers.2.weight": torch.randn(1, 8), "layers.2.bias": torch.zeros(1)}, str(path))
    with pytest.raises(ConfigError, match="layers.1.weight"):
        EmbeddingHead(HeadConfig(weights=str(path), output="ln_score"))


@pytest.mark.parametrize("column", ["reject_reason", "text", "key"])
def test_head_output_cannot_overwrite_a_core_column(tmp_path, column):
    head = build_head(tmp_path / "h.safetensors", [16, 4, 1])
    with pytest.raises(ValidationError, match="core column"):
        HeadConfig(weights=str(head), output=column)


def test_clip_text_column_typo_fails_at_plan_time(tmp_path):
    cfg = make_config([str(tmp_path / "*.tar")], str(tmp_path / "out"),
                      operators=[{"clip": {"model": str(tmp_path / "clip"), "text_column": "txet"}}])
    with pytest.raises(ConfigError, match="txet"):
        operator_steps(cfg)


def test_a_single_row_out_of_memory_is_retried_before_it_is_rejected(tiny):
    import torch

    op = ClipEmbedder(ClipConfig(model=tiny["clip"]))
    calls = []

    def neighbour_holds_memory_twice(rows):
        # the boundary faked here is the GPU: a neighbour's allocation makes the first two calls fail
        calls.append(list(rows))
        if len(calls) <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a neighbour holds it)")
        return [np.ones(4) for _ in rows]

    results, reasons = op.run_split(neighbour_holds_memory_twice, [7])
    assert reasons == {} and list(results) == [7]
    assert calls == [[7], [7], [7]]
