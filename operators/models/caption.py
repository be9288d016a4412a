"""Re-captioning: VisionEncoderDecoder (ViT-GPT2), BLIP, and small image-text-to-text VLMs."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from operators.base import register
from operators.models.base import (ModelConfig, ModelOperator, alike_shapes_together, image_bytes, image_size_of,
                                   pending_rows, processor_backend)
from ground.errors import ConfigError

logger = logging.getLogger(__name__)

CaptionKind = Literal["auto", "vision_encoder_decoder", "blip", "image_text_to_text"]
# config.json model_type -> kind, for kind: auto; anything else goes to AutoModelForImageTextToText.
KIND_BY_MODEL_TYPE = {"vision-encoder-decoder": "vision_encoder_decoder", "blip": "blip"}
DEFAULT_VLM_PROMPT = "Describe this image in one sentence."


class CaptionConfig(ModelConfig):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="output column is caption_<name>")
    kind: CaptionKind = Field("auto", description="auto: from the model's config.json model_type")
    prompt: str | None = Field(None, description="BLIP: text the caption continues; VLM: the instruction")
    prompt_template: str | None = Field(
        None, description="VLM: full prompt with {prompt} (and the model's image token); default: its chat template")
    num_beams: int = Field(1, ge=1)
    max_new_tokens: int = Field(30, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    seed: int | None = Field(
        None, description="with do_sample: each row samples from its own generator seeded by (seed, key), "
                          "so a row's caption does not depend on batching, order or actor")


@register
class Captioner(ModelOperator):
    """Writes a new caption per image; the original ``text`` column is left untouched.

    Kinds: ``vision_encoder_decoder`` (e.g. nlpconnect/vit-gpt2-image-captioning: the model's
    ``AutoImageProcessor`` and the *decoder's own* ``AutoTokenizer`` saved with it; a tokenizer
    larger than the decoder's vocabulary is refused, which catches the GPT-2-with-BertTokenizer
    mistake), ``blip`` (``BlipForConditionalGeneration`` + ``AutoProcessor``, optional prompt)
    and ``image_text_to_text`` (``AutoModelForImageTextToText`` + ``AutoProcessor``, prompt via the
    model's chat template or ``prompt_template``). Every kind stores only the generated caption:
    the BLIP prompt it continues and a VLM's instruction are stripped (decoder-only VLMs return
    the prompt tokens, encoder-decoder ones do not; both are handled).
    Sampling with ``seed`` is reproducible per row: each row is generated on its own from a
    generator seeded by ``(seed, key)`` (a row at a time, so slower than batched sampling).

    Input columns: ``image`` (validated bytes), ``reject_reason``.
    Output columns: ``caption_<name>`` (string).
    Resources: an actor pool (``resources``); generation options from the config.
    Failure behaviour: rejected rows get no work and a null caption; undecodable bytes
    ``caption_<name>:bad_image``; out of memory on one row ``caption_<name>:oom`` (batches are
    halved first); a failing generate on one row ``caption_<name>:model_error``.
    """

    name = "caption"
    Config = CaptionConfig
    input_columns = ("image",)

    @classmethod
    def outputs(cls, config: CaptionConfig) -> tuple[str, ...]:
        return (f"caption_{config.name}",)

    @classmethod
    def label(cls, config: CaptionConfig) -> str:
        return f"caption_{config.name}"

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        from transformers import AutoConfig

        kind = config.kind
        if kind == "auto":
            model_type = AutoConfig.from_pretrained(self.source, **self.pretrained_kwargs()).model_type
            kind = KIND_BY_MODEL_TYPE.get(model_type, "image_text_to_text")
        self.kind = kind
        # whether the processor gives images of other shapes prompts of other lengths (below)
        self.shape_buckets = False
        getattr(self, f"_load_{kind}")()
        self.generation = self._generation_kwargs()

    def _load_vision_encoder_decoder(self) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

        self.model = self.place(VisionEncoderDecoderModel.from_pretrained(self.source, **self.model_kwargs()))
        self.image_processor = AutoImageProcessor.from_pretrained(self.source, backend=processor_backend(),
                                                                  **self.pretrained_kwargs())
        self.image_size = image_size_of(self.image_processor)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **self.pretrained_kwargs())
        # The decoder ends captions with its own end token; a tokenizer that does not know that
        # id (BertTokenizer next to a GPT-2 decoder) decodes garbage. Refuse it at load.
        dec = self.model.config.decoder
        end = self.model.generation_config.eos_token_id
        end = dec.eos_token_id if end is None else end
        # generation configs may list several end ids; the tokenizer must know one of them
        ends = [] if end is None else (list(end) if isinstance(end, (list, tuple)) else [end])
        known = {self.tokenizer.eos_token_id, self.tokenizer.sep_token_id} - {None}
        if len(self.tokenizer) > dec.vocab_size or (ends and not known.intersection(ends)):
            raise ConfigError(
                f"{self.config.model}: tokenizer {type(self.tokenizer).__name__} does not match the "
                f"{dec.model_type} decoder (end token {end}, tokenizer end tokens {sorted(known)}, "
                f"{len(self.tokenizer)} vs {dec.vocab_size} tokens): save the decoder's own tokenizer with the model")

        # The decoder starts from one start token for every image, so nothing is padded; generate
        # cannot know that and warns about a missing attention mask when pad == eos (GPT-2).
        logging.getLogger("transformers.generation.utils").addFilter(_PixelInputMaskWarning())

    def _load_blip(self) -> None:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        self.model = self.place(BlipForConditionalGeneration.from_pretrained(self.source, **self.model_kwargs()))
        self.processor = AutoProcessor.from_pretrained(self.source, backend=processor_backend(),
                                                       **self.pretrained_kwargs())
        self.tokenizer = self.processor.tokenizer
        self.image_size = image_size_of(self.processor)
        # BLIP's generate returns the prompt it continued; its decoded text is cut off the caption
        prompt = self.config.prompt
        self.blip_prompt = (self.tokenizer.decode(self.tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                                  skip_special_tokens=True).strip() if prompt else "")

    def _load_image_text_to_text(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        cfg: CaptionConfig = self.config
        self.model = self.place(AutoModelForImageTextToText.from_pretrained(self.source, **self.model_kwargs()))
        self.processor = AutoProcessor.from_pretrained(self.source, backend=processor_backend(),
                                                       **self.pretrained_kwargs())
        self.tokenizer = self.processor.tokenizer
        self.image_size = image_size_of(self.processor)
        # Decoder-only generation continues the last position: pad on the left.
        self.tokenizer.padding_side = "left"
        instruction = cfg.prompt or DEFAULT_VLM_PROMPT
        if cfg.prompt_template:
            self.vlm_prompt = cfg.prompt_template.format(prompt=instruction)
        elif getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            self.vlm_prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            raise ConfigError(f"{cfg.model}: the processor has no chat template; set prompt_template")
        self.shape_buckets = self._prompt_length_varies()

    def _prompt_length_varies(self) -> bool:
        """Whether this processor turns images of other shapes into prompts of other lengths.

        VLMs that tile by aspect ratio (Idefics3 / SmolVLM) or spend tokens by area (Qwen2-VL)
        do; LLaVA-style processors resize every image to one size and do not. Asked of the
        processor itself, on three blank images (wide, tall, large square), rather than kept as a
        list of model types.
        """
        from PIL import Image

        try:
            lengths = {self.processor(images=[Image.new("RGB", wh)], text=[self.vlm_prompt],
                                      return_tensors="np")["input_ids"].shape[1]
                       for wh in ((64, 32), (32, 64), (512, 512))}
        except Exception as exc:  # noqa: BLE001 - only an optimisation: real rows meet the processor anyway
            logger.warning("%s: could not probe the processor with blank images (%r); rows keep their order",
                           self.name, exc)
            return False
        return len(lengths) > 1

    def _generation_kwargs(self) -> dict[str, Any]:
        cfg: CaptionConfig = self.config
        kw: dict[str, Any] = {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens,
                              "do_sample": cfg.do_sample}
        if cfg.do_sample:
            kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        if self.kind == "blip":  # BLIP's generate sets pad/eos/bos for its text decoder itself
            return kw
        pad = self.model.generation_config.pad_token_id
        if pad is None:  # GPT-2 style decoders have no pad token; their end-of-text pads
            pad = self.model.generation_config.eos_token_id or getattr(self.tokenizer, "eos_token_id", None)
        if pad is not None:
            kw["pad_token_id"] = pad[0] if isinstance(pad, list) else pad
        return kw

    def _to_device(self, inputs) -> dict[str, Any]:
        out = {}
        for k, v in inputs.items():
            if hasattr(v, "to"):
                v = v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def generate(self, images: list, keys: list[str] | None = None) -> list[str]:
        """Captions for a list of RGB PIL images (``keys``: the rows' keys, for per-row sampling seeds)."""
        cfg: CaptionConfig = self.config
        if cfg.do_sample and cfg.seed is not None:
            keys = keys if keys is not None else [str(k) for k in range(len(images))]
            out = []
            for image, key in zip(images, keys):
                self.torch.manual_seed(row_seed(cfg.seed, key))
                out.extend(self._generate([image]))
            return out
        return self._generate(images)

    def _generate(self, images: list) -> list[str]:
        cfg: CaptionConfig = self.config
        torch = self.torch
        n = len(images)
        if self.kind == "vision_encoder_decoder":
            inputs = {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
        elif self.kind == "blip":
            text = [cfg.prompt] * n if cfg.prompt else None
            inputs = self.processor(images=images, text=text, return_tensors="pt")
        else:
            inputs = self.processor(images=images, text=[self.vlm_prompt] * n, padding=True, return_tensors="pt")
        if "input_ids" in inputs:  # a text prompt (BLIP's, a VLM's): count its padding
            self.count_tokens(inputs)
        inputs = self._to_device(inputs)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **self.generation)
        if self.kind == "image_text_to_text":
            ids = generated_part(ids, inputs["input_ids"].shape[1], self.model.config.is_encoder_decoder)
        captions = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if self.kind == "blip" and self.blip_prompt:
            captions = [strip_prompt(c, self.blip_prompt) for c in captions]
        return captions

    def prepare(self, data: bytes):
        """One row's encoded image -> an upright RGB PIL image no larger than the processor needs."""
        from operators.image.pixels import decode_rgb

        return decode_rgb(data, self.image_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = pending_rows(batch)
        data = image_bytes(batch)
        if self.shape_buckets:  # a chunk's prompts are padded to its longest: chunks of alike images
            rows = alike_shapes_together(rows, data)
        keys = batch["key"].to_pylist() if "key" in batch.column_names else [str(i) for i in range(batch.num_rows)]
        results, reasons = self.run_chunks(
            batch, rows, self.prepare,
            lambda chunk, images: self.generate([images[i] for i in chunk], [keys[i] for i in chunk]),
            size=self.image_size, data=data)
        captions = [results.get(i) for i in range(batch.num_rows)]
        (column,) = self.outputs(self.config)
        return self.finish(batch, {column: pa.array(captions, type=pa.string())}, reasons)


class _PixelInputMaskWarning(logging.Filter):
    """Drops generate's attention-mask warning, which does not apply to pixel-input encoder-decoders."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention mask is not set" not in record.getMessage()


def generated_part(ids, prompt_len: int, is_encoder_decoder: bool):
    """The newly generated tokens of ``generate``'s output.

    Decoder-only models return prompt + new tokens, so the first ``prompt_len`` go; encoder-
    decoder models return only the decoder's tokens (after its start token, which
    ``skip_special_tokens`` drops), so nothing is cut.
    """
    return ids if is_encoder_decoder else ids[:, prompt_len:]


def strip_prompt(caption: str, prompt: str) -> str:
    """``caption`` without a leading ``prompt`` (compared case-insensitively: BLIP's tokenizer lowercases)."""
    if prompt and caption.lower().startswith(prompt.lower()):
        return caption[len(prompt):].strip()
    return caption


def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one row from the config's seed and the row's key (stable across runs)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1
