"""Default config vs the bare single-process loop, on CPU (issue 8 item 1).

A script, not a test. Builds a CLIP with ViT-B/32 geometry and random weights
(``jobs.tiny_models.build_clip_geometry``), writes clean WebDataset shards, then times whole
processes, interleaved (A B A B ...):

* A, the bare loop (``benchmarks/common.py``): tar -> Pillow -> CLIPProcessor -> image + text
  forward, batch 32, 2 torch threads -> Parquet;
* B, ``mmcurate run`` with ``operators: [decode, clip]`` and every resource at its default.

It prints every time, the throughput ratio bare/pipeline of each pair and of the medians, and a
steady-state ratio from a 1-shard and an N-shard run of each (the difference cancels the fixed
cost of start-up and model load). Targets: >= 0.9 end to end with >= 2,048 rows, >= 0.95 steady.

    python benchmarks/bench_cpu_default.py                      # 8 shards x 256 rows, 2 pairs
    python benchmarks/bench_cpu_default.py --shards 2 --per-shard 16 --pairs 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import bare_cmd, make_shards, pipeline_cmd, ratio_line, timed_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=2, help="interleaved bare/pipeline pairs")
    ap.add_argument("--work", type=Path, default=None, help="folder to keep shards/models in (default: temp)")
    args = ap.parse_args()

    from jobs.tiny_models import build_clip_geometry

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_cpu_default_"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "clip_b32"
    if not (model / "config.json").exists():
        build_clip_geometry(model, "b32")
    shards = make_shards(work / "shards", args.shards, args.per_shard)
    rows = args.shards * args.per_shard
    print(f"{rows} rows in {args.shards} shards; CLIP ViT-B/32 geometry, random weights")

    bare_t, pipe_t = [], []
    for k in range(args.pairs):
        bare_t.append(timed_run(bare_cmd(str(model), shards, work / "bare" / str(k))))
        pipe_t.append(timed_run(pipeline_cmd(work, "default", shards, str(model), ["decode", "clip"])))
        print(ratio_line(f"pair {k + 1}", bare_t[-1], pipe_t[-1]), flush=True)
    print(ratio_line("median", statistics.median(bare_t), statistics.median(pipe_t)))

    # steady state: the extra shards of an N-shard run over a 1-shard run, for both
    b1 = timed_run(bare_cmd(str(model), shards[:1], work / "bare" / "one"))
    p1 = timed_run(pipeline_cmd(work, "default1", shards[:1], str(model), ["decode", "clip"]))
    bn = statistics.median(bare_t)
    pn = statistics.median(pipe_t)
    extra = rows - args.per_shard
    print(f"one shard: bare {b1:.1f}s  pipeline {p1:.1f}s")
    if pn > p1 and bn > b1:
        print(f"steady state over {extra} rows: bare {extra / (bn - b1):.1f} rows/s  "
              f"pipeline {extra / (pn - p1):.1f} rows/s  ratio {(bn - b1) / (pn - p1):.3f}")
    else:
        print("steady state: not measurable at this size (N-shard run not slower than 1-shard run)")


if __name__ == "__main__":
    main()
