"""Images/s of the clip operator on one GPU over a sweep of prepare threads (and GIL switch interval).

A script, not a test (needs CUDA). CLIP ViT-L/14 geometry, random weights, float16, 640x480
JPEGs, one operator call of ``--rows`` rows; prints one line per setting.

    python benchmarks/bench_gpu_clip.py --threads 4 8 16 --switch 0.005 0.0005
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--threads", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--switch", type=float, nargs="+", default=[0.005])
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    import torch

    from jobs.tiny_models import build_clip_geometry
    from operators.models.clip import ClipConfig, ClipEmbedder
    from tests.gpu.test_throughput_gpu import photo_batch

    model = build_clip_geometry(Path(tempfile.mkdtemp()) / "l14", "l14")
    batch = photo_batch(args.rows)
    for threads in args.threads:
        op = ClipEmbedder(ClipConfig(model=str(model), dtype="float16", forward_batch_size=args.chunk,
                                     prepare_threads=threads,
                                     resources={"num_gpus": 1, "num_cpus": os.cpu_count()}))
        op(batch.slice(0, args.chunk))
        for switch in args.switch:
            sys.setswitchinterval(switch)
            torch.cuda.synchronize()
            t = time.perf_counter()
            op(batch)
            torch.cuda.synchronize()
            print(f"threads {threads:>2} switch {switch:g}s: {args.rows / (time.perf_counter() - t):.0f} img/s",
                  flush=True)
        op.prefetcher.close()
    sys.setswitchinterval(0.005)


if __name__ == "__main__":
    main()
