"""Caption operator: ViT-GPT2 VisionEncoderDecoder, BLIP and a small VLM, tiny local models (no Ray)."""

from __future__ import annotations

import random
import shutil

import pyarrow as pa
import pytest

from jobs.sample_data import draw_image, encode
from ground.schema import IMAGE_TYPE
from operators.models.caption import CaptionConfig, Captioner
from ground.errors import ConfigError
from tests.unit.test_models_clip import make_batch


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


@pytest.mark.parametrize("kind,expected", [("vit_gpt2", "vision_encoder_decoder"), ("blip", "blip"),
                                           ("llava", "image_text_to_text"), ("idefics3", "image_text_to_text")])
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


def test_blip_prompt_conditions_the_caption_and_is_stripped_from_it(tiny):
    """The prompt steers generation, and the stored caption holds only the new words (as for VLMs)."""
    batch = make_batch(2)
    prompted = Captioner(CaptionConfig(model=tiny["blip"], name="blip", prompt="a picture of", max_new_tokens=4))(
        batch)["caption_blip"].to_pylist()
    plain = Captioner(CaptionConfig(model=tiny["blip"], name="blip", max_new_tokens=4))(batch)["caption_blip"].to_pylist()
    assert all(c and not c.startswith("a picture of") for c in prompted)
    assert prompted != plain


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


def shaped_batch(sizes: list[tuple[int, int]]) -> tuple[pa.Table, list[bytes]]:
    rng = random.Random(5)
    datas = [encode(draw_image(rng, wh)[0]) for wh in sizes]
    return pa.table({
        "key": [f"k{i}" for i in range(len(sizes))],
        "image": pa.array([{"bytes": d, "path": f"{i}.jpg"} for i, d in enumerate(datas)], type=IMAGE_TYPE),
        "text": ["x"] * len(sizes),
        "reject_reason": pa.array([None] * len(sizes), type=pa.string()),
    }), datas


def test_vlm_rows_of_alike_image_shape_share_a_chunk_when_the_processor_tiles_by_shape(tiny):
    """Idefics3 splits an image into tiles by its aspect ratio (a 4:1 image 1 x 4 tiles, a square
    one 4 x 4), so a chunk's prompts are padded to its most tiled image; rows are taken alike
    shapes together (in input order both chunks below pad to the square images' length)."""
    sizes = [(120, 30), (60, 60)] * 4
    batch, datas = shaped_batch(sizes)
    op = Captioner(CaptionConfig(model=tiny["idefics3"], name="vlm", max_new_tokens=3, forward_batch_size=4))
    assert op.shape_buckets
    seen: list = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # the prompt's forward; each new token's has length 1
            seen.append(tuple(ids.shape))

    handle = op.model.register_forward_pre_hook(hook, with_kwargs=True)
    out = op(batch)
    handle.remove()
    length = {wh: op.processor(images=[op.prepare(d)], text=[op.vlm_prompt], return_tensors="np")["input_ids"].shape[1]
              for wh, d in zip(sizes[:2], datas[:2])}
    assert length[(60, 60)] > length[(120, 30)]
    assert seen == [(4, length[(60, 60)]), (4, length[(120, 30)])]
    assert op.input_tokens == op.padded_tokens == 4 * (length[(60, 60)] + length[(120, 30)])  # stats.json's counters
    # each row's caption is the one its image gets alone (greedy decoding)
    assert out["caption_vlm"].to_pylist() == [op.generate([op.prepare(d)])[0] for d in datas]


def test_vlms_with_one_input_size_keep_the_row_order(tiny):
    assert not Captioner(CaptionConfig(model=tiny["llava"], name="l")).shape_buckets


def test_kind_must_be_known():
    with pytest.raises(Exception):
        CaptionConfig(model="m", name="x", kind="seq2seq")
