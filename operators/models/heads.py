"""Small heads over a stored embedding column: aesthetics, NSFW, watermark. No second backbone pass."""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from operators.base import Operator, OperatorConfig, register, set_column
from operators.models import loading
from operators.models.base import ModelResources, l2_normalize, pending_rows, read_embeddings
from ground.errors import ConfigError
from ground.schema import CORE_ORDER, INTERNAL_FIELDS

logger = logging.getLogger(__name__)

# LAION improved-aesthetic-predictor (github.com/christophschuhmann/improved-aesthetic-predictor):
# Linear 768->1024->128->64->16->1 with dropout between the first four and no activations,
# trained on L2-normalised CLIP ViT-L/14 image embeddings.
AESTHETIC_WIDTHS = [1024, 128, 64, 16, 1]


class HeadConfig(OperatorConfig):
    weights: str = Field(description="state dict: .safetensors (or .pt/.pth with allow_pickle), local or s3://...")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    allow_pickle: bool = Field(False, description="allow .pt/.pth (pickle) weights from a source you trust")
    embedding_column: str = Field("clip_image_embedding", description="fixed_size_list embedding to score")
    output: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="output column (float32)")
    activation: Literal["none", "relu", "gelu"] = Field("relu", description="between Linear layers")
    output_activation: Literal["none", "sigmoid", "softmax"] = "none"
    output_index: int = Field(0, ge=0, description="which output unit to store when the head has several")
    normalize_input: bool = Field(True, description="L2-normalise the (float16-stored) embedding first")
    resources: ModelResources = Field(default_factory=lambda: ModelResources(batch_size=1024))

    @field_validator("output")
    @classmethod
    def _not_a_core_column(cls, value: str) -> str:
        # a head named reject_reason or text would silently overwrite what the writer routes on
        if value in CORE_ORDER or value in {f.name for f in INTERNAL_FIELDS}:
            raise ValueError(f"output {value!r} is a core column; name the score after the head (e.g. nsfw_score)")
        return value


class AestheticConfig(HeadConfig):
    output: str = Field("aesthetic_score", pattern=r"^[a-z][a-z0-9_]*$")
    embedding_column: str = "clip_image_embedding"
    activation: Literal["none", "relu", "gelu"] = "none"


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_linear_stack(path: str, allow_pickle: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(weight [out, in], bias [out])] of the Linear layers in a state dict, in layer order."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        state = load_file(path)
    elif path.endswith((".pt", ".pth", ".bin")):
        if not allow_pickle:
            raise ConfigError(f"{path}: pickle weights; convert to safetensors or set allow_pickle: true")
        import torch

        state = {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    else:
        raise ConfigError(f"{path}: expected a .safetensors state dict")
    # "layers.0." ... or "" for a bare nn.Linear's state dict
    names = sorted((k[: -len("weight")] for k, v in state.items()
                    if (k == "weight" or k.endswith(".weight")) and v.ndim == 2), key=_natural_key)
    if not names:
        raise ConfigError(f"{path}: no Linear weights in the state dict")
    linear = {f"{n}{part}" for n in names for part in ("weight", "bias")}
    others = sorted((k for k in state if k not in linear), key=_natural_key)
    if others:
        # LayerNorm/BatchNorm weights are 1-D; skipping them would compute different scores
        raise ConfigError(f"{path}: tensors {others[:4]} are not Linear weights/biases (a norm or other layer); "
                          "the head operator runs Linear layers with activations only")
    layers = []
    for n in names:
        w = state[f"{n}weight"].astype(np.float32)
        b = state.get(f"{n}bias")
        layers.append((w, np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32)))
    for (w1, _), (w2, _) in zip(layers, layers[1:]):
        if w1.shape[0] != w2.shape[1]:
            raise ConfigError(f"{path}: layer widths do not chain ({w1.shape} then {w2.shape})")
    return layers


@register
class EmbeddingHead(Operator):
    """A linear or MLP head from a safetensors state dict over any embedding column.

    Layers are the state dict's 2-D ``*.weight`` tensors in natural key order with their
    biases, e.g. an NSFW or watermark classifier trained on CLIP image embeddings.

    Input columns: ``embedding_column`` (``fixed_size_list``), ``reject_reason``.
    Output columns: ``output`` (float32: unit ``output_index`` after ``output_activation``).
    Resources: a small CPU actor pool; numpy only (no torch, no GPU).
    Failure behaviour: rejected rows and rows with a null embedding get null; a missing
    column or an embedding width that does not match the first layer stops the run.
    """

    name = "head"
    Config: ClassVar[type[HeadConfig]] = HeadConfig

    @classmethod
    def outputs(cls, config: HeadConfig) -> tuple[str, ...]:
        return (config.output,)

    @classmethod
    def inputs(cls, config: HeadConfig) -> tuple[str, ...]:
        return (config.embedding_column,)

    @classmethod
    def provenance(cls, config: HeadConfig) -> dict[str, Any]:
        info = loading.model_provenance(config.weights, None, config.storage_options)
        return {config.output: {**info, "operator": cls.name}}

    @classmethod
    def sources(cls, config: HeadConfig) -> dict[str, str]:
        return {"weights": config.weights}

    def __init__(self, config: HeadConfig):
        super().__init__(config)
        self.layers = load_linear_stack(loading.resolve_local(config.weights, config.storage_options),
                                        config.allow_pickle)
        self.check_layout()

    def check_layout(self) -> None:
        """Subclasses with a fixed architecture refuse weights of another shape."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        cfg: HeadConfig = self.config
        for k, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if k < len(self.layers) - 1:
                if cfg.activation == "relu":
                    x = np.maximum(x, 0)
                elif cfg.activation == "gelu":
                    x = 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))
        if cfg.output_activation == "sigmoid":
            x = 1 / (1 + np.exp(-x))
        elif cfg.output_activation == "softmax":
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            x = e / e.sum(axis=-1, keepdims=True)
        return x[:, cfg.output_index]

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg: HeadConfig = self.config
        if cfg.embedding_column not in batch.column_names:
            raise ConfigError(f"{self.name}: column {cfg.embedding_column!r} is missing; put the operator that "
                              "makes it (clip with the matching prefix) earlier in the pipeline")
        emb, valid = read_embeddings(batch[cfg.embedding_column])
        if emb.shape[1] != self.layers[0][0].shape[1]:
            raise ConfigError(f"{self.name}: {cfg.embedding_column} has width {emb.shape[1]} but {cfg.weights} "
                              f"expects {self.layers[0][0].shape[1]}")
        rows = [i for i in pending_rows(batch) if valid[i]]
        scores: list[float | None] = [None] * batch.num_rows
        if rows:
            x = emb[rows]
            out = self.forward(l2_normalize(x) if cfg.normalize_input else x)
            for i, s in zip(rows, out):
                scores[i] = float(s)
        return set_column(batch, cfg.output, pa.array(scores, type=pa.float32()))


@register
class AestheticHead(EmbeddingHead):
    """LAION improved-aesthetic-predictor over L2-normalised CLIP ViT-L/14 image embeddings.

    The MLP 768->1024->128->64->16->1 (state dict keys ``layers.0/2/4/6/7``; convert the
    released ``.pth`` to safetensors or set ``allow_pickle``). Point ``embedding_column`` at the
    image embedding of a CLIP L/14 operator (e.g. prefix ``clip_l14``).

    Input columns: ``embedding_column`` (default ``clip_image_embedding``), ``reject_reason``.
    Output columns: ``output`` (default ``aesthetic_score``, float32, roughly 1..10 with real weights).
    Resources: a small CPU actor pool; numpy only.
    Failure behaviour: as ``head``; weights of another layout stop the run at load.
    """

    name = "aesthetic"
    Config = AestheticConfig

    def check_layout(self) -> None:
        widths = [w.shape[0] for w, _ in self.layers]
        if widths != AESTHETIC_WIDTHS:
            raise ConfigError(f"{self.config.weights}: Linear widths {widths} are not the LAION aesthetic layout "
                              f"{AESTHETIC_WIDTHS}; use the generic 'head' operator")
