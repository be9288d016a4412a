"""Images/s per GPU of the clip operator with a real-size architecture (issue 8 item 2).

CLIP ViT-L/14 geometry with random weights (``jobs.tiny_models.build_clip_geometry``), float16,
on photo-sized JPEGs: the operator decodes (draft mode) and preprocesses on its threads while
the GPU runs the previous chunk. Prints the operator's images/s, the bare forward's images/s on
already-preprocessed tensors, and their ratio; asserts only sanity (non-zero, finite outputs),
since speed is measured, not asserted. Skipped without a GPU.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pyarrow as pa
import pytest

from ground.schema import IMAGE_TYPE
from jobs.tiny_models import build_clip_geometry
from operators.models.base import read_embeddings
from operators.models.clip import ClipConfig, ClipEmbedder

pytestmark = pytest.mark.gpu

# A web-scale mix is mostly 300..1000 px JPEGs; 640x480 is a typical one.
PHOTO_SIZE = (640, 480)
ROWS = 2048
FORWARD_BATCH = 256


def photo_batch(n: int) -> pa.Table:
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for k in range(16):  # 16 distinct photos, repeated: decode cost is what matters, not variety
        arr = (rng.random((PHOTO_SIZE[1] // 8, PHOTO_SIZE[0] // 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize(PHOTO_SIZE, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return pa.table({"key": [f"k{i}" for i in range(n)],
                     "image": pa.array([{"bytes": blobs[i % 16], "path": None} for i in range(n)], type=IMAGE_TYPE),
                     "text": [f"a photo number {i}" for i in range(n)],
                     "reject_reason": pa.array([None] * n, type=pa.string())})


def test_clip_l14_images_per_second_on_one_gpu(tmp_path):
    import torch

    model = build_clip_geometry(tmp_path / "clip_l14", "l14")
    cpus = os.cpu_count() or 1  # what the planner would give one actor per GPU is 0.75 of this
    op = ClipEmbedder(ClipConfig(model=str(model), dtype="float16", forward_batch_size=FORWARD_BATCH,
                                 resources={"num_gpus": 1, "num_cpus": cpus}))
    assert op.device == "cuda"
    batch = photo_batch(ROWS)
    op(batch.slice(0, FORWARD_BATCH))  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = op(batch)
    torch.cuda.synchronize()
    operator_rate = ROWS / (time.perf_counter() - started)

    px = torch.randn(FORWARD_BATCH, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        op.model.get_image_features(pixel_values=px)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(ROWS // FORWARD_BATCH):
            op.model.get_image_features(pixel_values=px)
        torch.cuda.synchronize()
    bare_rate = ROWS / (time.perf_counter() - started)
    print(f"\nCLIP ViT-L/14 fp16, {cpus} CPUs, forward batch {FORWARD_BATCH}: operator {operator_rate:.0f} img/s "
          f"(decode + preprocess + image and text forward), bare image forward {bare_rate:.0f} img/s, "
          f"ratio {operator_rate / bare_rate:.2f}")

    # what the decode threads alone deliver (no model), to tell a CPU-bound run from a GPU-bound one
    from operators.models.base import image_bytes, pixel_charge

    data = image_bytes(batch)
    started = time.perf_counter()
    for _ in op.prefetcher.chunks(range(ROWS), lambda i: pixel_charge(data[i], op.image_size, op.input_bytes),
                                  lambda i: op.prepare(data[i]), FORWARD_BATCH):
        pass
    prepare_rate = ROWS / (time.perf_counter() - started)
    print(f"decode + preprocess alone on {op.prefetcher.workers} threads: {prepare_rate:.0f} img/s")

    emb, valid = read_embeddings(out["clip_image_embedding"])
    assert valid.all() and np.isfinite(emb).all()
    assert np.isfinite(np.asarray(out["clip_score"].to_pylist(), dtype=np.float32)).all()
    assert operator_rate > 0 and bare_rate > 0
