"""Tiny, randomly initialised models saved to local disk, for tests and ``mmcurate demo``.

Every builder uses the real transformers classes (configs, models, image processors and
tokenizers) with tiny sizes, and saves with ``save_pretrained`` so the operators load them
through exactly the code that loads ``openai/clip-vit-base-patch32`` on a cluster. Nothing
is downloaded: tokenizers are trained here on a few sentences with the ``tokenizers``
package. Each saved folder holds ``mmcurate_random_weights.json`` so provenance marks every
output column made from it as random weights.

Their outputs are noise: they exist to exercise loading, batching, column contracts and
metadata, not to curate anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from operators.models.loading import RANDOM_WEIGHTS_MARKER

logger = logging.getLogger(__name__)

# Square input side of every tiny vision tower; 32 px at patch 8 is 16 patches.
IMAGE_SIZE = 32
PATCH_SIZE = 8
HIDDEN = 32
# Embedding width of the tiny CLIP/SigLIP (the real B/32 is 512, L/14 is 768).
PROJECTION_DIM = 16
TEXT_POSITIONS = 32

_CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a dog running on the beach at sunset",
    "two people riding bicycles in the city street",
    "a bowl of fruit on a wooden table",
    "an aerial view of a green forest and a river",
    "a plate of food with rice and vegetables",
    "a black and white picture of a tall building",
    "the quick brown fox jumps over the lazy dog",
    "sample image number one two three four five six seven eight nine ten",
] * 4


def _train_bpe(vocab_size: int, end_of_word_suffix: str | None = None, specials: list[str] | None = None):
    """(vocab, merges) of a byte-level BPE trained on the tiny corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    kw = {"end_of_word_suffix": end_of_word_suffix} if end_of_word_suffix else {}
    tok = Tokenizer(models.BPE(**kw))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if end_of_word_suffix:  # CLIP's vocab holds every byte both inside and at the end of a word
        alphabet = alphabet + [a + end_of_word_suffix for a in alphabet]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials or [], initial_alphabet=alphabet,
                                  show_progress=False, **kw)
    tok.train_from_iterator(_CORPUS, trainer)
    data = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    vocab = dict(data["vocab"])
    for a in alphabet:  # the trainer may drop alphabet symbols it never saw; keep all bytes encodable
        vocab.setdefault(a, len(vocab))
    return vocab, merges


def _wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    words = sorted({w for line in _CORPUS for w in line.split()})
    chars = sorted({c for line in _CORPUS for c in line if c != " "})
    toks = specials + words + chars + [f"##{c}" for c in chars]
    return {t: i for i, t in enumerate(dict.fromkeys(toks))}


def image_processor_class(name: str):
    """transformers' image processor ``name``, or its Pillow twin (``<name>Pil``) without torchvision.

    Constructing the torchvision-backed class without torchvision logs a fallback warning on
    every build; the Pillow class is what would run anyway.
    """
    import importlib.util

    import transformers

    suffix = "" if importlib.util.find_spec("torchvision") else "Pil"
    return getattr(transformers, name + suffix)


def _mark_random(path: Path, kind: str) -> None:
    (path / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(
        {"random_weights": True, "kind": kind, "note": "tiny randomly initialised model built by mmcurate"}))


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _vision_kw() -> dict[str, Any]:
    return dict(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


def build_clip(path: str | Path, seed: int = 0, projection_dim: int = PROJECTION_DIM) -> Path:
    """A tiny ``CLIPModel`` with ``CLIPImageProcessor`` and a BPE ``CLIPTokenizer``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    _seed(seed)
    vocab, merges = _train_bpe(600, end_of_word_suffix="</w>", specials=["<|startoftext|>", "<|endoftext|>"])
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_POSITIONS)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_POSITIONS,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=_vision_kw(), projection_dim=projection_dim)
    model = CLIPModel(cfg).eval()
    image_processor = image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    _mark_random(path, "clip")
    return path


# Real CLIP geometries, random weights: transformers' CLIPConfig defaults are ViT-B/32 (224 px,
# patch 32, 12+12 layers, 512-d); L/14 follows openai/clip-vit-large-patch14's config.json.
CLIP_GEOMETRIES: dict[str, dict[str, Any]] = {
    "b32": dict(text_config={}, vision_config={}, projection_dim=512),
    "l14": dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                   num_hidden_layers=24, patch_size=14), projection_dim=768),
}


def build_clip_geometry(path: str | Path, geometry: str = "b32", layers: int | None = None, seed: int = 0,
                        width: int | None = None) -> Path:
    """A ``CLIPModel`` with a real geometry (``b32`` or ``l14``), random weights, the real
    224-px ``CLIPImageProcessor`` and a BPE tokenizer trained here (77 positions).

    ``layers`` cuts both towers to that many transformer layers; ``width`` narrows both towers
    (hidden size, MLP 2x, 2 heads) and the projection while keeping the 224-px input and the
    patch size. ``layers=1, width=32`` is a model whose forward costs almost nothing next to
    decoding and preprocessing, for measuring everything around it (one layer at full B/32 width
    still costs ~25 ms per image on one CPU thread, about 3x the preprocessing).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = Path(path)
    _seed(seed)
    geo = CLIP_GEOMETRIES[geometry]
    vocab, merges = _train_bpe(600, end_of_word_suffix="</w>", specials=["<|startoftext|>", "<|endoftext|>"])
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text = dict(geo["text_config"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(geo["vision_config"])
    if layers is not None:
        text["num_hidden_layers"] = vision["num_hidden_layers"] = layers
    projection = geo["projection_dim"]
    if width is not None:
        for tower in (text, vision):
            tower.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2)
        projection = width
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    CLIPModel(cfg).eval().save_pretrained(path)
    image_processor_class("CLIPImageProcessor")().save_pretrained(path)  # 224 edge + crop, CLIP mean/std
    tok.save_pretrained(path)
    _mark_random(path, f"clip_{geometry}")
    return path


def build_siglip(path: str | Path, seed: int = 0) -> Path:
    """A tiny ``SiglipModel``; its text tower pools the last position, so text pads to max_length."""
    from transformers import BertTokenizer, SiglipConfig, SiglipModel

    path = Path(path)
    _seed(seed)
    tok = BertTokenizer(vocab=_wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
                        model_max_length=16)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=tok.pad_token_id),
        vision_config=_vision_kw())
    cfg.text_config.bos_token_id = tok.cls_token_id
    cfg.text_config.eos_token_id = tok.sep_token_id
    model = SiglipModel(cfg).eval()
    model.save_pretrained(path)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor_class("SiglipImageProcessor")(size=square).save_pretrained(path)
    tok.save_pretrained(path)
    _mark_random(path, "siglip")
    return path


def build_vit_gpt2(path: str | Path, seed: int = 0) -> Path:
    """A tiny ``VisionEncoderDecoderModel`` (ViT encoder, GPT-2 decoder) with the decoder's own tokenizer.

    The layout of ``nlpconnect/vit-gpt2-image-captioning``: a ``ViTImageProcessor`` and the
    GPT-2 byte-level BPE tokenizer saved next to the model; GPT-2 has no pad token, so pad is
    its end-of-text token, which also starts decoding.
    """
    import torch
    from transformers import (GPT2Config, GPT2Tokenizer, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    path = Path(path)
    _seed(seed)
    vocab, merges = _train_bpe(400, specials=["<|endoftext|>"])
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    enc = ViTConfig(**_vision_kw())
    dec = GPT2Config(vocab_size=len(tok), n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=eot, eos_token_id=eot, add_cross_attention=True, is_decoder=True)
    cfg = VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict())
    cfg.decoder_start_token_id = eot
    cfg.pad_token_id = eot
    cfg.eos_token_id = eot
    model = VisionEncoderDecoderModel(config=cfg).eval()
    with torch.no_grad():  # a zero end-of-text embedding keeps random greedy decoding from stopping at once
        model.decoder.get_output_embeddings().weight[eot].zero_()
    model.generation_config.decoder_start_token_id = eot
    model.generation_config.pad_token_id = eot
    model.generation_config.eos_token_id = eot
    model.save_pretrained(path)
    image_processor_class("ViTImageProcessor")(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    tok.save_pretrained(path)
    _mark_random(path, "vit_gpt2")
    return path


def build_blip(path: str | Path, seed: int = 0) -> Path:
    """A tiny ``BlipForConditionalGeneration`` with ``BlipProcessor`` (BLIP image processor + BERT tokenizer)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    path = Path(path)
    _seed(seed)
    vocab = _wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"])
    tok = BertTokenizer(vocab=vocab, model_max_length=TEXT_POSITIONS, bos_token="[DEC]")
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_POSITIONS, encoder_hidden_size=HIDDEN,
                         bos_token_id=vocab["[DEC]"], eos_token_id=vocab["[SEP]"], sep_token_id=vocab["[SEP]"],
                         pad_token_id=vocab["[PAD]"]),
        vision_config=_vision_kw(), projection_dim=PROJECTION_DIM)
    model = BlipForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    BlipProcessor(image_processor=image_processor_class("BlipImageProcessor")(size=square),
                  tokenizer=tok).save_pretrained(path)
    _mark_random(path, "blip")
    return path


# A minimal chat template in the shape small VLMs ship (one user turn, image then text).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _llama_text(vocab_size: int, eot: int, layers: int, positions: int) -> dict[str, Any]:
    """A tiny Llama decoder config for the VLMs, its end of text also its start and padding."""
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=37,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=positions, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)


def _save_generator(model, eot: int, path: Path) -> None:
    """Save ``model`` with ``eot`` as the pad and end token of its generation config."""
    model.generation_config.pad_token_id = eot
    model.generation_config.eos_token_id = eot
    model.save_pretrained(path)


def build_llava(path: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA (CLIP vision tower + Llama decoder) loadable by ``AutoModelForImageTextToText``."""
    from transformers import (GPT2Tokenizer, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    path = Path(path)
    _seed(seed)
    vocab, merges = _train_bpe(400, specials=["<|endoftext|>", "<image>"])
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **_vision_kw()),
        text_config=_llama_text(len(tok), eot, layers=2, positions=128),
        image_token_index=image_id, vision_feature_select_strategy="default", vision_feature_layer=-1)
    _save_generator(LlavaForConditionalGeneration(cfg).eval(), eot, path)
    proc = LlavaProcessor(
        image_processor=image_processor_class("CLIPImageProcessor")(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE, num_additional_image_tokens=1)
    proc.save_pretrained(path)
    _mark_random(path, "llava")
    return path


def build_idefics3(path: str | Path, seed: int = 0) -> Path:
    """A tiny Idefics3 (the SmolVLM family): its processor resizes an image's longest edge to 128 px
    and splits it into 32-px tiles plus a global view, so an image's prompt length depends on its
    aspect ratio (1 x 4 to 4 x 4 tiles), unlike LLaVA's one fixed size."""
    from transformers import GPT2Tokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    path = Path(path)
    _seed(seed)
    specials = ["<|endoftext|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    vocab, merges = _train_bpe(400, specials=specials)
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        text_config=_llama_text(len(tok), eot, layers=1, positions=1024),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    _save_generator(Idefics3ForConditionalGeneration(cfg).eval(), eot, path)
    proc = Idefics3Processor(
        image_processor=image_processor_class("Idefics3ImageProcessor")(
            size={"longest_edge": 4 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True),
        # (32 / 8)^2 patches per tile, merged 2 x 2 by scale_factor: 4 image tokens a tile
        tokenizer=tok, image_seq_len=(IMAGE_SIZE // PATCH_SIZE) ** 2 // 4, chat_template=TINY_CHAT_TEMPLATE)
    proc.save_pretrained(path)
    _mark_random(path, "idefics3")
    return path


def build_head(path: str | Path, layers: list[int], seed: int = 0) -> Path:
    """A random MLP head as a safetensors state dict in the LAION aesthetic layout.

    ``layers=[768, 1024, 128, 64, 16, 1]`` is the improved-aesthetic-predictor: Linear layers
    at ``layers.0/2/4/6/7`` (dropouts between the first four, no activations).
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    idx = _aesthetic_indices(len(layers) - 1)
    state = {}
    for i, (a, b) in zip(idx, zip(layers, layers[1:])):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=gen) / a**0.5
        state[f"layers.{i}.bias"] = torch.zeros(b)
    save_file(state, str(path), metadata={"random_weights": "true"})
    return path


def _aesthetic_indices(n_linear: int) -> list[int]:
    # nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear): the
    # last Linear follows the previous one directly, so the indices are 0, 2, 4, 6, 7.
    if n_linear == 5:
        return [0, 2, 4, 6, 7]
    return [2 * i for i in range(n_linear)]


BUILDERS = {"clip": build_clip, "siglip": build_siglip, "vit_gpt2": build_vit_gpt2, "blip": build_blip,
            "llava": build_llava, "idefics3": build_idefics3}


def build_demo_models(root: str | Path) -> dict[str, str]:
    """Build (once) what ``mmcurate demo`` uses; returns name -> local path.

    ``clip`` (tiny CLIP, 16-d), ``vit_gpt2`` (captioner) and ``aesthetic`` (a random head over
    the tiny CLIP's 16-d image embedding in the LAION layout).
    """
    from operators.models.base import quiet_hf_progress_bars

    quiet_hf_progress_bars()  # the demo's output stays the run's own
    root = Path(root)
    out = {}
    for name in ("clip", "vit_gpt2"):
        p = root / name
        if not (p / RANDOM_WEIGHTS_MARKER).exists():
            BUILDERS[name](p)
            logger.info("built tiny random %s model in %s", name, p)
        out[name] = str(p)
    head = root / "aesthetic_head.safetensors"
    if not head.exists():
        build_head(head, [PROJECTION_DIM, 1024, 128, 64, 16, 1])
    out["aesthetic"] = str(head)
    return out


def build_all(root: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """Build the named tiny models (default: all) under ``root``; returns name -> local path."""
    root = Path(root)
    return {n: str(BUILDERS[n](root / n)) for n in (names or list(BUILDERS))}
