"""Shard outcomes without Ray: damage vs failure in the readers, resumed reads, markers, GPU check.

Reads over S3 go through the real moto server, with ``tests/faultproxy.py`` faking only the
network (503 SlowDown, bodies cut mid-stream).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ground.errors import TransientStorageError
from ground.schema import MARKER_END, MARKER_FAILED, SHARD_DAMAGE, SHARD_MARKER, SHARD_ROWS
from ground.storage import ResumableFile, filesystem
from jobs.sample_data import make_webdataset_shards
from operators.base import Resources
from operators.readers import make_reader
from operators.writers.parquet import StagingParquetWriter
from pipelines.ledger import ShardProgress
from pipelines.plan import OperatorStep, Plan
from pipelines.runner import ResourceError, check_cpus, check_resources, cpu_demand, gpu_demand
from tests.faultproxy import FaultProxy

HTML_BODY = b"<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>busy</body></html>\n"


def _reader(fmt: str, paths: list[str], **options):
    return make_reader({"format": fmt, "paths": paths, "block_rows": 4, "read_attempts": 3, **options})


def _outcome(reader, shard: str) -> tuple[list[dict], dict | None]:
    """(sample rows, the marker row or None) of one shard read."""
    rows, marker = [], None
    for block in reader.read_blocks(shard):
        for row in block.to_pylist():
            if row[SHARD_MARKER]:
                assert marker is None, "one marker per shard at most"
                marker = row
            else:
                rows.append(row)
    return rows, marker


# -- damage: permanently bad bytes ------------------------------------------------------------

@pytest.mark.parametrize("body", [HTML_BODY, b""], ids=["html_error_body", "zero_bytes"])
def test_a_shard_that_is_not_a_tar_is_damaged_not_silently_empty(tmp_path, body):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(body)
    rows, marker = _outcome(_reader("webdataset", [str(shard)]), str(shard))
    assert rows == []
    assert marker[SHARD_MARKER] == MARKER_END and marker[SHARD_ROWS] == 0
    assert marker[SHARD_DAMAGE].startswith("tar damaged after 0 complete samples")


def test_a_file_of_garbage_bytes_is_a_damaged_parquet_shard(tmp_path):
    shard = tmp_path / "part-0.parquet"
    shard.write_bytes(HTML_BODY * 3)
    rows, marker = _outcome(_reader("parquet", [str(shard)]), str(shard))
    assert rows == [] and marker[SHARD_MARKER] == MARKER_END
    assert "not a readable Parquet file" in marker[SHARD_DAMAGE] and "magic bytes" in marker[SHARD_DAMAGE]


def test_a_missing_shard_fails_instead_of_being_committed_empty(tmp_path):
    rows, marker = _outcome(_reader("webdataset", [str(tmp_path)]), str(tmp_path / "gone.tar"))
    assert rows == [] and marker[SHARD_MARKER] == MARKER_FAILED
    assert "FileNotFoundError" in marker[SHARD_DAMAGE]


def _coco(tmp_path, images: list[dict], annotations: list[dict]) -> str:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a.jpg").write_bytes(b"\xff\xd8 not decoded by the reader")
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(path)


def test_coco_bad_captions_and_missing_file_names_are_row_rejects(tmp_path):
    url = _coco(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": None}, {"id": 3}],
                annotations=[{"image_id": 1, "caption": "fine"}, {"image_id": 1, "caption": 42},
                             {"image_id": 1, "caption": ["a", "list"]}, {"image_id": 2, "caption": "no file"}])
    reader = _reader("coco", [url], images_prefix=str(tmp_path / "images"))
    (shard,) = reader.list_shards()
    rows, marker = _outcome(reader, shard)
    by_key = {r["key"]: r for r in rows}
    assert marker is None and rows[-1][SHARD_ROWS] == len(rows) == 5
    assert by_key["1/0"]["reject_reason"] is None and by_key["1/0"]["text"] == "fine"
    assert by_key["1/1"]["reject_reason"] == "coco:bad_caption" and json.loads(by_key["1/1"]["meta"])["caption"] == 42
    assert by_key["1/2"]["reject_reason"] == "coco:bad_caption"
    assert by_key["2/0"]["reject_reason"] == "coco:missing_file_name" and by_key["2/0"]["image"] is None
    assert by_key["3"]["reject_reason"] == "coco:missing_file_name"


def test_coco_virtual_shards_stay_put_when_the_file_grows_by_appended_images(tmp_path):
    images = [{"id": 100 - i, "file_name": "a.jpg"} for i in range(5)]  # ids deliberately not in file order
    url = _coco(tmp_path, images, [])
    reader = _reader("coco", [url], images_prefix=str(tmp_path / "images"), coco_images_per_shard=2)
    before = reader.list_shards()
    keys_before = {s: [r["key"] for r in _outcome(reader, s)[0]] for s in before}
    prints_before = {s: reader.fingerprint(s) for s in before}

    grown = images + [{"id": 1 + i, "file_name": "a.jpg"} for i in range(3)]  # low ids appended
    _coco(tmp_path, grown, [])
    after = reader.list_shards()

    assert after[: len(before)] == before and len(after) == 4
    for shard in before[:2]:  # full shards: same images, same fingerprint
        assert [r["key"] for r in _outcome(reader, shard)[0]] == keys_before[shard]
        assert reader.fingerprint(shard) == prints_before[shard]
    last = before[2]  # the partly filled shard grew: it reports a change (redo under on_change: redo)
    assert reader.fingerprint(last) != prints_before[last]
    assert [r["key"] for r in _outcome(reader, last)[0]] == keys_before[last] + ["1"]
    all_keys = [r["key"] for s in after for r in _outcome(reader, s)[0]]
    assert sorted(all_keys) == sorted(str(im["id"]) for im in grown)


# -- failures: transient faults are retried at the read, then fail the shard -------------------

@pytest.fixture()
def tar_on_s3(s3, tmp_path):
    fs, opts, bucket = s3
    (path,) = make_webdataset_shards(tmp_path / "wds", n_shards=1, samples_per_shard=12, seed=3)
    fs.put_file(str(path), f"{bucket}/wds/{path.name}")
    proxy = FaultProxy(opts["endpoint_url"])
    yield path, f"s3://{bucket}/wds/{path.name}", {**opts, "endpoint_url": proxy.url}, proxy
    proxy.stop()


def test_a_read_cut_mid_body_resumes_at_the_broken_offset(tar_on_s3):
    local, url, opts, proxy = tar_on_s3
    proxy.add_rule("cut", method="GET", path=r"/wds/", after_bytes=3000, times=6)
    proxy.add_rule("503", method="GET", path=r"/wds/", times=2)
    fs, path = filesystem(url, opts)
    with ResumableFile(fs, path, attempts=8, base_delay=0.01) as f:
        data = f.read()
    assert data == local.read_bytes()
    assert proxy.fired("cut") == 6 and proxy.fired("503") == 2


def test_a_read_that_keeps_breaking_fails_the_shard_and_is_never_called_damage(tar_on_s3):
    local, url, opts, proxy = tar_on_s3
    proxy.add_rule("cut", method="GET", path=r"/wds/", after_bytes=5000, times=None)
    fs, path = filesystem(url, opts)
    with pytest.raises(TransientStorageError, match=r"read failed at byte \d+ after 2 attempts"):
        with ResumableFile(fs, path, attempts=2, base_delay=0.01) as f:
            f.read()

    reader = _reader("webdataset", [url], storage_options=opts, read_attempts=2)
    rows, marker = _outcome(reader, url)
    assert marker[SHARD_MARKER] == MARKER_FAILED and "TransientStorageError" in marker[SHARD_DAMAGE]
    assert marker[SHARD_ROWS] is None  # never a row total: a failed shard cannot be committed


def test_a_shard_the_store_keeps_throttling_fails_and_is_never_called_damage(tar_on_s3):
    # 503 SlowDown on every GET: s3fs's own retries, then ours, then the shard fails (left pending).
    local, url, opts, proxy = tar_on_s3
    proxy.add_rule("503", method="GET", path=r"/wds/", times=None)
    # botocore's own backoff (5 attempts, up to 8 s apart) under s3fs's 5 retries under ours would
    # take minutes to give up; one botocore attempt keeps the same path in seconds.
    opts = {**opts, "config_kwargs": {"retries": {"max_attempts": 1}}}
    reader = _reader("webdataset", [url], storage_options=opts, read_attempts=2)
    rows, marker = _outcome(reader, url)
    assert proxy.fired("503") >= 2
    assert rows == [] and marker[SHARD_MARKER] == MARKER_FAILED, marker
    assert marker[SHARD_ROWS] is None and "tar damaged" not in marker[SHARD_DAMAGE]


def test_a_parquet_read_that_keeps_breaking_fails_the_shard_and_is_never_called_damage(s3, tmp_path):
    # pyarrow reads through our resumable file: the transient error must come out of pyarrow as
    # itself, not as an ArrowException/OSError the reader would record as a damaged file.
    fs, opts, bucket = s3
    rows = 400
    table = pa.table({"image": [{"bytes": bytes([i % 251]) * 200, "path": None} for i in range(rows)],
                      "text": [f"caption {i}" for i in range(rows)]})
    local = tmp_path / "part-0.parquet"
    pq.write_table(table, local, row_group_size=50)
    fs.put_file(str(local), f"{bucket}/pq/{local.name}")
    url = f"s3://{bucket}/pq/{local.name}"
    proxy = FaultProxy(opts["endpoint_url"])
    try:
        proxy.add_rule("cut", method="GET", path=r"/pq/", after_bytes=3000, times=None)
        reader = _reader("parquet", [url], storage_options={**opts, "endpoint_url": proxy.url}, read_attempts=2)
        got, marker = _outcome(reader, url)
        assert proxy.fired("cut") >= 2
    finally:
        proxy.stop()
    assert marker[SHARD_MARKER] == MARKER_FAILED and "TransientStorageError" in marker[SHARD_DAMAGE], marker
    assert marker[SHARD_ROWS] is None and len(got) < rows


# -- the driver's side: markers through the writer into ShardProgress --------------------------

def test_marker_rows_are_reported_by_the_writer_never_written(tmp_path):
    reader = _reader("webdataset", [str(tmp_path)])
    end = reader.marker(str(tmp_path / "a.tar"), MARKER_END, message="tar damaged after 0 complete samples")
    failed = reader.marker(str(tmp_path / "b.tar"), MARKER_FAILED, message="TransientStorageError: x")
    writer = StagingParquetWriter({"path": str(tmp_path / "out")}, "run1", {})
    records = writer(pa.concat_tables([end, failed])).to_pylist()
    assert not (tmp_path / "out").exists()
    assert [(r["kind"], r["rows"], r["shard_marker"]) for r in records] == [("marker", 0, "end"), ("marker", 0, "failed")]

    progress = {r["shard"]: ShardProgress(r["shard"]) for r in records}
    for r in records:
        progress[r["shard"]].add(r)
    a, b = progress[str(tmp_path / "a.tar")], progress[str(tmp_path / "b.tar")]
    assert a.complete and a.rows_in == 0 and a.damage.startswith("tar damaged")
    assert not b.complete and b.failed == "TransientStorageError: x"


# -- GPU check ---------------------------------------------------------------------------------

def _plan(*resources: Resources) -> Plan:
    steps = [OperatorStep(f"op{i}", object, None, r) for i, r in enumerate(resources)]
    return Plan(shards=[], committed=[], pending=[], steps=steps)


def test_gpu_check_sums_min_actors_times_num_gpus_over_operators():
    plan = _plan(Resources(num_gpus=1, min_actors=2, max_actors=4), Resources(num_gpus=0.5, min_actors=1, max_actors=1),
                 Resources(num_gpus=0.25), Resources())
    assert gpu_demand(plan) == 2 + 0.5 + 0.25
    check_resources(plan, cluster_gpus=3)  # fits
    with pytest.raises(ResourceError, match=r"need 2.75 GPU\(s\) at once \(num_gpus x min_actors: op0 1x2, op1 0.5x1, op2 0.25x1\) but the Ray cluster has 2;"):
        check_resources(plan, cluster_gpus=2)  # every operator alone fits; together they do not


def test_gpu_check_warns_instead_of_failing_on_an_autoscaling_cluster(caplog):
    plan = _plan(Resources(num_gpus=1, min_actors=4, max_actors=4))
    check_resources(plan, cluster_gpus=0, autoscaling=True)
    assert any("need 4 GPU(s)" in r.getMessage() and "autoscaler" in r.getMessage() for r in caplog.records)


def test_cpu_check_fails_when_model_actors_leave_no_cpu_for_reading(caplog):
    # num_cpus: 2 on a 2-core node: the actor holds both cores and no read task can ever start.
    one = _plan(Resources(num_cpus=2.0, min_actors=1, max_actors=1), Resources(num_cpus=0.125)).steps
    with pytest.raises(ResourceError, match=r"model actors hold 2 CPU\(s\) from the start \(num_cpus x min_actors: "
                                            r"op0 2x1\) and each read or write task needs 0.125 more, but the Ray "
                                            r"cluster has 2: the run could never read"):
        check_cpus(one, cluster_cpus=2, task_cpus=0.125)
    check_cpus(one, cluster_cpus=4, task_cpus=0.125)  # fits on a bigger cluster
    check_cpus(one, cluster_cpus=2, task_cpus=0.125, autoscaling=True)
    assert any("autoscaler" in r.getMessage() for r in caplog.records)
    # What the node-derived defaults give on 2 cores fits: two actors of 0.75 CPU, tasks of 0.125.
    derived = _plan(Resources(num_cpus=0.75, min_actors=2, max_actors=2), Resources(num_cpus=0.125)).steps
    assert cpu_demand(derived) == 1.5
    check_cpus(derived, cluster_cpus=2, task_cpus=0.125)


# -- redo: the old files of a replaced shard go, even after a crash mid-swap --------------------

def test_a_redo_swap_interrupted_after_the_record_is_finished_by_the_next_run(tmp_path):
    from pipelines.ledger import Ledger

    out = tmp_path / "out"
    ledger = Ledger(str(out))
    (out / "data").mkdir(parents=True)
    for name in ("s-abc-00000.parquet", "s-abc-g1x00000.parquet", "other-00000.parquet"):
        (out / "data" / name).write_bytes(b"rows")
    # State left by a kill between the record swap and the delete of the old files:
    ledger.write_json("_mmcurate/ledger/s-abc.json", {"shard": "s", "files": {"data": ["s-abc-g1x00000.parquet"]}})
    ledger.write_json("_mmcurate/replaced/s-abc.json", {"shard": "s", "files": {"data": ["s-abc-00000.parquet"]}})

    assert ledger.finish_replacements() == 1
    assert sorted(p.name for p in (out / "data").iterdir()) == ["other-00000.parquet", "s-abc-g1x00000.parquet"]
    assert ledger.finish_replacements() == 0
