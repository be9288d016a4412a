"""CLIP / SigLIP operator on hand-built Arrow batches with tiny local models (no Ray)."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from jobs.sample_data import draw_image, encode
from operators.base import registry
from operators.models.base import read_embeddings
from operators.models.clip import ClipConfig, ClipEmbedder
from ground.schema import IMAGE_TYPE
from ground.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


# How each model family's text tower must be fed, from the model docs, not from our code:
# CLIP pools the end-of-text token, so padding to the longest caption is fine; SigLIP pools
# the last position and "was trained with padding='max_length'" (HF SigLIP model docs), so
# its captions must be padded to the full length.
PADDING = {"clip": True, "siglip": "max_length"}


def make_batch(n: int = 6, texts: list | None = None, reasons: list | None = None, junk: tuple = ()) -> pa.Table:
    rng = random.Random(7)
    images, caps = [], []
    for i in range(n):
        img, cap = draw_image(rng, (48 + 8 * i, 40))
        images.append({"bytes": b"not an image" if i in junk else encode(img), "path": f"{i}.jpg"})
        caps.append(cap)
    return pa.table({
        "key": [f"k{i}" for i in range(n)],
        "image": pa.array(images, type=IMAGE_TYPE),
        "text": texts if texts is not None else caps,
        "reject_reason": pa.array(reasons or [None] * n, type=pa.string()),
    })


def awkward_images() -> tuple[list[bytes], list[np.ndarray]]:
    """Images whose decode needs care, and what a viewer sees, worked out by hand with numpy.

    * a JPEG with EXIF orientation 6 (raw pixels 56x40): viewers rotate it 90 degrees clockwise;
    * an RGBA PNG whose left half is half-transparent: viewers show it over white;
    * a palette PNG: viewers show the palette colours.
    """
    rng = random.Random(3)
    datas, upright = [], []

    # Strongly lopsided pixels (dark top rows, bright bottom rows), so a missed rotation moves
    # the embedding far even through a tiny random model.
    raw_arr = np.asarray(draw_image(rng, (56, 40))[0]).copy()
    raw_arr[:14] = (raw_arr[:14] * 0.2).astype(np.uint8)
    raw_arr[26:] = 255 - (255 - raw_arr[26:]) // 5
    raw = Image.fromarray(raw_arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(raw, "JPEG", exif=exif.tobytes(), quality=95)
    datas.append(jpeg)
    with Image.open(io.BytesIO(jpeg)) as im:  # the stored (lossy) pixels, before any orientation
        raw_pixels = np.asarray(im.convert("RGB"))
    upright.append(np.rot90(raw_pixels, k=-1).copy())  # k=-1: clockwise

    rgba = np.dstack([np.asarray(draw_image(rng, (48, 44))[0]), np.full((44, 48), 255, np.uint8)])
    rgba[:, :24, 3] = 128
    datas.append(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    upright.append(np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8))

    pal = draw_image(rng, (40, 40))[0].convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    datas.append(encode(pal, "PNG"))
    palette = np.asarray(pal.getpalette()[:3 * 256], dtype=np.uint8).reshape(-1, 3)
    upright.append(palette[np.asarray(pal)])
    return datas, upright


def make_awkward_batch() -> tuple[pa.Table, list[np.ndarray]]:
    datas, upright = awkward_images()
    captions = ["a photo held upright", "a logo", "an icon with a few colours"]
    return pa.table({
        "key": [f"a{i}" for i in range(len(datas))],
        "image": pa.array([{"bytes": d, "path": f"a{i}"} for i, d in enumerate(datas)], type=IMAGE_TYPE),
        "text": captions,
        "reject_reason": pa.array([None] * len(datas), type=pa.string()),
    }), upright


def bare_forward(path: str, kind: str, pixels: list[np.ndarray], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The same model called directly, the way its model card shows (normalised float32).

    ``pixels`` are upright 8-bit RGB arrays decoded by the test itself, so nothing here goes
    through the operator's own decode or padding choice.
    """
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path).eval()
    proc, tok = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding=PADDING[kind], truncation=True,
              max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    with torch.inference_mode():
        im = model.get_image_features(pixel_values=proc(images=pixels, return_tensors="pt")["pixel_values"])
        tx = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    im, tx = getattr(im, "pooler_output", im), getattr(tx, "pooler_output", tx)
    return (torch.nn.functional.normalize(im, dim=-1).numpy(), torch.nn.functional.normalize(tx, dim=-1).numpy())


def hand_decoded(batch: pa.Table) -> list[np.ndarray]:
    """Plain RGB JPEGs/PNGs (no orientation, no alpha) decoded with PIL alone."""
    out = []
    for cell in batch["image"].to_pylist():
        with Image.open(io.BytesIO(cell["bytes"])) as im:
            assert im.mode == "RGB" and not im.getexif().get(0x0112)
            out.append(np.asarray(im))
    return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_embeddings_match_a_bare_forward_after_float16_storage(tiny, kind):
    # Captions of different lengths, all shorter than the text tower, so how they are padded
    # shows in the embeddings (test_long_captions_are_truncated_not_rejected covers long ones).
    batch = make_batch(texts=["a cat", "a dog running on the beach", "a bowl of fruit on a wooden table",
                              "two people", "the quick brown fox", "a red chair"])
    out = ClipEmbedder(ClipConfig(model=tiny[kind], prefix=kind))(batch)
    img, valid = read_embeddings(out[f"{kind}_image_embedding"])
    txt, _ = read_embeddings(out[f"{kind}_text_embedding"])
    assert valid.all()
    assert out.schema.field(f"{kind}_image_embedding").type.value_type == pa.float16()
    ref_img, ref_txt = bare_forward(tiny[kind], kind, hand_decoded(batch), batch["text"].to_pylist())
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    assert cos(img, ref_img).min() >= 0.999
    assert cos(txt, ref_txt).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=2e-3)
    score = np.array(out[f"{kind}_score"].to_pylist())
    np.testing.assert_allclose(score, (ref_img * ref_txt).sum(-1), atol=1e-4)
    assert out["text"].to_pylist() == batch["text"].to_pylist()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_rotated_transparent_and_palette_images_are_embedded_as_viewers_see_them(tiny, kind):
    batch, upright = make_awkward_batch()
    out = ClipEmbedder(ClipConfig(model=tiny[kind], prefix=kind))(batch)
    img, valid = read_embeddings(out[f"{kind}_image_embedding"])
    txt, _ = read_embeddings(out[f"{kind}_text_embedding"])
    assert valid.all()
    ref_img, ref_txt = bare_forward(tiny[kind], kind, upright, batch["text"].to_pylist())
    cos = (img * ref_img).sum(-1) / np.linalg.norm(img, axis=-1)
    assert cos.min() >= 0.999, cos
    assert ((txt * ref_txt).sum(-1) / np.linalg.norm(txt, axis=-1)).min() >= 0.999


def test_rejected_rows_get_no_work_and_null_outputs(tiny):
    # Row 1 is junk but already rejected: had the operator touched it, it would say clip:bad_image.
    batch = make_batch(4, reasons=[None, "decode:corrupt", None, None], junk=(1, 3))
    out = ClipEmbedder(ClipConfig(model=tiny["clip"]))(batch)
    assert out["reject_reason"].to_pylist() == [None, "decode:corrupt", None, "clip:bad_image"]
    for col in ("clip_image_embedding", "clip_text_embedding", "clip_score"):
        assert out[col].to_pylist()[1] is None and out[col].to_pylist()[3] is None
    assert out["clip_score"].to_pylist()[0] is not None


def test_rows_without_text_get_the_image_embedding_only(tiny):
    batch = make_batch(4, texts=["a red circle", None, "", "   "])
    out = ClipEmbedder(ClipConfig(model=tiny["clip"]))(batch)
    assert out["clip_image_embedding"].null_count == 0
    assert [v is None for v in out["clip_text_embedding"].to_pylist()] == [False, True, True, True]
    assert [v is None for v in out["clip_score"].to_pylist()] == [False, True, True, True]
    assert out["reject_reason"].null_count == 4


def record_input_shapes(module, seen: list) -> "torch.utils.hooks.RemovableHandle":  # noqa: F821
    """Append the ``input_ids`` shape of every forward call of ``module`` to ``seen`` (a torch hook)."""
    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(tuple(ids.shape))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_captions_are_chunked_longest_first_and_each_lands_on_its_own_row(tiny):
    """A chunk of captions is padded to its longest; rows are taken longest caption first, so a
    chunk holds captions of similar length (in input order both chunks below pad to the long one)."""
    short, long = "a cat", "a dog running on the beach by a boat"
    texts = [short, long] * 4
    op = ClipEmbedder(ClipConfig(model=tiny["clip"], forward_batch_size=4))
    seen: list = []
    handle = record_input_shapes(op.model.text_model, seen)
    out = op(make_batch(8, texts=texts))
    handle.remove()
    n_short, n_long = (len(op.tokenizer(t)["input_ids"]) for t in (short, long))
    assert n_short < n_long <= op.max_tokens
    assert seen == [(4, n_long), (4, n_short)]
    assert op.input_tokens == op.padded_tokens == 4 * (n_short + n_long)  # what stats.json reports
    txt, valid = read_embeddings(out["clip_text_embedding"])
    assert valid.all()
    alone = {t: op.embed_texts([t])[0] for t in (short, long)}  # each caption unpadded
    np.testing.assert_allclose(txt, np.stack([alone[t] for t in texts]), atol=2e-3)
    img, _ = read_embeddings(out["clip_image_embedding"])
    np.testing.assert_allclose(np.array(out["clip_score"].to_pylist()), (img * txt).sum(-1), atol=2e-3)


def test_siglip_captions_keep_their_order_since_every_chunk_pads_to_the_full_length(tiny):
    op = ClipEmbedder(ClipConfig(model=tiny["siglip"], forward_batch_size=4))
    seen: list = []
    handle = record_input_shapes(op.model.text_model, seen)
    texts = ["a cat", "a dog running on the beach next to a red boat"]
    op(make_batch(8, texts=texts * 4))
    handle.remove()
    assert seen == [(4, op.max_tokens)] * 2
    assert op.padded_tokens == 8 * op.max_tokens
    assert op.input_tokens == 4 * sum(len(op.tokenizer(t, truncation=True, max_length=op.max_tokens)["input_ids"])
                                      for t in texts)


def test_long_captions_are_truncated_not_rejected(tiny):
    out = ClipEmbedder(ClipConfig(model=tiny["clip"]))(make_batch(2, texts=["word " * 500, "short"]))
    assert out["clip_score"].null_count == 0


def test_two_prefixes_in_one_pipeline_keep_their_own_columns(tiny):
    batch = make_batch(3)
    out = ClipEmbedder(ClipConfig(model=tiny["siglip"], prefix="clip_l14"))(
        ClipEmbedder(ClipConfig(model=tiny["clip"], prefix="clip_b32"))(batch))
    assert out.schema.field("clip_b32_image_embedding").type.list_size == 16
    assert out.schema.field("clip_l14_image_embedding").type.list_size == 32
    assert set(ClipEmbedder.outputs(ClipConfig(model="x", prefix="clip_l14"))) == {
        "clip_l14_image_embedding", "clip_l14_text_embedding", "clip_l14_score"}


def test_provenance_digests_the_weight_files_and_flags_random_weights(tiny):
    prov = ClipEmbedder.provenance(ClipConfig(model=tiny["clip"], revision="v1"))
    assert set(prov) == {"clip_image_embedding", "clip_text_embedding", "clip_score"}
    rec = prov["clip_score"]
    digest = hashlib.sha256(Path(tiny["clip"], "model.safetensors").read_bytes()).hexdigest()
    assert rec["weights_sha256"] == {"model.safetensors": digest}
    assert rec["model"] == tiny["clip"] and rec["revision"] == "v1" and rec["random_weights"] is True


def test_config_is_strict_and_resources_default_to_actors_sized_at_run_time():
    cfg = ClipConfig(model="openai/clip-vit-base-patch32")
    res = ClipEmbedder.resources(cfg)
    # num_cpus and the actor count stay unset: pipelines.plan.resolve_resources sizes them from
    # the node at run time; a model always runs in actors, never in tasks
    assert res.uses_actors and res.max_actors is None and res.num_gpus == 0 and res.num_cpus is None
    with pytest.raises(ValidationError):
        ClipConfig(model="m", unknown=1)
    with pytest.raises(ValidationError, match="num_gpus"):
        ClipConfig(model="m", device="cuda")
    with pytest.raises(ValidationError):
        ClipConfig(model="m", dtype="int8")
    assert registry.get("clip") is ClipEmbedder


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, tiny):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ConfigError, match="allow_pickle"):
        ClipEmbedder(ClipConfig(model=str(tmp_path)))


def test_float16_on_cpu_falls_back_and_bfloat16_runs(tiny):
    batch = make_batch(2)
    op16 = ClipEmbedder(ClipConfig(model=tiny["clip"], dtype="float16"))
    assert op16.device == "cpu" and str(op16.dtype) == "torch.float32"
    out = ClipEmbedder(ClipConfig(model=tiny["clip"], dtype="bfloat16"))(batch)
    ref = op16(batch)
    a, _ = read_embeddings(out["clip_image_embedding"])
    b, _ = read_embeddings(ref["clip_image_embedding"])
    assert ((a * b).sum(-1)).min() > 0.95
