"""The commit path without Ray: the real staging writer, the real merge and the real Committer.

Merges run in-process here (``merge_runner=merge_shard_parts``): that replaces only the Ray task
that hosts the merge in a run; the merge, the ledger and the files are the real ones.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ground.errors import StorageError
from ground.layout import shard_tag
from ground.schema import IMAGE_TYPE, INTERNAL_FIELDS, MMCURATE_METADATA_KEY, READER_SCHEMA
from operators.writers.parquet import StagingParquetWriter, merge_shard_parts, parts_need_merge
from pipelines.commit import Committer
from pipelines.ledger import Ledger, ShardProgress

FILE_META = {"pipeline": "unit", "schema_version": 1}


def shard_batch(shard: str, start: int, n: int, total: int | None, image_bytes: int = 300,
                reject_every: int = 0) -> pa.Table:
    """Rows ``start..start+n`` of a shard as the reader + filters would hand them to the writer."""
    keys = [f"{start + i:06d}" for i in range(n)]
    reject = [("min_side:too_small" if reject_every and (start + i) % reject_every == 0 else None) for i in range(n)]
    images = [{"bytes": os.urandom(image_bytes), "path": f"{k}.jpg"} for k in keys]
    last = total is not None
    cols = {
        "key": pa.array(keys), "source_shard": pa.array([shard] * n), "image": pa.array(images, IMAGE_TYPE),
        "text": pa.array([f"caption {k}" for k in keys]), "meta": pa.array(["{}"] * n),
        "sha256": pa.array(["0" * 64] * n), "reject_reason": pa.array(reject, pa.string()),
        "_shard_rows": pa.array([total if last else None] * n, pa.int64()),
        "_shard_damage": pa.array([None] * n, pa.string()),
        "_shard_marker": pa.array([None] * n, pa.string()),
    }
    return pa.table(cols, schema=pa.schema(list(READER_SCHEMA) + INTERNAL_FIELDS))


def stage_shard(writer: StagingParquetWriter, shard: str, rows: int, batch_rows: int, **kw) -> ShardProgress:
    """Write a shard in many small writer batches (as many blocks would) and sum the records."""
    progress = ShardProgress(shard)
    for start in range(0, rows, batch_rows):
        n = min(batch_rows, rows - start)
        total = rows if start + n == rows else None
        for rec in writer(shard_batch(shard, start, n, total, **kw)).to_pylist():
            progress.add(rec)
    assert progress.complete
    return progress


def output_cfg(out: Path, target_mb: float = 256) -> dict:
    return {"path": str(out), "storage_options": {}, "target_file_size_mb": target_mb, "compression": "zstd",
            "compression_level": 3, "rejected_image_bytes": False}


def test_merge_streams_many_small_parts_into_few_files_with_full_row_groups(tmp_path):
    out = tmp_path / "out"
    cfg = output_cfg(out, target_mb=0.5)
    writer = StagingParquetWriter(cfg, "run1", FILE_META)
    shard = "/in/00000.tar"
    progress = stage_shard(writer, shard, rows=3000, batch_rows=100, image_bytes=500)
    parts = sorted(progress.files["data"])
    assert len(parts) == 30

    files = merge_shard_parts(cfg, shard_tag(shard), "data", parts, row_group_bytes=200_000, max_group_rows=250)

    total_bytes = sum(f["bytes"] for f in files)
    assert 1 < len(files) <= math.ceil(total_bytes / (0.5 * 1024 * 1024)) + 1
    rows_seen = []
    for f in files:
        pf = pq.ParquetFile(out / "data" / f["name"])
        assert pf.metadata.num_rows == f["rows"] and (out / "data" / f["name"]).stat().st_size == f["bytes"]
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        # Full groups everywhere but a file's tail (the parts had 100-row groups).
        assert all(g == 250 or g == groups[-1] for g in groups) and max(groups) == 250
        assert json.loads(pf.schema_arrow.metadata[MMCURATE_METADATA_KEY]) == FILE_META
        rows_seen += pf.read(columns=["key"])["key"].to_pylist()
    # Every file but the last reached the target: that is what bounds the file count.
    assert all(f["bytes"] >= 0.5 * 1024 * 1024 for f in files[:-1])
    staged_keys = [k for p in parts for k in pq.read_table(p, columns=["key"])["key"].to_pylist()]
    assert rows_seen == staged_keys and len(rows_seen) == 3000


def test_merge_sizes_row_groups_by_each_rows_bytes_so_one_large_photo_does_not_swell_a_group(tmp_path):
    # Mostly 1 KB images with a 150 KB one every 10th row: the batch average (~16 KB) would let
    # six rows into a 100 KB group, big one included. Groups are cut on each row's own bytes.
    out = tmp_path / "out"
    cfg = output_cfg(out, target_mb=0.4)
    writer = StagingParquetWriter(cfg, "run1", FILE_META)
    shard = "/in/00000.tar"
    progress = ShardProgress(shard)
    for start in range(0, 200, 50):
        batch = shard_batch(shard, start, 50, 200 if start == 150 else None)
        images = [{"bytes": os.urandom(150_000 if (start + i) % 10 == 3 else 1_000), "path": f"{start + i}.jpg"}
                  for i in range(50)]
        batch = batch.set_column(batch.schema.get_field_index("image"), "image", pa.array(images, IMAGE_TYPE))
        for rec in writer(batch).to_pylist():
            progress.add(rec)
    assert progress.complete
    group_bytes = 100_000
    files = merge_shard_parts(cfg, shard_tag(shard), "data", sorted(progress.files["data"]),
                              row_group_bytes=group_bytes)
    target = 0.4 * 1024 * 1024
    rows = 0
    for f in files:
        pf = pq.ParquetFile(out / "data" / f["name"])
        for g in range(pf.num_row_groups):
            images = pf.read_row_group(g, columns=["image"])["image"].to_pylist()
            sizes = [len(i["bytes"]) for i in images]
            rows += len(sizes)
            assert len(sizes) == 1 or sum(sizes) <= group_bytes, sizes
        # Over the target by at most one group: here a 150 KB photo plus its few small rows' share.
        assert f["bytes"] < target + 150_000 + 16 * 1024
    assert rows == 200 and all(f["bytes"] >= target for f in files[:-1])


def _codecs(path: Path) -> dict[str, tuple[str, bool]]:
    """Each leaf column's (codec, dictionary-encoded?) in a Parquet file's first row group."""
    group = pq.ParquetFile(path).metadata.row_group(0)
    out = {}
    for i in range(group.num_columns):
        col = group.column(i)
        out[col.path_in_schema] = (col.compression, any("DICTIONARY" in e for e in col.encodings))
    return out


@pytest.mark.parametrize("settings, image_codec, other_codec", [
    ({}, "UNCOMPRESSED", "ZSTD"),  # the defaults: output.compression zstd, image_compression none
    ({"image_compression": "zstd"}, "ZSTD", "ZSTD"),
    ({"compression": "snappy", "compression_level": None}, "UNCOMPRESSED", "SNAPPY"),
    ({"compression": "none"}, "UNCOMPRESSED", "UNCOMPRESSED"),
])
def test_image_bytes_get_their_own_codec_and_no_dictionary_in_parts_and_merged_files(tmp_path, settings, image_codec,
                                                                                      other_codec):
    """Encoded images are compressed already: by default their column is stored as is, every
    other column (nested ones included) with output.compression, in staged parts and merged files."""
    cfg = {**output_cfg(tmp_path / "out", target_mb=4), **settings}
    writer = StagingParquetWriter(cfg, "run1", FILE_META)
    shard = "/in/00000.tar"
    progress = stage_shard(writer, shard, rows=400, batch_rows=100, image_bytes=2000, reject_every=7)
    merged = merge_shard_parts(cfg, shard_tag(shard), "data", sorted(progress.files["data"]))
    files = [Path(p) for p in progress.files["data"]] + [tmp_path / "out" / "data" / f["name"] for f in merged]
    assert len(merged) == 1 and len(files) == 5
    for path in files:
        codecs = _codecs(path)
        assert codecs["image.bytes"] == (image_codec, False), path
        others = {leaf: c for leaf, c in codecs.items() if leaf != "image.bytes"}
        assert {"image.path", "key", "text", "reject_reason"} <= set(others)
        assert all(codec == other_codec for codec, _ in others.values()), others
        assert others["key"][1] and others["text"][1]  # dictionaries where they can pay off
    # same rows, whatever the codecs
    rows = pq.read_table(files[-1], columns=["key", "image"])
    assert rows.num_rows == 400 - len(range(0, 400, 7)) and all(len(i["bytes"]) == 2000 for i in rows["image"].to_pylist())


def test_parts_are_merged_only_when_publishing_them_as_they_are_would_break_the_bound():
    mb = 1024 * 1024
    assert not parts_need_merge([10], 256 * mb)  # one small part: one file
    assert not parts_need_merge([300 * mb, 260 * mb, 5], 256 * mb)  # large parts and one tail
    assert not parts_need_merge([100 * mb, 100 * mb, 100 * mb], 256 * mb)  # 3 <= ceil(300/256)+1
    assert parts_need_merge([5, 7], 256 * mb)  # two small files where one fits
    assert parts_need_merge([300 * mb, 5, 7], 256 * mb)
    assert parts_need_merge([70 * mb] * 4, 256 * mb)  # 4 > ceil(280/256)+1


def test_committer_commits_shards_in_parallel_with_few_files_and_exact_counts(tmp_path):
    out = tmp_path / "out"
    cfg = output_cfg(out)
    writer = StagingParquetWriter(cfg, "run1", FILE_META)
    ledger = Ledger(str(out))
    shards = [f"/in/{i:05d}.tar" for i in range(6)]
    seen: list[str] = []
    committer = Committer(ledger, cfg, record_info=lambda p: {"run_id": "run1"},
                          on_commit=lambda p, rec: seen.append(p.shard),
                          merge_runner=merge_shard_parts, threads=3, max_waiting=1)
    for shard in shards:
        committer.submit(stage_shard(writer, shard, rows=400, batch_rows=64, reject_every=7))
    committer.close()

    assert sorted(seen) == shards and committer.committed_tags == {shard_tag(s) for s in shards}
    for shard in shards:
        rec = ledger.record(shard)
        assert rec["rows_in"] == 400 == rec["kept"] + rec["rejected"] and rec["rejected"] == 58
        # seven 64-row batches per kind merged into one file each
        assert [len(rec["files"][k]) for k in ("data", "rejected")] == [1, 1]
        kept = pq.read_table(out / "data" / rec["files"]["data"][0])
        rejected = pq.read_table(out / "rejected" / rec["files"]["rejected"][0])
        assert kept.num_rows == 342 and rejected.num_rows == 58
        assert set(rejected["reject_reason"].to_pylist()) == {"min_side:too_small"}
    assert not list((out / "_mmcurate" / "staging").rglob("*.parquet"))


def test_a_failed_commit_stops_the_run_and_leaves_its_shard_pending_for_the_rerun(tmp_path):
    out = tmp_path / "out"
    cfg = output_cfg(out)
    writer = StagingParquetWriter(cfg, "run1", FILE_META)
    ledger = Ledger(str(out))
    shard = "/in/00007.tar"

    def merge_then_die(output, tag, kind, parts, part_bytes, generation=0):
        # The real merge writes final files, then the process "dies" before the ledger record.
        merge_shard_parts(output, tag, kind, parts, part_bytes)
        raise StorageError("simulated crash between merge and ledger record")

    committer = Committer(ledger, cfg, merge_runner=merge_then_die, threads=2)
    committer.submit(stage_shard(writer, shard, rows=300, batch_rows=50))
    with pytest.raises(StorageError, match="simulated crash"):
        committer.close()
    assert ledger.record(shard) is None
    assert list((out / "data").glob("*.parquet")), "the merge had written final files"

    # The rerun: prepare finds the orphans by prefix, the shard is redone and committed once.
    assert ledger.prepare([shard]) > 0
    assert not list((out / "data").glob("*.parquet")) and not list((out / "_mmcurate").rglob("*.parquet"))
    writer = StagingParquetWriter(cfg, "run2", FILE_META)
    committer = Committer(ledger, cfg, merge_runner=merge_shard_parts)
    committer.submit(stage_shard(writer, shard, rows=300, batch_rows=50))
    committer.close()
    rec = ledger.record(shard)
    on_disk = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert on_disk == rec["files"]["data"]
    assert sum(pq.read_metadata(out / "data" / n).num_rows for n in on_disk) == 300 == rec["kept"]
