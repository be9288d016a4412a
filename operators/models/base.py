"""What every model operator shares: config fields, actor-side loading, OOM split, Arrow columns.

A model operator is an actor-pool operator: ``__init__`` (once per actor) resolves the model
to local disk, picks the device *inside the actor* (``auto`` -> CUDA when the actor sees a
GPU) and loads; ``__call__`` does work only for pending rows, and a row whose model call fails
gets ``<label>:<reason>`` and null outputs. ``label`` is the producer prefix of the operator's
output columns (``clip``, ``clip_l14``, ``caption_blip``), so two instances stay apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from operators.base import Operator, OperatorConfig, Resources, pending_mask, set_column, with_rejects
from operators.models import loading

logger = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["float32", "bfloat16", "float16"]


class ModelResources(Resources):
    """Resources with actor-pool defaults sized for a 2-core laptop.

    Half a CPU and one actor leave room for read and decode tasks (two 1-CPU actors on two
    cores starve the readers and stall the plan). On a GPU cluster set ``num_gpus`` (0.5
    packs two actors per GPU) and ``max_actors``.
    """

    num_cpus: float = Field(0.5, gt=0)
    batch_size: int | None = Field(32, ge=1)
    max_actors: int | None = Field(1, ge=1)


class ModelConfig(OperatorConfig):
    """Fields every operator that loads a transformers model takes."""

    model: str = Field(description="HF id, local folder, or object-storage prefix (s3://bucket/models/clip)")
    revision: str | None = Field(None, description="HF revision (branch, tag or commit); recorded in metadata")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for an object-storage model")
    device: Device = Field("auto", description="auto: CUDA when the actor is given a GPU, else CPU")
    dtype: DType = Field("float32", description="float16 falls back to float32 on CPU")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="allow .bin/.pt weights (pickle); default safetensors only")
    cpu_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (default: torch's)")
    inject_oom_above_rows: int | None = Field(
        None, ge=0, description="testing: raise CUDA out-of-memory for model calls on more rows than this")
    resources: ModelResources = Field(default_factory=ModelResources)

    @model_validator(mode="after")
    def _cuda_needs_gpus(self) -> "ModelConfig":
        # Ray hides GPUs from actors that reserve none, so device: cuda would fail in every actor.
        if self.device == "cuda" and self.resources.num_gpus <= 0:
            raise ValueError("device: cuda needs resources.num_gpus > 0 (use device: auto to run anywhere)")
        return self


class ModelOperator(Operator):
    """Base for operators that run a model on an actor pool."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        import torch

        self.torch = torch
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.cpu_threads and self.device == "cpu":
            torch.set_num_threads(config.cpu_threads)
        self.source = loading.resolve_local(config.model, config.storage_options)
        loading.check_weights_allowed(self.source, config.allow_pickle)
        self.model_seconds = 0.0
        self._warned: set[str] = set()

    @classmethod
    def label(cls, config: ModelConfig) -> str:
        """Producer prefix of the output columns and of this operator's reject reasons."""
        return cls.name

    @classmethod
    def provenance(cls, config: ModelConfig) -> dict[str, Any]:
        info = loading.model_provenance(config.model, config.revision, config.storage_options)
        info["operator"] = cls.name
        return {col: dict(info) for col in cls.outputs(config)}

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every ``from_pretrained`` of this operator."""
        cfg: ModelConfig = self.config
        kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if loading.kind_of(cfg.model) == "hub" and cfg.revision:
            kw["revision"] = cfg.revision
        return kw

    def model_kwargs(self) -> dict[str, Any]:
        cfg: ModelConfig = self.config
        return {**self.pretrained_kwargs(), "dtype": self.dtype,
                "use_safetensors": None if cfg.allow_pickle else True}

    def place(self, model):
        """Move a loaded model to the actor's device in eval mode."""
        return model.to(self.device).eval()

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def run_split(self, fn: Callable[[list[int]], Sequence[Any]], rows: list[int]
                  ) -> tuple[dict[int, Any], dict[int, str]]:
        """Run ``fn`` on ``rows``, halving the batch on CUDA out-of-memory down to single rows.

        Returns ({row: result}, {row: reason}). A single row that still runs out of memory is
        rejected ``oom``; a single row whose call raises anything else ``model_error``. When a
        whole batch of several rows fails with ordinary errors, the model is broken, not the
        rows: that is raised (a systemic fault stops the run).
        """
        results: dict[int, Any] = {}
        reasons: dict[int, str] = {}
        errors: list[BaseException] = []
        limit = self.config.inject_oom_above_rows
        oom = self.torch.OutOfMemoryError

        def go(chunk: list[int]) -> None:
            try:
                if limit is not None and len(chunk) > limit:
                    raise oom(f"injected: {len(chunk)} rows > inject_oom_above_rows={limit}")
                started = time.perf_counter()
                out = fn(chunk)
                self.model_seconds += time.perf_counter() - started
                results.update(zip(chunk, out))
                return
            except oom:
                if self.device == "cuda":
                    self.torch.cuda.empty_cache()
                if len(chunk) == 1:
                    reasons[chunk[0]] = "oom"
                    self.warn_once("oom", "%s: out of memory on a single row; rejecting it as oom", self.name)
                    return
                logger.info("%s: out of memory on %d rows; splitting", self.name, len(chunk))
            except Exception as exc:  # noqa: BLE001 - isolate the rows that fail
                if len(chunk) == 1:
                    reasons[chunk[0]] = "model_error"
                    errors.append(exc)
                    self.warn_once("model_error", "%s: model call failed on a row: %r", self.name, exc)
                    return
            mid = len(chunk) // 2
            go(chunk[:mid])
            go(chunk[mid:])

        if rows:
            go(list(rows))
        if len(rows) > 1 and len(errors) == len(rows):
            raise RuntimeError(f"{self.name}: every row of a {len(rows)}-row batch failed: {errors[0]!r}") from errors[0]
        return results, reasons

    def finish(self, batch: pa.Table, columns: dict[str, pa.Array], reasons: dict[int, str]) -> pa.Table:
        """Add ``columns`` and the rejects (``<label>:<reason>``) to ``batch``."""
        out = batch
        for name, arr in columns.items():
            out = set_column(out, name, arr)
        if reasons:
            label = self.label(self.config)
            out = with_rejects(out, [f"{label}:{reasons[i]}" if i in reasons else None for i in range(batch.num_rows)])
        return out


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``. Call inside the actor only."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda but this actor sees no GPU (CUDA_VISIBLE_DEVICES empty?)")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "float16" and device == "cpu":
        # Many CPU kernels lack float16 (and the rest are slow); the same config must still run.
        logger.info("dtype float16 on CPU: using float32")
        return torch.float32
    return getattr(torch, dtype)


def pending_rows(batch: pa.Table) -> list[int]:
    return [int(i) for i in np.flatnonzero(pending_mask(batch))]


def load_images(batch: pa.Table, rows: list[int], column: str = "image") -> tuple[dict[int, Any], dict[int, str]]:
    """Decode the image bytes of ``rows`` to upright RGB PIL images; failures are ``bad_image``.

    The spine's decode already validated and normalised the stored bytes, so this decode
    only turns them into pixels for the model's own processor (see benchmarks/README.md).
    """
    from operators.image.pixels import decode_rgb

    images: dict[int, Any] = {}
    reasons: dict[int, str] = {}
    col = batch[column]
    for i in rows:
        value = col[i].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        try:
            images[i] = decode_rgb(data)
        except Exception:  # noqa: BLE001 - a row's bad bytes are that row's problem
            reasons[i] = "bad_image"
    return images, reasons


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)


def embedding_array(n: int, vectors: dict[int, np.ndarray], dim: int) -> pa.Array:
    """A ``fixed_size_list<float16>[dim]`` column of ``n`` rows; rows missing from ``vectors`` are null."""
    flat = np.zeros((n, dim), dtype=np.float16)
    mask = np.ones(n, dtype=bool)
    for i, v in vectors.items():
        flat[i] = v
        mask[i] = False
    values = pa.array(flat.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(mask))


def read_embeddings(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float32 matrix [n, D], valid mask [n]) from a fixed-size-list embedding column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise TypeError(f"expected a fixed_size_list embedding column, got {arr.type}")
    dim = arr.type.list_size
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    # .values keeps the slots of null rows (flatten() would drop them and shift the rest)
    flat = arr.values.slice(arr.offset * dim, len(arr) * dim)
    mat = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), dim)
    mat[~valid] = 0.0
    return mat, valid


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)
