"""What the image column's codec costs the writer: ``output.image_compression`` none vs zstd.

A script, not a test. Real shard rows (WebDataset shards of photo-like JPEGs and PNGs, read by
the real reader) go through the real write path of a run, in this process: the staging writer
writes one part per writer batch, then ``merge_shard_parts`` streams the parts into final files
(what every committed shard of a run costs when its parts are merged). The two settings are
measured interleaved, ``--reps`` times each; the script prints CPU seconds per 1,000 rows for
each, their ratio, and the bytes written (what zstd saves on already-compressed images).

    python benchmarks/bench_write_codecs.py                       # 2 shards x 256 rows, 5 reps
    python benchmarks/bench_write_codecs.py --shards 1 --per-shard 64 --reps 2   # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import make_shards


def write_shard(out: Path, blocks: list, shard: str, image_codec: str, batch_rows: int) -> tuple[float, int]:
    """CPU seconds to stage ``blocks`` of one shard and merge its parts; bytes of the final files."""
    from ground.layout import shard_tag
    from operators.writers.parquet import StagingParquetWriter, merge_shard_parts

    cfg = {"path": str(out), "storage_options": {}, "target_file_size_mb": 256, "compression": "zstd",
           "compression_level": 3, "image_compression": image_codec, "rejected_image_bytes": False}
    writer = StagingParquetWriter(cfg, "bench", {"pipeline": "bench"})
    started = time.process_time()
    parts = []
    for block in blocks:
        for start in range(0, block.num_rows, batch_rows):
            parts += [r["path"] for r in writer(block.slice(start, batch_rows)).to_pylist() if r["kind"] == "data"]
    files = merge_shard_parts(cfg, shard_tag(shard), "data", parts)
    took = time.process_time() - started
    return took, sum(f["bytes"] for f in files)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch-rows", type=int, default=64, help="rows per staged part (a writer batch)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from pipelines.plan import make_reader

    work = Path(tempfile.mkdtemp(prefix="bench_codecs_"))
    shards = [str(p) for p in make_shards(work / "shards", args.shards, args.per_shard)]
    reader = make_reader({"format": "webdataset", "paths": shards})
    blocks = {s: list(reader.read_blocks(s)) for s in shards}
    rows = sum(b.num_rows for bs in blocks.values() for b in bs)
    cpu: dict[str, list[float]] = {"none": [], "zstd": []}
    size: dict[str, int] = {}
    for rep in range(args.reps):
        for codec in ("none", "zstd") if rep % 2 == 0 else ("zstd", "none"):
            out = work / f"out-{codec}-{rep}"
            total, written = 0.0, 0
            for shard, bs in blocks.items():
                took, nbytes = write_shard(out, bs, shard, codec, args.batch_rows)
                total, written = total + took, written + nbytes
            cpu[codec].append(total)
            size[codec] = written
            shutil.rmtree(out)
    for codec, times in cpu.items():
        print(f"image_compression={codec}: {1000 * statistics.median(times) / rows:.2f} CPU-s per 1,000 rows "
              f"(median of {len(times)}: {', '.join(f'{t:.2f}' for t in times)} s for {rows} rows); "
              f"final files {size[codec] / 1e6:.2f} MB")
    print(f"ratio zstd / none (CPU): {statistics.median(cpu['zstd']) / statistics.median(cpu['none']):.2f}; "
          f"bytes saved by zstd: {100 * (1 - size['zstd'] / size['none']):.2f} %")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
