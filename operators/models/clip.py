"""CLIP / SigLIP image and text embeddings and their similarity."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.base import register
from operators.models.base import (ModelConfig, ModelOperator, embedding_array, image_size_of, pending_rows,
                                   processor_backend)

logger = logging.getLogger(__name__)

# Text towers that pool the last position were trained on text padded to the full length;
# right-padding to the longest caption in the batch would change their embeddings.
PAD_TO_MAX_LENGTH = ("siglip", "siglip2")


class ClipConfig(ModelConfig):
    prefix: str = Field("clip", pattern=r"^[a-z][a-z0-9_]*$",
                        description="output column prefix; two CLIP models in one pipeline need two prefixes")
    text_column: str = Field("text", description="caption to embed; rows with null/empty text get no text embedding")


def _features(out: Any):
    """``get_*_features`` returns a tensor in some transformers versions, an output object in others."""
    return out if hasattr(out, "shape") else out.pooler_output


@register
class ClipEmbedder(ModelOperator):
    """Embeds images and captions with any HF CLIP or SigLIP model (``AutoModel``).

    Input columns: ``image`` (validated bytes from ``decode``), the ``text_column`` (``text``),
    ``reject_reason``.
    Output columns: ``<prefix>_image_embedding`` and ``<prefix>_text_embedding``
    (L2-normalised, ``fixed_size_list<float16>[D]``), ``<prefix>_score`` (float32 cosine of the
    two, computed before float16 storage). Rows without text get the image embedding only.
    Resources: an actor pool (``resources``: num_gpus, num_cpus, min/max actors, batch_size);
    images are decoded in the actor (JPEGs at reduced scale, no larger than the processor needs)
    and resized/normalised by the model's own image processor on ``prepare_threads`` threads,
    ahead of the forward pass, within ``max_inflight_pixels_mb``.
    Failure behaviour: rejected rows get no work and null outputs; undecodable bytes
    ``<prefix>:bad_image``; a row that runs out of memory alone ``<prefix>:oom`` (batches are
    halved first); a row whose forward raises ``<prefix>:model_error``. A missing or unsafe
    model (pickle without ``allow_pickle``) stops the run.
    """

    name = "clip"
    Config = ClipConfig

    @classmethod
    def inputs(cls, config: ClipConfig) -> tuple[str, ...]:
        # a misspelt text_column is a plan-time error, not a column of null text embeddings
        return ("image", config.text_column)

    @classmethod
    def outputs(cls, config: ClipConfig) -> tuple[str, ...]:
        p = config.prefix
        return (f"{p}_image_embedding", f"{p}_text_embedding", f"{p}_score")

    @classmethod
    def label(cls, config: ClipConfig) -> str:
        return config.prefix

    def __init__(self, config: ClipConfig):
        super().__init__(config)
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model = self.place(AutoModel.from_pretrained(self.source, **self.model_kwargs()))
        self.image_processor = AutoImageProcessor.from_pretrained(self.source, backend=processor_backend(),
                                                                  **self.pretrained_kwargs())
        self.image_size = image_size_of(self.image_processor)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **self.pretrained_kwargs())
        mcfg = self.model.config
        self.dim = int(getattr(mcfg, "projection_dim", None) or mcfg.vision_config.hidden_size)
        positions = int(mcfg.text_config.max_position_embeddings)
        self.max_tokens = min(positions, int(self.tokenizer.model_max_length or positions))
        self.padding = "max_length" if mcfg.model_type in PAD_TO_MAX_LENGTH else True
        side = int(getattr(mcfg.vision_config, "image_size", 224))
        self.input_bytes = 3 * side * side * 4  # one float32 pixel_values row

    def prepare(self, data: bytes) -> np.ndarray:
        """One row's encoded image -> its float32 pixel_values [3, H, W] (runs on a decode thread)."""
        from operators.image.pixels import decode_rgb

        image = decode_rgb(data, self.image_size)
        return self.image_processor(images=[image], return_tensors="np")["pixel_values"][0]

    def embed_images(self, images: list) -> np.ndarray:
        """L2-normalised float32 image embeddings [n, D] of PIL images."""
        return self.embed_pixels(self.image_processor(images=images, return_tensors="np")["pixel_values"])

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised float32 image embeddings [n, D] of preprocessed pixel_values [n, 3, H, W]."""
        torch = self.torch
        px = torch.from_numpy(np.ascontiguousarray(pixels))
        with torch.inference_mode():
            feats = _features(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
            return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings [n, D] (truncated to the model's context)."""
        torch = self.torch
        enc = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            feats = _features(self.model.get_text_features(**enc))
            return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg: ClipConfig = self.config
        rows = pending_rows(batch)
        texts = (batch[cfg.text_column].to_pylist() if cfg.text_column in batch.column_names
                 else [None] * batch.num_rows)

        def forward(chunk: list[int], pixels: dict[int, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
            img = self.embed_pixels(np.stack([pixels[i] for i in chunk]))
            with_text = [k for k, i in enumerate(chunk) if texts[i] and texts[i].strip()]
            txt = self.embed_texts([texts[chunk[k]] for k in with_text]) if with_text else None
            by_pos = dict(zip(with_text, txt)) if with_text else {}
            return [(img[k], by_pos.get(k)) for k in range(len(chunk))]

        results, reasons = self.run_chunks(batch, rows, self.prepare, forward, size=self.image_size,
                                           prepared_bytes=self.input_bytes)
        n = batch.num_rows
        img_vecs = {i: r[0] for i, r in results.items()}
        txt_vecs = {i: r[1] for i, r in results.items() if r[1] is not None}
        scores = [float(np.dot(img_vecs[i], txt_vecs[i])) if i in txt_vecs else None for i in range(n)]
        image_col, text_col, score_col = self.outputs(cfg)
        return self.finish(batch, {
            image_col: embedding_array(n, img_vecs, self.dim),
            text_col: embedding_array(n, txt_vecs, self.dim),
            score_col: pa.array(scores, type=pa.float32()),
        }, reasons)
