"""Nightly runs on a real local Ray: damaged, failed and quarantined shards; faults on a real S3 API.

Faults are injected only at the network (``tests/faultproxy.py`` in front of the moto server):
the readers, s3fs, Ray and the commit loop are the real ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from ground.errors import StalledError
from jobs.cli import app
from jobs.sample_data import draw_image, encode, make_webdataset_shards
from pipelines.runner import ResourceError, init_ray, run
from tests.faultproxy import FaultProxy
from tests.helpers import ledger_records, make_config, read_rows

HTML_BODY = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n"
FAST_RETRIES = {"shard_retries": 1, "shard_retry_backoff_s": 0.0, "read_attempts": 2}


def row_list(fs, root: str) -> list[tuple]:
    """Every output row as (kind, shard file, key, reject_reason, sha256, text), duplicates kept."""
    out = []
    for kind in ("data", "rejected"):
        for r in read_rows(fs, root, kind):
            out.append((kind, r["source_shard"].rsplit("/", 1)[-1], r["key"], r["reject_reason"], r["sha256"],
                        r["text"]))
    return sorted(out, key=repr)


def stats(fs, root: str, run_id: str) -> dict:
    with fs.open(f"{root.rstrip('/')}/_mmcurate/runs/{run_id}/stats.json", "rb") as f:
        return json.load(f)


def test_shards_that_are_not_tars_are_committed_as_damaged_and_visible(ray_session, tmp_path):
    fs = fsspec.filesystem("file")
    shards = make_webdataset_shards(tmp_path / "in", n_shards=2, samples_per_shard=5, seed=4)
    (tmp_path / "in" / "00002.tar").write_bytes(HTML_BODY)  # an error page saved as a shard
    (tmp_path / "in" / "00003.tar").write_bytes(b"")  # a zero-byte object
    out = str(tmp_path / "out")
    cfg = make_config([str(tmp_path / "in" / "*.tar")], out)

    summary = run(cfg)

    assert summary.exit_code == 0 and summary.status == "complete"
    assert summary.shards_committed == 4 and not summary.failed_shards
    damaged = {Path(s).name: why for s, why in summary.damaged_shards.items()}
    assert set(damaged) == {"00002.tar", "00003.tar"}
    assert all(why.startswith("tar damaged after 0 complete samples") for why in damaged.values())
    st = stats(fs, out, summary.run_id)
    assert st["shards"]["damaged"] == 2 and {Path(s).name for s in st["damaged_shards"]} == set(damaged)
    assert st["status"] == "complete" and st["started_at"] and st["ended_at"] and st["rows_lost"] == 0
    records = {Path(r["shard"]).name: r for r in ledger_records(fs, out)}
    assert records["00002.tar"]["damage"] and records["00002.tar"]["rows_in"] == 0
    assert summary.rows_in == sum(r["rows_in"] for r in records.values()) == len(read_rows(fs, out, "data")) + \
        len(read_rows(fs, out, "rejected"))
    assert {r["source_shard"] for r in read_rows(fs, out, "data")} == {str(p) for p in shards}

    again = run(cfg)  # damage is permanent: committed once, never retried
    assert again.shards_skipped == 4 and again.shards_committed == 0 and again.exit_code == 0


def test_garbage_parquet_is_damaged_and_a_non_string_coco_caption_is_a_row_reject(ray_session, tmp_path):
    fs = fsspec.filesystem("file")
    rng = random.Random(5)
    images = [encode(draw_image(rng, (64, 64))[0]) for _ in range(3)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                             "text": ["one picture", "two pictures", "three pictures"]}),
                   tmp_path / "pq" / "good.parquet")
    (tmp_path / "pq" / "garbage.parquet").write_bytes(HTML_BODY * 10)
    out = str(tmp_path / "out-pq")
    summary = run(make_config([str(tmp_path / "pq" / "*.parquet")], out, fmt="parquet"))
    assert summary.exit_code == 0 and summary.shards_committed == 2
    assert [Path(s).name for s in summary.damaged_shards] == ["garbage.parquet"]
    assert "not a readable Parquet file" in next(iter(summary.damaged_shards.values()))
    assert len(read_rows(fs, out, "data")) == 3
    assert summary.rows_lost == 0  # no footer: how many rows the garbage held is not knowable

    # A readable footer, but the second row group's page header is overwritten: the first row
    # group's rows are kept and the rows past the damage are counted as lost, everywhere.
    pq.write_table(pa.table({"image": [{"bytes": images[i % 3], "path": f"{i}.jpg"} for i in range(6)],
                             "text": [f"picture {i}" for i in range(6)]}), tmp_path / "rg.parquet", row_group_size=3)
    data = bytearray((tmp_path / "rg.parquet").read_bytes())
    offset = pq.read_metadata(tmp_path / "rg.parquet").row_group(1).column(0).data_page_offset
    data[offset:offset + 48] = b"\xff" * 48
    (tmp_path / "pq2").mkdir()
    (tmp_path / "pq2" / "torn.parquet").write_bytes(bytes(data))
    out = str(tmp_path / "out-torn")
    summary = run(make_config([str(tmp_path / "pq2" / "torn.parquet")], out, fmt="parquet", block_rows=3))
    assert summary.exit_code == 0 and summary.rows_lost == 3, summary
    assert "Parquet damaged after 3 rows" in next(iter(summary.damaged_shards.values()))
    assert ledger_records(fs, out)[0]["rows_lost"] == 3
    assert json.loads(Path(out, "_mmcurate", "runs", summary.run_id, "stats.json").read_text())["rows_lost"] == 3
    assert len(read_rows(fs, out, "data")) == 3

    (tmp_path / "img").mkdir()
    for i, b in enumerate(images):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(b)
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)],
           "annotations": [{"image_id": 0, "caption": "a fine caption"}, {"image_id": 1, "caption": 7},
                           {"image_id": 2, "caption": {"en": "nested"}}]}
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    out = str(tmp_path / "out-coco")
    summary = run(make_config([str(tmp_path / "captions.json")], out, fmt="coco", images_prefix=str(tmp_path / "img"),
                              operators=[{"decode": {}}]))
    assert summary.exit_code == 0 and not summary.damaged_shards
    assert summary.rejected_by_reason == {"coco:bad_caption": 2}
    assert [r["key"] for r in read_rows(fs, out, "data")] == ["0/0"]


@pytest.fixture()
def s3_shards(s3, tmp_path):
    """Three WebDataset shards on the moto server, a fault proxy in front of it."""
    fs, opts, bucket = s3
    for p in make_webdataset_shards(tmp_path / "wds", n_shards=3, samples_per_shard=6, seed=6):
        fs.put_file(str(p), f"{bucket}/wds/{p.name}")
    proxy = FaultProxy(opts["endpoint_url"])
    yield fs, opts, bucket, proxy
    proxy.stop()


def test_faults_mid_stream_never_lose_rows_and_failed_shards_are_retried_then_quarantined(ray_session, s3_shards,
                                                                                          tmp_path):
    fs, opts, bucket, proxy = s3_shards
    paths = [f"s3://{bucket}/wds/{{00000..00002}}.tar"]
    baseline = run(make_config(paths, f"s3://{bucket}/clean", storage_options=opts))
    expected = row_list(fs, f"{bucket}/clean")
    assert baseline.exit_code == 0 and len(expected) == baseline.rows_in > 0

    # Throttling and bodies cut mid-stream, fewer times than the read retries absorb: every row arrives.
    via_proxy = {**opts, "endpoint_url": proxy.url}
    proxy.add_rule("503", method="GET", path=r"/wds/0000[01]\.tar", times=3)
    proxy.add_rule("cut", method="GET", path=r"/wds/00002\.tar", after_bytes=4000, times=3)
    out = f"s3://{bucket}/faulty"
    survived = run(make_config(paths, out, storage_options=via_proxy))
    assert proxy.fired("503") == 3 and proxy.fired("cut") == 3
    assert survived.exit_code == 0 and row_list(fs, f"{bucket}/faulty") == expected

    # A shard whose reads keep breaking: failed (never committed short), retried in-run, failed again.
    proxy.clear()
    proxy.add_rule("cut", method="GET", path=r"/wds/00001\.tar", after_bytes=4000, times=None)
    out = f"s3://{bucket}/broken"
    cfg = make_config(paths, out, storage_options=via_proxy, quarantine_after=2, **FAST_RETRIES)
    first = run(cfg)
    broken = f"s3://{bucket}/wds/00001.tar"
    assert first.exit_code == 3 and first.status == "partial" and set(first.failed_shards) == {broken}
    assert "TransientStorageError" in first.failed_shards[broken] and first.shard_retries == 1
    assert first.shards_committed == 2 and not first.damaged_shards
    assert {Path(r["shard"]).name for r in ledger_records(fs, f"{bucket}/broken")} == {"00000.tar", "00002.tar"}
    fs.invalidate_cache()
    assert not [p for p in fs.find(f"{bucket}/broken") if "/staging/" in p or "00001" in p.rsplit("/", 1)[-1]
                and p.endswith(".parquet")]  # nothing of the failed shard is visible or left staged
    st = stats(fs, f"{bucket}/broken", first.run_id)
    assert st["failed_shards"] == {broken: first.failed_shards[broken]} and st["shards"]["failed"] == 1

    second = run(cfg)  # second consecutive failure: quarantined
    assert second.exit_code == 3 and set(second.quarantined_shards) == {broken} and not second.failed_shards
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/broken/_mmcurate/quarantine")

    # From here through the CLI as an operator types it (in this process, on the session's Ray).
    config = Path(tmp_path / "broken.yaml")
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proxy.clear()  # the storage is healthy again, but a quarantined shard waits for an operator
    third = CliRunner().invoke(app, ["run", str(config), "--log-level", "WARNING"])
    assert third.exit_code == 3, third.output
    assert f"quarantined shard {broken}: " in third.output and "0 committed now" in third.output

    fourth = CliRunner().invoke(app, ["run", str(config), "--retry-quarantined", "--log-level", "WARNING"])
    assert fourth.exit_code == 0, fourth.output
    assert "1 committed now" in fourth.output and "0 quarantined" in fourth.output
    assert row_list(fs, f"{bucket}/broken") == expected
    fs.invalidate_cache()
    for folder in ("quarantine", "failures"):  # released, and its failure count forgotten
        assert not fs.exists(f"{bucket}/broken/_mmcurate/{folder}") or not fs.find(f"{bucket}/broken/_mmcurate/{folder}")


def test_a_stalled_plan_fails_with_one_line_instead_of_hanging(ray_session, tmp_path):
    make_webdataset_shards(tmp_path / "in", n_shards=1, samples_per_shard=2, seed=7)
    cfg = make_config([str(tmp_path / "in" / "00000.tar")], str(tmp_path / "out"),
                      operators=[{"decode": {"resources": {"num_gpus": 1}}}])
    cfg.ray.autoscaling = True  # the GPU check only warns: the plan waits for a GPU that never comes
    cfg.ray.no_progress_timeout_s = 5
    with pytest.raises(StalledError) as err:
        run(cfg)
    assert "\n" not in str(err.value) and "no progress for 5s" in str(err.value)


def test_model_actors_that_leave_no_cpu_for_reading_fail_before_any_work(ray_session, tmp_path, tiny_models):
    # Seen: `clip: {resources: {num_cpus: 2}}` on a 2-core machine waited 10 minutes for a read
    # task that could never start. Now: one line, before a model is loaded or a shard read.
    make_webdataset_shards(tmp_path / "in", n_shards=1, samples_per_shard=2, seed=7)
    cpus = ray_session.cluster_resources()["CPU"]
    cfg = make_config([str(tmp_path / "in" / "00000.tar")], str(tmp_path / "out"),
                      operators=[{"decode": {}}, {"clip": {"model": tiny_models["clip"],
                                                           "resources": {"num_cpus": cpus}}}])
    with pytest.raises(ResourceError, match=rf"model actors hold {cpus:g} CPU\(s\) .* clip {cpus:g}x1\)") as err:
        run(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "_mmcurate" / "ledger").exists()


def test_an_initialised_ray_is_reused_with_a_warning_and_the_stall_timeout_always_set(ray_session, tmp_path, caplog):
    from ray.data import DataContext

    cfg = make_config([str(tmp_path)], str(tmp_path / "out"))
    cfg.ray.num_cpus, cfg.ray.no_progress_timeout_s = 64, 77
    init_ray(cfg)
    assert any("Ray is already initialised" in r.getMessage() and "ray.num_cpus" in r.getMessage()
               for r in caplog.records)
    assert DataContext.get_current().execution_no_progress_timeout_s == 77
