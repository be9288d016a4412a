"""WebDataset shards on a real S3 API (moto server) -> curated output on S3, on local Ray."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ground.errors import ConfigError
from ground.layout import shard_tag, staging_prefix
from jobs.sample_data import make_webdataset_shards
from pipelines.ledger import Ledger
from pipelines.runner import run
from tests.conftest import TEST_KEY, TEST_SECRET
from tests.helpers import ledger_records, make_config, read_rows

N_SHARDS, GOOD = 4, 10
BAD_PER_SHARD = 4  # jobs.sample_data.bad_samples: truncated, not an image, no image, tiny


def _upload_shards(fs, bucket: str, tmp_path: Path) -> list[str]:
    paths = make_webdataset_shards(tmp_path / "wds", n_shards=N_SHARDS, samples_per_shard=GOOD, seed=1)
    for p in paths:
        fs.put_file(str(p), f"{bucket}/wds/{p.name}")
    return [p.name for p in paths]


def test_s3_to_s3_accounting_rerun_and_no_secret_leak(ray_session, s3, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fs, opts, bucket = s3
    _upload_shards(fs, bucket, tmp_path)
    out = f"s3://{bucket}/curated"
    cfg = make_config([f"s3://{bucket}/wds/{{00000..00003}}.tar"], out, storage_options=opts)

    summary = run(cfg)

    assert summary.shards_committed == N_SHARDS
    total = N_SHARDS * (GOOD + BAD_PER_SHARD)
    assert summary.rows_in == total
    kept = read_rows(fs, out, "data")
    rejected = read_rows(fs, out, "rejected")
    assert len(kept) == summary.kept == N_SHARDS * GOOD
    assert len(rejected) == summary.rejected == N_SHARDS * BAD_PER_SHARD
    assert all(r["reject_reason"] is None for r in kept)
    assert {r["reject_reason"] for r in rejected} == {
        "decode:truncated", "decode:not_an_image", "webdataset:missing_image", "min_side:too_small"}
    # rows_in = kept + rejected, per shard, in the ledger and in the files
    records = ledger_records(fs, out)
    assert len(records) == N_SHARDS
    for rec in records:
        assert rec["rows_in"] == rec["kept"] + rec["rejected"] == GOOD + BAD_PER_SHARD
        assert rec["source_size"] > 0 and rec["source_etag"]
        shard = rec["shard"]
        assert sum(r["source_shard"] == shard for r in kept) == rec["kept"]
        assert sum(r["source_shard"] == shard for r in rejected) == rec["rejected"]
    # no staging left behind; every published file is named in a ledger record
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/curated/_mmcurate/staging") or not fs.find(f"{bucket}/curated/_mmcurate/staging")
    published = {p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/curated/data")}
    assert published == {f for rec in records for f in rec["files"]["data"]}

    # File metadata: HF features + mmcurate provenance; zstd
    first = sorted(fs.find(f"{bucket}/curated/data"))[0]
    with fs.open(first, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = json.loads(pf.schema_arrow.metadata[b"mmcurate"])
        hf = json.loads(pf.schema_arrow.metadata[b"huggingface"])
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert meta["pipeline"] == "test" and meta["config_hash"] == summary.config_hash
    assert meta["schema_version"] and meta["mmcurate_version"]
    assert hf["info"]["features"]["image"] == {"_type": "Image"}

    # Credentials appear nowhere we write.
    for path in fs.find(f"{bucket}/curated"):
        blob = fs.cat_file(path)
        assert TEST_SECRET.encode() not in blob and TEST_KEY.encode() not in blob, path

    # Our own loggers, even at DEBUG (the CLI keeps botocore's wire logs at WARNING).
    ours = ("pipelines", "operators", "jobs", "mmcurate")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(ours))
    assert "committed s3://" in logged  # progress was logged...
    assert TEST_SECRET not in logged and TEST_KEY not in logged  # ...without credentials

    # A rerun skips every committed shard and changes nothing.
    before = sorted(fs.find(f"{bucket}/curated/data"))
    again = run(cfg)
    assert again.shards_skipped == N_SHARDS and again.shards_committed == 0 and again.rows_in == 0
    fs.invalidate_cache()
    assert sorted(fs.find(f"{bucket}/curated/data")) == before


def test_a_run_sweeps_staged_parts_of_committed_shards_and_resets_the_failure_count_of_what_it_commits(ray_session, s3, tmp_path):
    # A run killed after a shard's ledger record landed but before its staged parts were deleted
    # (seen in the S3 resume test) leaves parts of a shard no later run has pending. The next run
    # that has work to do must sweep them, not only the leftovers of shards it committed itself.
    fs, opts, bucket = s3
    names = _upload_shards(fs, bucket, tmp_path)
    out = f"s3://{bucket}/curated"
    first = f"s3://{bucket}/wds/{names[0]}"
    assert run(make_config([first], out, storage_options=opts)).shards_committed == 1
    stray = f"{bucket}/curated/{staging_prefix(shard_tag(first))}/data/killed-run-part.parquet"
    fs.pipe_file(stray, b"a part the killed run never deleted")
    # The second shard failed in an earlier run; once it commits, its count of consecutive
    # failures must start again from zero (quarantine is for shards that fail run after run).
    second = f"s3://{bucket}/wds/{names[1]}"
    ledger = Ledger(out, opts)
    assert ledger.record_failure(second, "TransientStorageError: earlier night", "r0") == 1

    summary = run(make_config([first, second], out, storage_options=opts))

    assert summary.shards_skipped == 1 and summary.shards_committed == 1
    fs.invalidate_cache()
    assert ledger.failure_record(second) is None
    assert ledger.record_failure(second, "TransientStorageError: a later night", "r2") == 1
    fs.invalidate_cache()
    staging = f"{bucket}/curated/{staging_prefix('')}".rstrip("/")
    assert not fs.exists(staging) or not fs.find(staging)
    assert len(read_rows(fs, out, "data")) == 2 * GOOD


def test_hf_datasets_decodes_output_images(ray_session, tmp_path):
    import datasets

    paths = make_webdataset_shards(tmp_path / "wds", n_shards=1, samples_per_shard=6, seed=2)
    out = tmp_path / "out"
    run(make_config([str(paths[0])], str(out)))
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 6
    img = ds[0]["image"]
    assert img.size == (ds[0]["width"], ds[0]["height"])


def test_tar_shards_under_format_parquet_stop_the_run_before_anything_is_committed(s3, tmp_path):
    """One ranged GET of the first pending shard; without it every shard read as damaged, the run
    exited 0 and the ledger marked all of them done (no Ray needed: the run stops before it)."""
    fs, opts, bucket = s3
    _upload_shards(fs, bucket, tmp_path)
    cfg = make_config([f"s3://{bucket}/wds/*.tar"], f"s3://{bucket}/out", storage_options=opts, fmt="parquet")
    with pytest.raises(ConfigError, match=rf"^s3://{bucket}/wds/00000\.tar is a tar archive \(WebDataset\), but "
                                          r"input\.format is 'parquet' \(set input\.format: webdataset\)$"):
        run(cfg)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_mmcurate/ledger") or not fs.find(f"{bucket}/out/_mmcurate/ledger")
    (stats,) = [json.loads(fs.cat_file(p)) for p in fs.find(f"{bucket}/out/_mmcurate/runs") if p.endswith("stats.json")]
    assert stats["status"] == "error" and "ConfigError" in stats["error"]
