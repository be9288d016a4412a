"""What every model operator shares: config fields, actor-side loading, OOM split, Arrow columns.

A model operator is an actor-pool operator: ``__init__`` (once per actor) resolves the model
to local disk, picks the device *inside the actor* (``auto`` -> CUDA when the actor sees a
GPU) and loads; ``__call__`` does work only for pending rows, and a row whose model call fails
gets ``<label>:<reason>`` and null outputs. ``label`` is the producer prefix of the operator's
output columns (``clip``, ``clip_l14``, ``caption_blip``), so two instances stay apart.
"""

from __future__ import annotations

import logging
import math
import sys
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
    """Resources of a model actor pool.

    ``num_cpus`` left unset is derived at run time from the connected cluster's nodes
    (``pipelines.plan.resolve_resources``): on CPU most of a node, shared by the model
    operators, with fractional shares left for read/decode/write; with GPUs a share of the
    node's CPUs per GPU fraction, for the actor's decode threads. ``max_actors`` left unset is
    derived too: on CPU, actors of at most ``CPU_ACTOR_MAX_THREADS`` torch threads each; with a
    GPU, one (set ``num_gpus``, 0.5 packs two actors per GPU, and ``max_actors``).
    ``batch_size`` is the Ray batch handed to one call; the forward pass runs in chunks of the
    config's ``forward_batch_size`` so decoding the next chunk overlaps the current forward.
    """

    batch_size: int | None = Field(256, ge=1)
    # None: derived at run time (pipelines.plan.resolve_resources): on CPU, several actors of
    # few torch threads each; with a GPU, one.
    max_actors: int | None = Field(None, ge=1)

    @property
    def uses_actors(self) -> bool:
        return True  # a model is loaded once per actor, never per task


# Per actor: decoded pixels + prepared inputs of rows handed to the decode threads and not yet
# through the model. 512 MB holds 256 drafted 12-MP photos (~0.6 MB each at 1/8 scale) plus their
# 224-px float32 inputs (0.6 MB each) with room to spare, and ~14 full-size 12-MP RGB decodes.
DEFAULT_MAX_INFLIGHT_PIXELS_MB = 512
# A neighbour on a shared GPU (fractional num_gpus) can hold memory for a moment; a single row
# that runs out of memory is retried after these pauses (seconds) before it is rejected.
OOM_RETRY_DELAYS_S = (0.2, 0.5, 1.0)
# With a GPU, the thread launching kernels competes for the GIL with the prepare threads. Measured
# on an H200 node (16 cores, CLIP ViT-L/14 fp16, benchmarks/bench_gpu_clip.py): 4/8/12/16 threads gave
# 529/1077/921/726 img/s, and a 0.5 ms GIL switch interval (Python's default is 5 ms) 698/1210/1100/840.
GPU_PREPARE_THREADS_FRACTION = 0.5
GPU_SWITCH_INTERVAL_S = 0.0005


class ModelConfig(OperatorConfig):
    """Fields every operator that loads a transformers model takes."""

    model: str = Field(description="HF id, local folder, or object-storage prefix (s3://bucket/models/clip)")
    revision: str | None = Field(None, description="HF revision (branch, tag or commit); recorded in metadata")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for an object-storage model")
    device: Device = Field("auto", description="auto: CUDA when the actor is given a GPU, else CPU")
    dtype: DType = Field("float32", description="float16 falls back to float32 on CPU")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="allow .bin/.pt weights (pickle); default safetensors only")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU (default: round(CPUs the actor was given))")
    forward_batch_size: int = Field(32, ge=1, description="rows per forward pass; the Ray batch is split into these")
    prepare_threads: int | None = Field(
        None, ge=1,
        description="threads decoding/preprocessing ahead of the model (default: the actor's CPUs; half on a GPU)")
    max_inflight_pixels_mb: int = Field(
        DEFAULT_MAX_INFLIGHT_PIXELS_MB, ge=1,
        description="per actor: decoded pixels + prepared inputs waiting for the model, at most this many MB")
    inject_oom_above_rows: int | None = Field(
        None, ge=0, description="testing: raise CUDA out-of-memory for model calls on more rows than this")
    resources: ModelResources = Field(default_factory=ModelResources)

    @property
    def prepares_in_tasks(self) -> bool:
        """True when a CPU task stage decodes and resizes this operator's images (see ``clip``'s
        ``prepare_in``); the actor then needs few CPUs of its own."""
        return False

    @model_validator(mode="after")
    def _cuda_needs_gpus(self) -> "ModelConfig":
        # Ray hides GPUs from actors that reserve none, so device: cuda would fail in every actor.
        if self.device == "cuda" and self.resources.num_gpus <= 0:
            raise ValueError("device: cuda needs resources.num_gpus > 0 (use device: auto to run anywhere)")
        return self


class ModelOperator(Operator):
    """Base for operators that run a model on an actor pool."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    heavy = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        import torch

        from operators.models.prefetch import Prefetcher

        quiet_hf_progress_bars()
        self.torch = torch
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        # config.resources.num_cpus is what Ray reserved for this actor (the planner resolves an
        # unset value from the cluster before the actor starts). Ray itself sets OMP_NUM_THREADS to
        # floor(num_cpus), which leaves 1.5 CPUs running one torch thread.
        assigned = config.resources.num_cpus
        if self.device == "cpu":
            threads = config.cpu_threads or (max(1, round(assigned)) if assigned else None)
        else:
            # On a GPU the only CPU torch work is preprocessing, spread over the prepare threads:
            # intra-op threads on top of them would oversubscribe the cores many times over.
            threads = config.cpu_threads or 1
        if threads:
            torch.set_num_threads(threads)
        prepare = max(1, round(assigned or 1))
        if self.device == "cuda":
            prepare = max(1, round(prepare * GPU_PREPARE_THREADS_FRACTION))
            # the kernel-launching thread gets the GIL back sooner (this process is the actor's own)
            sys.setswitchinterval(GPU_SWITCH_INTERVAL_S)
        self.prefetcher = Prefetcher(config.prepare_threads or prepare, config.max_inflight_pixels_mb * 1024 * 1024)
        self.source = loading.resolve_local(config.model, config.storage_options)
        loading.check_weights_allowed(self.source, config.allow_pickle)
        self.model_seconds = 0.0
        # text positions the forwards were given: real tokens, and all of them (padding included);
        # stats.json shows their ratio as token_padding
        self.input_tokens = 0
        self.padded_tokens = 0
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

    @classmethod
    def sources(cls, config: ModelConfig) -> dict[str, str]:
        return {"model": config.model}

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every ``from_pretrained`` of this operator."""
        return pretrained_kwargs(self.config)

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

        Returns ({row: result}, {row: reason}). A single row that runs out of memory is retried
        after each pause in ``OOM_RETRY_DELAYS_S`` (emptying the CUDA cache first: on a shared GPU
        the memory may belong to a neighbour for a moment) and only then rejected ``oom``; a
        single row whose call raises anything else ``model_error``. When a whole batch of
        several rows fails with ordinary errors, the model is broken, not the rows: that is
        raised (a systemic fault stops the run).
        """
        results: dict[int, Any] = {}
        reasons: dict[int, str] = {}
        errors: list[BaseException] = []
        limit = self.config.inject_oom_above_rows
        oom = self.torch.OutOfMemoryError

        def go(chunk: list[int], attempt: int = 0) -> None:
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
                if len(chunk) == 1 and attempt < len(OOM_RETRY_DELAYS_S):
                    logger.info("%s: out of memory on one row; retrying in %.1fs", self.name,
                                OOM_RETRY_DELAYS_S[attempt])
                    time.sleep(OOM_RETRY_DELAYS_S[attempt])
                    go(chunk, attempt + 1)
                    return
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

    def count_tokens(self, enc: Any, pad_id: int | None = None) -> None:
        """Count one forward's text positions from its tokenizer/processor output ``enc``: real
        tokens (the attention mask, else ids other than ``pad_id``: where padding is also the end
        token, as in SigLIP's tokenizer, the end token counts as padding) and all positions computed."""
        ids = enc["input_ids"]
        mask = enc["attention_mask"] if "attention_mask" in enc else (ids != pad_id if pad_id is not None else None)
        self.padded_tokens += int(ids.shape[0] * ids.shape[1])
        self.input_tokens += int(mask.sum()) if mask is not None else int(ids.shape[0] * ids.shape[1])

    def run_in_chunks(self, fn: Callable[[list[int]], Sequence[Any]], rows: list[int]
                      ) -> tuple[dict[int, Any], dict[int, str]]:
        """:meth:`run_split` over consecutive chunks of ``forward_batch_size`` rows of ``rows``
        (operators without images: nothing to prepare ahead). Returns ({row: result}, {row: reason})."""
        step = self.config.forward_batch_size
        results: dict[int, Any] = {}
        reasons: dict[int, str] = {}
        for start in range(0, len(rows), step):
            done, bad = self.run_split(fn, rows[start:start + step])
            results.update(done)
            reasons.update(bad)
        return results, reasons

    def run_chunks(self, batch: pa.Table, rows: list[int], prepare: Callable[[bytes], Any],
                   forward: Callable[[list[int], dict[int, Any]], Sequence[Any]], size: Any = None,
                   prepared_bytes: int = 0, ready: list[Any] | None = None,
                   unpack: Callable[[Any], Any] | None = None,
                   data: Sequence[bytes | None] | None = None) -> tuple[dict[int, Any], dict[int, str]]:
        """Prepare ``rows`` ahead on the decode threads and run ``forward`` chunk by chunk.

        ``prepare(image_bytes)`` turns one row's encoded image into model input (on a pool
        thread); ``forward(chunk, prepared)`` runs the model on ``forward_batch_size`` rows
        (through :meth:`run_split`, so out-of-memory halves the chunk). ``size`` and
        ``prepared_bytes`` feed the in-flight byte budget (see :func:`pixel_charge`).
        ``ready`` (per row, or None) holds inputs a CPU task stage already prepared; such a row
        is only ``unpack``-ed, and costs ``prepared_bytes``. ``data``: the batch's image bytes when
        the caller already took them out of the batch (:func:`image_bytes`).
        Returns ({row: result}, {row: reason}); a row whose bytes do not decode is ``bad_image``.
        """
        cfg: ModelConfig = self.config
        data = image_bytes(batch) if data is None else data
        results: dict[int, Any] = {}
        reasons: dict[int, str] = {}

        def charge(i: int) -> int:
            if ready is not None and ready[i] is not None:
                return prepared_bytes
            return pixel_charge(data[i], size, prepared_bytes)

        def one(i: int) -> Any:
            if ready is not None and ready[i] is not None:
                return unpack(ready[i])
            return prepare(data[i])

        chunks = self.prefetcher.chunks(rows, charge, one, cfg.forward_batch_size)
        for chunk, prepared, failed in chunks:
            for i, exc in failed.items():
                reasons[i] = "bad_image"
                self.warn_once("bad_image", "%s: could not decode an image: %r", self.name, exc)
            done, bad = self.run_split(lambda sub: forward(sub, prepared), [i for i in chunk if i in prepared])
            results.update(done)
            reasons.update(bad)
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


def pretrained_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for every ``from_pretrained`` of ``cfg``'s model (in actors and CPU stages)."""
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if loading.kind_of(cfg.model) == "hub" and cfg.revision:
        kw["revision"] = cfg.revision
    return kw


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


def longest_first(rows: Sequence[int], texts: Sequence[str | None]) -> list[int]:
    """``rows`` ordered by the length of their text, longest first (ties keep their order).

    Forward chunks are consecutive runs of the rows an operator is given, and a chunk of texts is
    padded to its longest one; web alt-texts run from one word to a paragraph, so in input order
    nearly every chunk pads to a long caption. In this order each chunk holds texts of similar
    length. Results are keyed by row, so only which rows share a chunk changes. Characters stand
    in for tokens (no second tokenisation); longest first, as sentence-transformers orders its
    batches, puts the chunk that needs the most memory first, so an out-of-memory shows at once.
    """
    return sorted(rows, key=lambda i: -len(texts[i] or ""))


def alike_shapes_together(rows: Sequence[int], data: Sequence[bytes | None]) -> list[int]:
    """``rows`` ordered so that images of alike shape are neighbours: by aspect ratio (classes a
    quarter octave wide), then area, largest first; from the image headers alone.

    For VLM processors whose prompt length follows the image's shape (tiles by aspect ratio,
    tokens by area), so a forward chunk of consecutive rows pads its prompts little. Results are
    keyed by row; bytes without a readable header go last, where they fail as before.
    """
    from operators.image.pixels import probe_upright

    def key(i: int) -> tuple[int, int, int]:
        try:
            w, h = probe_upright(data[i])
        except Exception:  # noqa: BLE001 - undecodable: prepared (and rejected) as any other row
            return (1, 0, 0)
        return (0, round(4 * math.log2(w / h)), -w * h)

    return sorted(rows, key=key)


def image_bytes(batch: pa.Table, column: str = "image") -> list[bytes | None]:
    """The encoded image of every row (``image.bytes`` of the HF Image struct, or a binary column)."""
    col = batch[column].combine_chunks()
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    return col.to_pylist()


def pixel_charge(data: bytes | None, size: Any, prepared_bytes: int) -> int:
    """Bytes a row will hold while waiting for the model: its decoded RGB (at the scale
    ``decode_rgb`` will decode it for ``size``) plus ``prepared_bytes`` of model input."""
    from operators.image.pixels import REDUCING_GAP, needed_scale, probe

    try:
        w, h, fmt = probe(data)
    except Exception:  # noqa: BLE001 - undecodable: it fails fast in prepare and holds nothing
        return prepared_bytes
    scale = needed_scale(size, w, h) if size is not None else None
    if scale is not None and scale * REDUCING_GAP < 1 and fmt == "JPEG":
        # libjpeg scales by 1/2, 1/4 or 1/8: the smallest of those still at least the draft target
        s = scale * REDUCING_GAP
        factor = max((f for f in (1, 2, 4, 8) if 1 / f >= s), default=1)
        w, h = -(-w // factor), -(-h // factor)
    return w * h * 3 + prepared_bytes


def image_size_of(processor: Any) -> Any:
    """The ``size`` an HF image processor (or a processor holding one) resizes to, or None."""
    inner = getattr(processor, "image_processor", processor)
    return getattr(inner, "size", None)


def processor_backend() -> str:
    """``torchvision`` when installed, else ``pil``: asking explicitly avoids transformers'
    "requires torchvision, falling back" warning on every actor of a CPU-only install."""
    import importlib.util

    return "torchvision" if importlib.util.find_spec("torchvision") else "pil"


def quiet_hf_progress_bars() -> None:
    """Turn off the HF libraries' progress bars in this process ("Loading weights", "Writing model
    shards", hub downloads). Every model actor would print its own, which Ray forwards to the
    run's terminal between the run's own log lines. ``HF_HUB_DISABLE_PROGRESS_BARS=0`` set by
    the user still wins (huggingface_hub gives the environment priority)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # imported already, so it read the hub's setting before this call
        hf_logging.disable_progress_bar()


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
