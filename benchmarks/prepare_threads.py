"""How decode + preprocess scales over threads in one process, per image-processor backend.

A script, not a test: prints images/s for 1 and N threads of (decode only) and (decode + the
CLIP image processor, per image), for the ``pil`` and (when installed) ``torchvision`` backends.
Tells whether a model actor's prepare threads are held back by the GIL.

    python benchmarks/prepare_threads.py [--threads 16] [--images 512]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--images", type=int, default=512)
    args = ap.parse_args()
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPImageProcessor

    from operators.image.pixels import decode_rgb

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        img = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((640, 480), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    work = [blobs[i % 16] for i in range(args.images)]
    folder = Path("/tmp/prepare_threads_proc")
    CLIPImageProcessor().save_pretrained(folder) if importlib.util.find_spec("torchvision") else None
    backends = ["pil"] + (["torchvision"] if importlib.util.find_spec("torchvision") else [])
    if not (folder / "preprocessor_config.json").exists():
        from jobs.tiny_models import image_processor_class

        image_processor_class("CLIPImageProcessor")().save_pretrained(folder)
    for label, fn in [("decode", lambda b: decode_rgb(b, {"shortest_edge": 224}))] + [
            (f"decode+{be}", (lambda p: lambda b: p(images=[decode_rgb(b, p.size)], return_tensors="np"))(
                AutoImageProcessor.from_pretrained(folder, backend=be))) for be in backends]:
        for n in (1, args.threads):
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(fn, work[:32]))
                t = time.perf_counter()
                list(pool.map(fn, work))
                print(f"{label:<22} {n:>3} threads: {len(work) / (time.perf_counter() - t):8.0f} img/s", flush=True)


if __name__ == "__main__":
    main()
