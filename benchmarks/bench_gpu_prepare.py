"""clip on a GPU node: decode in the actor's threads (``prepare_in: actor``) or in a CPU task stage
(``prepare_in: tasks``, the default with a GPU)? Issue 8 item 2.

A script, not a test. Whole ``mmcurate run`` processes on photo-sized JPEGs (640x480), ``operators:
[clip]`` with CLIP ViT-L/14 geometry (random weights), float16, ``num_gpus: 1``, forward chunks of
256, every other resource at its default; the two modes interleaved, each as a short run (one
shard) and a long run (``--shards``), so the steady-state rows/s, ``(rows_long - rows_short) /
(t_long - t_short)``, leaves out Ray's start and the model load. With CUDA it also prints the bare
image forward on ready tensors (what the GPU could do) and each mode's ratio to it.

    python benchmarks/bench_gpu_prepare.py                       # on the GPU node: 32 shards x 512
    python benchmarks/bench_gpu_prepare.py --shards 3 --per-shard 32 --layers 1 --width 32   # CPU smoke
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import pipeline_cmd, timed_run  # noqa: E402

PHOTO_SIZE = (640, 480)


def photo_shards(out: Path, n_shards: int, per_shard: int) -> list[Path]:
    """Tar shards of 640x480 JPEGs (16 distinct smooth random photos, repeated) with captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = []
    for _ in range(16):
        small = (rng.random((PHOTO_SIZE[1] // 8, PHOTO_SIZE[0] // 8, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize(PHOTO_SIZE, Image.BICUBIC).save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = out / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:05d}"
                for name, data in ((f"{key}.jpg", photos[(s + i) % 16]), (f"{key}.txt", b"a photo of something")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def bare_forward(model: Path, batch: int = 256, rounds: int = 8) -> float:
    """Images/s of the image tower alone on ready float16 tensors on the GPU."""
    import torch
    from transformers import CLIPModel

    m = CLIPModel.from_pretrained(model, dtype=torch.float16).cuda().eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        m.get_image_features(pixel_values=x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(rounds):
            m.get_image_features(pixel_values=x)
        torch.cuda.synchronize()
    return batch * rounds / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 16k rows: at ~2,000 img/s the long run's work is still several times the short run's noise
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both modes")
    ap.add_argument("--geometry", default="l14", choices=["b32", "l14"])
    ap.add_argument("--layers", type=int, default=None, help="cut both towers (CPU smoke runs)")
    ap.add_argument("--width", type=int, default=None, help="narrow both towers (CPU smoke runs)")
    ap.add_argument("--chunk", type=int, default=256, help="forward_batch_size")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (shards, model, outputs)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-prepare-"))
    try:
        measure(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    import torch

    from jobs.tiny_models import build_clip_geometry

    cuda = torch.cuda.is_available()
    model = build_clip_geometry(work / "model", args.geometry, layers=args.layers, width=args.width)
    shards = photo_shards(work / "shards", args.shards, args.per_shard)
    print(f"{'CUDA ' + torch.cuda.get_device_name() if cuda else 'no GPU (CPU smoke run)'}; "
          f"{args.shards} shards x {args.per_shard} 640x480 JPEGs; clip {args.geometry}"
          f"{f' layers={args.layers}' if args.layers else ''}{f' width={args.width}' if args.width else ''}; "
          f"work folder {work}{' (kept)' if args.keep else ''}", flush=True)
    extra = {"forward_batch_size": args.chunk, "dtype": "float16" if cuda else "float32",
             "resources": {"num_gpus": 1} if cuda else {}}
    rates: dict[str, list[float]] = {"actor": [], "tasks": []}
    for r in range(args.rounds):
        for mode in ("actor", "tasks"):
            clip = {**extra, "prepare_in": mode}
            short = timed_run(pipeline_cmd(work, f"{mode}-short", shards[:1], str(model), ["clip"], clip))
            long = timed_run(pipeline_cmd(work, f"{mode}-long", shards, str(model), ["clip"], clip))
            shutil.rmtree(work / "out", ignore_errors=True)  # the outputs hold every image again
            rows = (len(shards) - 1) * args.per_shard
            rate = rows / (long - short) if long > short else float("nan")
            rates[mode].append(rate)
            print(f"round {r + 1} prepare_in={mode:<5}: 1 shard {short:.1f}s, {len(shards)} shards {long:.1f}s, "
                  f"steady state {rate:.0f} rows/s", flush=True)
            if long - short < 0.25 * long:
                print("  (the long run is barely longer than the short one: its difference is mostly noise; "
                      "raise --shards or --per-shard)", flush=True)
    mean = {m: sum(v) / len(v) for m, v in rates.items()}
    print(f"steady state, mean of {args.rounds}: actor {mean['actor']:.0f} rows/s, tasks {mean['tasks']:.0f} rows/s, "
          f"tasks/actor {mean['tasks'] / mean['actor']:.2f}")
    if cuda:
        gpu = bare_forward(model, args.chunk)
        print(f"bare image forward on ready tensors: {gpu:.0f} img/s; ratio to it: actor {mean['actor'] / gpu:.2f}, "
              f"tasks {mean['tasks'] / gpu:.2f}")


if __name__ == "__main__":
    main()
