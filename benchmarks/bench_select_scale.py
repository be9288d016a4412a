"""Select at scale on one machine: >= 200k synthetic annotated rows through rules, an exact top
fraction, exact, pHash and semantic dedup; prints rows/s and peak memory of the driver and of
the whole process tree (driver + raylet + Ray workers, summed PSS sampled every 0.5 s).

The input is written directly as phase-1 output (no images: keys, sha256, phash, clip_score,
text_lang, a 32-d float16 embedding) with planted duplicates: 5 % byte copies, 5 % pHash
neighbours (1-3 bits flipped), 2 % embedding neighbours.

    python benchmarks/bench_select_scale.py [--rows 200000] [--files 20] [--workdir DIR]

On the shared 2-core development machine timings are noisy; compare figures within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EMBED_DIM = 32
# Planted duplicate rates: enough pairs that every dedup stage does real work.
EXACT_RATE, PHASH_RATE, SEMANTIC_RATE = 0.05, 0.05, 0.02
WINDOW_FLIPS = 4


def synthetic_table(rows: int, seed: int, offset: int) -> pa.Table:
    from ground.schema import IMAGE_TYPE

    rng = np.random.default_rng(seed)
    ids = np.arange(offset, offset + rows)
    sha = np.array([hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in ids], dtype=object)
    phash = rng.integers(-2**63, 2**63 - 1, size=rows, dtype=np.int64)
    emb = rng.normal(size=(rows, EMBED_DIM)).astype(np.float32)
    n_exact, n_phash, n_sem = int(rows * EXACT_RATE), int(rows * PHASH_RATE), int(rows * SEMANTIC_RATE)
    src = rng.integers(0, rows, size=n_exact + n_phash + n_sem)
    dst = rng.permutation(rows)[: len(src)]
    a, b, c = dst[:n_exact], dst[n_exact:n_exact + n_phash], dst[n_exact + n_phash:]
    sha[a] = sha[src[:n_exact]]
    flips = (np.int64(1) << rng.integers(0, 63, size=n_phash).astype(np.int64))
    phash[b] = phash[src[n_exact:n_exact + n_phash]] ^ flips
    emb[c] = emb[src[n_exact + n_phash:]] + rng.normal(scale=0.01, size=(n_sem, EMBED_DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    langs = np.array(["en", "de", "fr", "es"])[rng.integers(0, 4, size=rows)]
    # Window hashes as decode makes them: each a few bits from its row's full hash (a picture's
    # 96 % sub-windows hash close to the whole), so they land in the same LSH buckets as it does.
    flips = rng.integers(0, 64, size=(rows, 9, WINDOW_FLIPS)).astype(np.int64)
    masks = np.bitwise_or.reduce(np.int64(1) << flips, axis=2)
    windows = (phash[:, None] ^ masks).reshape(-1)
    return pa.table({
        "key": pa.array([f"k{i:09d}" for i in ids]),
        "source_shard": pa.array([f"s3://synthetic/{seed}.tar"] * rows),
        "image": pa.nulls(rows, IMAGE_TYPE),
        "text": pa.array([f"caption {i}" for i in ids]),
        "sha256": pa.array(sha, pa.string()),
        "reject_reason": pa.nulls(rows, pa.string()),
        "width": pa.array(rng.integers(64, 1024, size=rows).astype(np.int32)),
        "height": pa.array(rng.integers(64, 1024, size=rows).astype(np.int32)),
        "phash": pa.array(phash),
        "phash_windows": pa.FixedSizeListArray.from_arrays(pa.array(windows), 9),
        "clip_score": pa.array(rng.uniform(0.1, 0.45, size=rows).astype(np.float32)),
        "text_lang": pa.array(langs),
        "clip_image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).reshape(-1)),
                                                                  EMBED_DIM),
    })


def write_input(out: Path, rows: int, files: int) -> None:
    import pyarrow.parquet as pq

    from ground.layout import DATA, LEDGER, shard_tag
    from ground.schema import output_schema
    from pipelines.ledger import Ledger

    ledger = Ledger(str(out))
    (out / DATA).mkdir(parents=True, exist_ok=True)
    per = rows // files
    for i in range(files):
        shard = f"s3://synthetic/shard-{i:05d}.tar"
        t = synthetic_table(per, seed=i, offset=i * per)
        # Cross-file duplicates: every file but the first copies some sha256 of the previous one.
        tag = shard_tag(shard)
        schema = output_schema(t.schema, {"pipeline": "synthetic"})
        pq.write_table(t.select(schema.names).cast(schema), out / DATA / f"{tag}-00000.parquet")
        ledger.write_json(f"{LEDGER}/{tag}.json", {"shard": shard, "tag": tag, "rows_in": per, "kept": per,
                                                   "rejected": 0, "files": {"data": [f"{tag}-00000.parquet"],
                                                                            "rejected": []}})


class PeakSampler(threading.Thread):
    """Samples the driver's RSS and the process tree's summed PSS every 0.5 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.me = psutil.Process()
        self.driver_peak = 0
        self.tree_peak = 0
        self.stop = threading.Event()

    def _tree(self) -> int:
        total = 0
        procs = [self.me] + self.me.children(recursive=True)
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def run(self) -> None:
        while not self.stop.is_set():
            self.driver_peak = max(self.driver_peak, self.me.memory_info().rss)
            self.tree_peak = max(self.tree_peak, self._tree())
            self.stop.wait(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--phash-k", type=int, default=6, help="pHash max_distance (shipped default 6)")
    ap.add_argument("--no-windows", action="store_true", help="match full hashes only (phash.windows: false)")
    args = ap.parse_args()

    import ray

    from pipelines.select.config import SelectConfig
    from pipelines.select.runner import select

    work = args.workdir or Path(tempfile.mkdtemp(prefix="select-scale-"))
    t0 = time.time()
    write_input(work / "out", args.rows, args.files)
    print(f"wrote {args.rows} synthetic rows in {args.files} files in {time.time() - t0:.1f}s under {work}")
    sampler = PeakSampler()
    sampler.start()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cfg = SelectConfig.model_validate({
        "rules": ["clip_score >= 0.12", "text_lang in [en, de, fr]",
                  {"top_fraction": {"column": "clip_score", "fraction": 0.9, "by": "text_lang"}}],
        "dedup": [{"exact": {}}, {"phash": {"max_distance": args.phash_k, "windows": not args.no_windows}},
                  {"semantic": {"column": "clip_image_embedding", "eps": 0.01, "clusters": 32, "sample_rows": 20000}}],
        "survivor_order": ["-clip_score", "-pixels"]})
    t1 = time.time()
    summary = select(cfg, str(work / "out"), str(work / "curated"))
    elapsed = time.time() - t1
    sampler.stop.set()
    sampler.join()
    print(f"pHash max_distance {args.phash_k}, window hashes {'off' if args.no_windows else 'on'}")
    print(f"select: {summary.rows_in} rows in {elapsed:.1f}s = {summary.rows_in / elapsed:.0f} rows/s "
          f"(2 shared cores; noisy)")
    print(f"kept {summary.kept}, rejected {summary.rejected}: {dict(summary.rejected_by_reason)}")
    print(f"peak memory: driver RSS {sampler.driver_peak / 2**20:.0f} MiB, process tree PSS "
          f"{sampler.tree_peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
