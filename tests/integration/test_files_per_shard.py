"""Few, large files: 10,000-row shards arriving in many blocks end as a handful of Parquet files.

A real run on the session's local Ray: WebDataset shards -> file_bytes -> writer ->
commit (merge as a Ray task). Small write batches make each shard arrive as dozens of parts.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ground.layout import shard_tag
from jobs.sample_data import write_tar
from operators.writers.parquet import ROW_GROUP_MAX_ROWS
from pipelines.runner import run
from tests.helpers import ledger_records, make_config

ROWS_PER_SHARD = 10_000
N_SHARDS = 2
WRITE_BATCH_ROWS = 200
TARGET_MB = 8.0
# What is under test is the writer and the commit, so the operator is a cheap one that needs no
# decode: the 12x12 PNG icons (~100 bytes) are rejected by size, the 1.9 KB JPEGs kept.
OPERATORS = [{"file_bytes": {"min": 500}}]


def _jpeg(rng: np.random.Generator) -> bytes:
    """A distinct 48x48 JPEG of noise (~1.9 KB): distinct, so Parquet cannot dictionary-encode it away."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def _make_shards(folder: Path) -> list[Path]:
    """Shards of ROWS_PER_SHARD samples; every 7th is a 12x12 icon that file_bytes rejects."""
    rng = np.random.default_rng(3)
    icon = io.BytesIO()
    Image.new("RGB", (12, 12), (200, 10, 10)).save(icon, "PNG")
    folder.mkdir(parents=True)
    paths = []
    for s in range(N_SHARDS):
        members = []
        for i in range(ROWS_PER_SHARD):
            key = f"{s:02d}{i:06d}"
            image = (f"{key}.png", icon.getvalue()) if i % 7 == 6 else (f"{key}.jpg", _jpeg(rng))
            members += [image, (f"{key}.txt", f"sample {i}".encode())]
        path = folder / f"{s:05d}.tar"
        write_tar(path, members)
        paths.append(path)
    return paths


def test_ten_thousand_row_shards_end_as_few_large_files_per_kind(ray_session, tmp_path):
    shards = _make_shards(tmp_path / "shards")
    out = tmp_path / "out"
    cfg = make_config([str(tmp_path / "shards" / "*.tar")], str(out), operators=OPERATORS, block_rows=1000)
    cfg.output.write_batch_rows = WRITE_BATCH_ROWS
    cfg.output.target_file_size_mb = TARGET_MB
    summary = run(cfg)
    assert summary.shards_committed == N_SHARDS

    fs = fsspec.filesystem("file")
    records = {r["shard"]: r for r in ledger_records(fs, str(out))}
    rejected_per_shard = sum(1 for i in range(ROWS_PER_SHARD) if i % 7 == 6)
    target = TARGET_MB * 1024 * 1024
    for shard in shards:
        rec = records[str(shard)]
        assert (rec["rows_in"], rec["kept"], rec["rejected"]) == (
            ROWS_PER_SHARD, ROWS_PER_SHARD - rejected_per_shard, rejected_per_shard)
        for kind, expected_rows in (("data", rec["kept"]), ("rejected", rec["rejected"])):
            files = [out / kind / name for name in rec["files"][kind]]
            sizes = [f.stat().st_size for f in files]
            # The shard came as >= ROWS_PER_SHARD / WRITE_BATCH_ROWS parts per kind.
            assert 1 <= len(files) <= math.ceil(sum(sizes) / target) + 1, (kind, sizes)
            assert all(s >= target for s in sizes[:-1]), sizes
            rows = 0
            for f in files:
                meta = pq.read_metadata(f)  # a valid Parquet file: footer and row groups readable
                groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                assert max(groups) <= ROW_GROUP_MAX_ROWS
                # Row groups are gathered across parts, far larger than one writer batch.
                assert all(g > 2 * WRITE_BATCH_ROWS for g in groups[:-1]), groups
                rows += meta.num_rows
                keys = pq.read_table(f, columns=["key", "source_shard"])
                assert set(keys["source_shard"].to_pylist()) == {str(shard)}
            assert rows == expected_rows
        # data holds ~16 MB of images: more than one file at an 8 MB target, so rotation ran.
        assert len(rec["files"]["data"]) >= 2
    # Every row once, across both kinds; nothing left in staging; nothing published unnamed.
    all_keys = [k for kind in ("data", "rejected") for f in sorted((out / kind).glob("*.parquet"))
                for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
    assert len(all_keys) == len(set(all_keys)) == N_SHARDS * ROWS_PER_SHARD
    named = {n for r in records.values() for kind in ("data", "rejected") for n in r["files"][kind]}
    assert {p.name for kind in ("data", "rejected") for p in (out / kind).glob("*.parquet")} == named
    assert all(n.startswith(shard_tag(r["shard"])) for r in records.values() for n in r["files"]["data"])
    assert not list((out / "_mmcurate" / "staging").rglob("*.parquet"))
