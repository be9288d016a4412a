"""CLIP / SigLIP image and text embeddings and their similarity."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.base import Operator, Resources, pending_mask, register, with_rejects
from operators.models import loading
from operators.models.base import (ModelConfig, ModelOperator, embedding_array, image_bytes, image_size_of,
                                   longest_first, pending_rows, pretrained_kwargs, processor_backend)

logger = logging.getLogger(__name__)

# Text towers that pool the last position were trained on text padded to the full length;
# right-padding to the longest caption in the batch would change their embeddings.
PAD_TO_MAX_LENGTH = ("siglip", "siglip2")


class ClipConfig(ModelConfig):
    prefix: str = Field("clip", pattern=r"^[a-z][a-z0-9_]*$",
                        description="output column prefix; two CLIP models in one pipeline need two prefixes")
    text_column: str = Field("text", description="caption to embed; rows with null/empty text get no text embedding")
    prepare_in: Literal["auto", "actor", "tasks"] = Field(
        "auto", description="where images are decoded and resized: on the model actor's threads, or in a CPU "
                            "task stage spread over the node's cores (auto: tasks when the actor has a GPU)")

    @property
    def prepares_in_tasks(self) -> bool:
        """True when a CPU task stage (:class:`ClipPrepare`) decodes and resizes ahead of the actor."""
        if self.prepare_in == "auto":
            return self.resources.num_gpus > 0 and self.device != "cpu"
        return self.prepare_in == "tasks"


class PlainRecipe:
    """The CLIP/SigLIP image recipe (resize, optional centre crop, rescale, normalise) split in two:
    Pillow resize + crop to uint8 per image on a decode thread, then rescale + normalise of a whole
    chunk on the model's device. Matches the processor's pixel_values within resampling rounding.
    """

    def __init__(self, processor: Any):
        size, crop = processor.size, getattr(processor, "crop_size", None)
        self.shortest_edge = getattr(size, "shortest_edge", None)
        self.exact = (size.height, size.width) if self.shortest_edge is None else None
        self.crop = (crop.height, crop.width) if getattr(processor, "do_center_crop", False) else None
        self.resample = int(getattr(processor, "resample", 3))
        self.scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        self.mean = list(processor.image_mean) if processor.do_normalize else [0.0, 0.0, 0.0]
        self.std = list(processor.image_std) if processor.do_normalize else [1.0, 1.0, 1.0]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"the image processor's image_mean and image_std must have 3 values (RGB), "
                             f"got {self.mean} and {self.std}")

    @classmethod
    def of(cls, processor: Any) -> "PlainRecipe | None":
        """The recipe of ``processor``, or None when it does anything else (padding, tiling, ...)."""
        size = getattr(processor, "size", None)
        known = {"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "resample", "size",
                 "crop_size", "rescale_factor", "image_mean", "image_std", "processor_class", "image_processor_type",
                 "default_to_square", "data_format", "input_data_format", "device", "return_tensors",
                 "disable_grouping", "do_pad", "pad_size", "backend", "image_seq_length"}
        extra = [k for k, v in vars(processor).items() if not k.startswith("_") and k not in known and v]
        if (size is None or not getattr(processor, "do_resize", False) or getattr(processor, "do_pad", False)
                or extra or not (getattr(size, "shortest_edge", None)
                                 or (getattr(size, "height", None) and getattr(size, "width", None)))):
            return None
        return cls(processor)

    def pixels(self, image) -> np.ndarray:
        """Resized (and centre-cropped) uint8 pixels [H, W, 3] of an RGB PIL image."""
        w, h = image.size
        if self.shortest_edge is not None:
            s = self.shortest_edge
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        else:
            size = (self.exact[1], self.exact[0])
        image = image.resize(size, resample=self.resample)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (image.size[1] - ch) // 2, (image.size[0] - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only

    def normalize(self, pixels, dtype):
        """uint8 [n, H, W, 3] (a torch tensor on the model's device) -> normalised [n, 3, H, W] in ``dtype``."""
        import torch

        # (x * scale - mean) / std. The bytes are first reordered channels-first (a cheap uint8
        # copy), so the float conversion and the per-channel multiply-add each run over long
        # contiguous planes; broadcasting over a last dimension of 3 (channels last) defeats
        # vectorisation and took 1.5x as long on CPU. Contiguous channels-first is also the
        # layout the patch convolution expects.
        x = pixels.permute(0, 3, 1, 2).contiguous().to(torch.float32)
        for c, (mean, std) in enumerate(zip(self.mean, self.std)):
            x[:, c].mul_(self.scale / std).add_(-mean / std)
        return x.to(dtype)


class ImageInputs:
    """Encoded image -> CLIP/SigLIP model input, loadable without the model (the processor's
    config only), so the model actor and the CPU prepare stage (:class:`ClipPrepare`) share it.

    With a plain resize(+crop)/rescale/normalise processor (CLIP, SigLIP) the input is the
    resized and cropped uint8 pixels [H, W, 3], done in Pillow, which releases the GIL, so threads
    scale over cores; the model actor rescales and normalises whole chunks on its device
    (:meth:`PlainRecipe.normalize`). Otherwise it is the processor's float32 pixel_values [3, H, W].
    """

    def __init__(self, source: str, **pretrained_kwargs: Any):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(source, backend=processor_backend(), **pretrained_kwargs)
        self.size = image_size_of(self.processor)
        self.recipe = PlainRecipe.of(self.processor)

    def __call__(self, data: bytes) -> np.ndarray:
        from operators.image.pixels import decode_rgb

        image = decode_rgb(data, self.size)
        if self.recipe is not None:
            return self.recipe.pixels(image)
        return self.processor(images=[image], return_tensors="np")["pixel_values"][0]


def prepared_column(config: ClipConfig) -> str:
    """The column that carries rows prepared by :class:`ClipPrepare` to the model actor (dropped there)."""
    return f"_{config.prefix}_prepared"


def pack_array(a: np.ndarray) -> bytes:
    """One prepared row as bytes: a 16-byte header (four int32: element size 1 for uint8 or 4 for
    float32, then the 3 dimensions) followed by the C-order data."""
    if a.ndim != 3 or a.dtype not in (np.uint8, np.float32):
        raise ValueError(f"prepared input must be a 3-D uint8 or float32 array, got {a.dtype} {a.shape}")
    head = np.array([1 if a.dtype == np.uint8 else 4, *a.shape], dtype=np.int32)
    return head.tobytes() + np.ascontiguousarray(a).tobytes()


def unpack_array(b: bytes | pa.Buffer) -> np.ndarray:
    """Inverse of :func:`pack_array`: a read-only view of ``b``, no copy (the forward pass stacks
    its chunk into a new array anyway)."""
    kind, *shape = np.frombuffer(b, dtype=np.int32, count=4)
    return np.frombuffer(b, dtype=np.uint8 if kind == 1 else np.float32, offset=16).reshape(shape)


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
    images are decoded (JPEGs at reduced scale, no larger than the processor needs) and resized
    either in the actor on ``prepare_threads`` threads ahead of the forward pass, within
    ``max_inflight_pixels_mb``, or, with ``prepare_in: tasks`` (the default when the actor has a
    GPU), in the :class:`ClipPrepare` task stage the planner puts before it. Rows go to the
    model in chunks of ``forward_batch_size``, longest caption first when captions are padded to
    the chunk's longest (CLIP; SigLIP pads to full length and keeps the order).
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

    @classmethod
    def prepare_stage(cls, config: ClipConfig) -> type[Operator] | None:
        return ClipPrepare if config.prepares_in_tasks else None

    def __init__(self, config: ClipConfig):
        super().__init__(config)
        from transformers import AutoModel, AutoTokenizer

        self.model = self.place(AutoModel.from_pretrained(self.source, **self.model_kwargs()))
        self.prepare_image = ImageInputs(self.source, **self.pretrained_kwargs())
        self.image_processor = self.prepare_image.processor
        self.image_size = self.prepare_image.size
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **self.pretrained_kwargs())
        mcfg = self.model.config
        self.dim = int(getattr(mcfg, "projection_dim", None) or mcfg.vision_config.hidden_size)
        positions = int(mcfg.text_config.max_position_embeddings)
        self.max_tokens = min(positions, int(self.tokenizer.model_max_length or positions))
        self.padding = "max_length" if mcfg.model_type in PAD_TO_MAX_LENGTH else True
        side = int(getattr(mcfg.vision_config, "image_size", 224))
        self.recipe = self.prepare_image.recipe
        # one prepared row: uint8 pixels with the plain recipe, else float32 pixel_values
        self.input_bytes = 3 * side * side * (1 if self.recipe is not None else 4)
        self.prepared_column = prepared_column(config)

    def prepare(self, data: bytes) -> np.ndarray:
        """One row's encoded image -> model input (on a decode thread; see :class:`ImageInputs`)."""
        return self.prepare_image(data)

    def embed_images(self, images: list) -> np.ndarray:
        """L2-normalised float32 image embeddings [n, D] of PIL images."""
        return self.embed_pixels(self.image_processor(images=images, return_tensors="np")["pixel_values"])

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised float32 image embeddings [n, D] of preprocessed pixel_values [n, 3, H, W]."""
        torch = self.torch
        px = torch.from_numpy(np.ascontiguousarray(pixels))
        if px.dtype == torch.uint8:  # uint8 [n, H, W, 3] from the plain recipe
            px = self.recipe.normalize(px.to(self.device, non_blocking=True), self.dtype)
        with torch.inference_mode():
            feats = _features(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
            return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings [n, D] (truncated to the model's context)."""
        torch = self.torch
        enc = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        self.count_tokens(enc, self.tokenizer.pad_token_id)
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

        ready = None
        if self.prepared_column in batch.column_names:
            # decoded and resized by the ClipPrepare task stage: only unpacking is left here, from
            # views of the Arrow buffers (to_pylist would copy every row into a bytes object)
            ready = [v.as_buffer() if v.is_valid else None for v in batch[self.prepared_column].combine_chunks()]
            batch = batch.drop_columns([self.prepared_column])
        if self.padding is True:  # texts padded to the chunk's longest: chunks of similar lengths
            rows = longest_first(rows, texts)
        results, reasons = self.run_chunks(batch, rows, self.prepare, forward, size=self.image_size,
                                           prepared_bytes=self.input_bytes, ready=ready, unpack=unpack_array)
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


class ClipPrepare(Operator):
    """The CPU stage of ``clip`` with ``prepare_in: tasks``: decodes and resizes each pending row's
    image to the model's input (:class:`ImageInputs`) in a Ray task, so the work spreads over every
    core of the node (separate processes: no shared GIL), and hands it to the model actor in
    ``_<prefix>_prepared`` (uint8 [H, W, 3] for CLIP/SigLIP, a quarter of float32's bytes). The
    actor then only normalises on its device and runs the forward pass.

    Not a YAML operator: the planner puts it before a ``clip`` step whose config asks for it
    (:attr:`ClipConfig.prepares_in_tasks`). It loads the image processor's config, never the
    weights (an object-storage model is staged without them). Failure behaviour: undecodable bytes
    ``<prefix>:bad_image``, the reason the actor would give.
    """

    name = "clip_prepare"
    Config = ClipConfig
    cpu_bound = True

    def __init__(self, config: ClipConfig):
        super().__init__(config)
        source = loading.resolve_local(config.model, config.storage_options, files=loading.PROCESSOR_FILES)
        self.prepare_image = ImageInputs(source, **pretrained_kwargs(config))
        self.column = prepared_column(config)
        self._warned = False

    @classmethod
    def resources(cls, config: ClipConfig) -> Resources:
        # a task pool on the model's batches; num_cpus derived from the node (cpu_bound: one CPU)
        return Resources(batch_size=config.resources.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pending = pending_mask(batch)
        data = image_bytes(batch)
        out: list[bytes | None] = [None] * batch.num_rows
        reasons: list[str | None] = [None] * batch.num_rows
        for i in np.flatnonzero(pending):
            try:
                pixels = self.prepare_image(data[i])
            except Exception as exc:  # noqa: BLE001 - one row's bad bytes are that row's problem
                reasons[i] = f"{self.config.prefix}:bad_image"
                if not self._warned:  # once per process, as the actor does
                    self._warned = True
                    logger.warning("%s: could not decode an image: %r", self.name, exc)
                continue
            # an input the actor cannot take is the processor's fault, not the row's: raised
            out[i] = pack_array(pixels)
        batch = batch.append_column(self.column, pa.array(out, type=pa.large_binary()))
        return with_rejects(batch, reasons) if any(reasons) else batch

