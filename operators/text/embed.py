"""Sentence embeddings of captions (all-MiniLM-L6-v2 and other sentence-transformers encoders)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.base import register
from operators.models import loading
from operators.models.base import (ModelConfig, ModelOperator, ModelResources, embedding_array, longest_first,
                                   pending_rows)

logger = logging.getLogger(__name__)

# sentence-transformers stores the encoder's sequence limit here (256 for all-MiniLM-L6-v2,
# shorter than the 512 positions of its BERT): texts were trained truncated to it.
SENTENCE_CONFIG = "sentence_bert_config.json"


class TextEmbedConfig(ModelConfig):
    prefix: str = Field("minilm", pattern=r"^[a-z][a-z0-9_]*$",
                        description="output column prefix: <prefix>_text_embedding")
    text_column: str = Field("text", description="caption to embed; null/blank text gets a null embedding")
    max_tokens: int | None = Field(
        None, ge=1, description="truncate to this many tokens (default: the model's sentence_bert_config "
                                "max_seq_length, else the tokenizer's limit)")
    resources: ModelResources = Field(default_factory=lambda: ModelResources(batch_size=64))


def sentence_max_tokens(source: str, revision: str | None) -> int | None:
    """``max_seq_length`` from a sentence-transformers folder or cached hub snapshot, if present."""
    path = os.path.join(source, SENTENCE_CONFIG)
    if not os.path.isfile(path) and loading.kind_of(source) == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, SENTENCE_CONFIG, revision=revision)
        path = cached if isinstance(cached, str) else path
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        value = json.load(fh).get("max_seq_length")
    return int(value) if value else None


@register
class SentenceEmbedder(ModelOperator):
    """Embeds captions with a transformers encoder, mean-pooled like sentence-transformers.

    The encoder is loaded with ``AutoModel``/``AutoTokenizer`` (no sentence-transformers at run
    time); the sentence vector is the mean of the last hidden states over the attention mask,
    then L2-normalised: exactly the ``Transformer -> Pooling(mean) -> Normalize`` modules of
    all-MiniLM-L6-v2, so cosine similarity is a dot product.

    Input columns: ``text_column`` (``text``), ``reject_reason``.
    Output columns: ``<prefix>_text_embedding`` (``fixed_size_list<float16>[hidden size]``, 384
    for MiniLM-L6); null for rows without text and for rejected rows.
    Resources: an actor pool (``resources``), the model loaded once per actor; a Ray batch runs
    in chunks of ``forward_batch_size``, longest caption first (each chunk pads to similar lengths).
    Failure behaviour: a row that runs out of memory alone ``<prefix>:oom`` (batches are halved
    first); a row whose forward raises ``<prefix>:model_error``. A missing or unsafe model stops
    the run.
    """

    name = "text_embed"
    Config = TextEmbedConfig

    @classmethod
    def inputs(cls, config: TextEmbedConfig) -> tuple[str, ...]:
        return (config.text_column,)

    @classmethod
    def outputs(cls, config: TextEmbedConfig) -> tuple[str, ...]:
        return (f"{config.prefix}_text_embedding",)

    @classmethod
    def label(cls, config: TextEmbedConfig) -> str:
        return config.prefix

    def __init__(self, config: TextEmbedConfig):
        super().__init__(config)
        from transformers import AutoModel, AutoTokenizer

        self.model = self.place(AutoModel.from_pretrained(self.source, **self.model_kwargs()))
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **self.pretrained_kwargs())
        self.dim = int(self.model.config.hidden_size)
        positions = int(getattr(self.model.config, "max_position_embeddings", 512))
        limit = config.max_tokens or sentence_max_tokens(self.source, config.revision)
        self.max_tokens = min(positions, limit or int(self.tokenizer.model_max_length or positions))

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 sentence embeddings [n, D]."""
        torch = self.torch
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        self.count_tokens(enc)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            # clamp as sentence-transformers does: an all-padding row cannot divide by zero
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg: TextEmbedConfig = self.config
        texts = batch[cfg.text_column].to_pylist()
        rows = [i for i in pending_rows(batch) if texts[i] and texts[i].strip()]

        def forward(chunk: list[int]) -> Any:
            return list(self.embed([texts[i] for i in chunk]))

        results, reasons = self.run_in_chunks(forward, longest_first(rows, texts))
        (column,) = self.outputs(cfg)
        return self.finish(batch, {column: embedding_array(batch.num_rows, results, self.dim)}, reasons)
