"""Caption operator: ViT-GPT2 VisionEncoderDecoder, BLIP and a small VLM, tiny local models (no Ray)."""

from __future__ import annotations

import shutil

import pytest

from operators.models.caption import CaptionConfig, Captioner
from ground.errors import ConfigError
from tests.unit.test_models_clip import make_batch


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


@pytest.mark.parametrize("kind,expected", [("vit_gpt2", "vision_encoder_decoder"), ("blip", "blip"),
                                           ("llava", "image_text_to_text")])
def test_each_kind_captions_pending_rows_and_leaves_text_alone(tiny, kind, expected):
    batch = make_batch(4, reasons=[None, "decode:corrupt", None, None], junk=(1, 3))
    op = Captioner(CaptionConfig(model=tiny[kind], name=kind, max_new_tokens=5))
    assert op.kind == expected
    out = op(batch)
    caps = out[f"caption_{kind}"].to_pylist()
    assert isinstance(caps[0], str) and isinstance(caps[2], str) and caps[1] is None and caps[3] is None
    assert out["reject_reason"].to_pylist() == [None, "decode:corrupt", None, f"caption_{kind}:bad_image"]
    assert out["text"].to_pylist() == batch["text"].to_pylist()
    assert Captioner.outputs(op.config) == (f"caption_{kind}",)


def test_vit_gpt2_uses_the_decoders_own_tokenizer(tiny):
    out = Captioner(CaptionConfig(model=tiny["vit_gpt2"], name="v", max_new_tokens=6))(make_batch(2))
    assert all(c for c in out["caption_v"].to_pylist())  # the tiny model's zeroed end token never wins first


def test_a_bert_tokenizer_next_to_a_gpt2_decoder_is_refused(tiny, tmp_path):
    # The tutorial bug: VisionEncoderDecoder with a GPT-2 decoder but BertTokenizer for decoding.
    bad = tmp_path / "vit_gpt2_bert"
    shutil.copytree(tiny["vit_gpt2"], bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).unlink()
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny["blip"]).save_pretrained(bad)  # BLIP ships a BERT tokenizer
    with pytest.raises(ConfigError, match="does not match the gpt2 decoder"):
        Captioner(CaptionConfig(model=str(bad), name="v"))


def test_blip_prompt_conditions_the_caption(tiny):
    out = Captioner(CaptionConfig(model=tiny["blip"], name="blip", prompt="a picture of", max_new_tokens=4))(
        make_batch(2))
    assert all(c.startswith("a picture of") for c in out["caption_blip"].to_pylist())


def test_vlm_caption_holds_only_new_tokens_and_honours_a_prompt_template(tiny):
    op = Captioner(CaptionConfig(model=tiny["llava"], name="vlm", max_new_tokens=4,
                                 prompt_template="<image>\nUSER: {prompt}\nASSISTANT:", prompt="Caption it."))
    assert op.vlm_prompt == "<image>\nUSER: Caption it.\nASSISTANT:"
    caps = op(make_batch(2))["caption_vlm"].to_pylist()
    assert all("USER" not in c and "Caption it" not in c for c in caps)
    chat = Captioner(CaptionConfig(model=tiny["llava"], name="vlm"))
    assert "Describe this image" in chat.vlm_prompt and chat.vlm_prompt.endswith("ASSISTANT:")


def test_generation_options_reach_generate_and_sampling_is_seeded(tiny):
    """Each sampling option changes the captions, so each one reaches ``generate()``.

    With the same seed, two runs differ only in the option under test: had it been dropped on
    the way to ``generate()``, both would sample the very same tokens.
    """
    batch = make_batch(4)

    def captions(**options) -> list[str]:
        cfg = CaptionConfig(model=tiny["vit_gpt2"], name="s", max_new_tokens=8, **options)
        return Captioner(cfg)(batch)["caption_s"].to_pylist()

    greedy = captions()
    sampled = captions(do_sample=True, seed=3)
    assert sampled == captions(do_sample=True, seed=3)  # seeded sampling repeats itself
    assert sampled != greedy  # do_sample reached generate
    assert captions(do_sample=True, seed=3, temperature=0.05) != sampled  # temperature did
    assert captions(do_sample=True, seed=3, top_p=0.05) != sampled  # top_p did
    assert captions(do_sample=True, seed=3, top_k=1) == greedy != sampled  # top_k did (1 = greedy)
    beams = Captioner(CaptionConfig(model=tiny["vit_gpt2"], name="b", num_beams=2, max_new_tokens=3))
    assert beams(batch)["caption_b"].null_count == 0


def test_kind_must_be_known():
    with pytest.raises(Exception):
        CaptionConfig(model="m", name="x", kind="seq2seq")
