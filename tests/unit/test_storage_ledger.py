"""Storage helpers, shard tags and the ledger's bookkeeping, without Ray."""

from __future__ import annotations

import json

import fsspec
import pytest

from ground.errors import AccountingError, StorageError
from ground.layout import shard_tag, tag_of_file
from pipelines.ledger import Ledger, ShardProgress
from ground.storage import expand_paths, filesystem, retry


def test_s3_filesystems_get_adaptive_retries_unless_configured():
    fs, path = filesystem("s3://bucket/key.tar", {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s"})
    assert path == "bucket/key.tar"
    retries = fs.config_kwargs["retries"]
    assert (retries["max_attempts"], retries["mode"]) == (6, "adaptive")
    fs2, _ = filesystem("s3://bucket/key.tar", {"config_kwargs": {"retries": {"max_attempts": 2}}, "anon": True})
    assert fs2.config_kwargs["retries"]["max_attempts"] == 2


def test_retry_recovers_from_transient_errors_and_names_the_step_when_it_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retry(flaky, "publish x", base_delay=0.001) == "ok" and len(calls) == 3
    with pytest.raises(StorageError, match="publish y: ConnectionResetError"):
        retry(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), "publish y", attempts=2, base_delay=0.001)
    with pytest.raises(FileNotFoundError):  # not transient: no retry
        retry(lambda: open("/nonexistent/x"), "read")


def test_expand_paths_braces_globs_and_missing(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"x")
    braces = expand_paths([str(tmp_path / "{00000..00002}.tar")])
    assert braces == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_paths([str(tmp_path / "*.tar"), str(tmp_path / "00001.tar")]) == braces  # de-duplicated
    with pytest.raises(StorageError, match="00003.tar.*does not exist"):
        expand_paths([str(tmp_path / "{00002..00007}.tar")])
    with pytest.raises(StorageError, match="matches no file"):
        expand_paths([str(tmp_path / "*.parquet")])


def test_shard_tags_are_stable_distinct_and_recoverable_from_file_names():
    a, b = shard_tag("s3://bucket/a/00001.tar"), shard_tag("s3://bucket/b/00001.tar")
    assert a != b and a.startswith("00001-") and a == shard_tag("s3://bucket/a/00001.tar")
    assert shard_tag("/x/captions.json#images=0-999").startswith("captions-0-999-")
    assert tag_of_file(f"data/{a}-00003.parquet") == a


def test_progress_refuses_more_rows_than_the_reader_counted():
    p = ShardProgress("s")
    p.add({"rows": 3, "kind": "data", "path": "x", "reasons": "{}", "shard_rows": 4, "shard_damage": None})
    assert not p.complete
    p.add({"rows": 1, "kind": "rejected", "path": "y", "reasons": '{"decode:truncated": 1}',
           "shard_rows": None, "shard_damage": None})
    assert p.complete and p.reasons == {"decode:truncated": 1}
    p.add({"rows": 1, "kind": "data", "path": "z", "reasons": "{}", "shard_rows": None, "shard_damage": None})
    with pytest.raises(AccountingError, match="5 rows written but the reader counted 4"):
        p.complete


def test_prepare_removes_leftovers_of_pending_shards_only_and_commit_publishes(tmp_path):
    out = tmp_path / "out"
    redo, keep = "/in/00000.tar", "/in/00001.tar"
    for tag in (shard_tag(redo), shard_tag(keep)):
        for kind in ("data", "rejected"):
            (out / kind).mkdir(parents=True, exist_ok=True)
            (out / kind / f"{tag}-00000.parquet").write_bytes(b"old")
        (out / "_mmcurate" / "staging" / tag / "data").mkdir(parents=True)
        (out / "_mmcurate" / "staging" / tag / "data" / "run-x.parquet").write_bytes(b"staged")
    ledger = Ledger(str(out))
    assert ledger.prepare([redo]) == 3
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert all(shard_tag(keep) in p for p in left) and len(left) == 3

    # commit: staged files move to their final names, ledger record written last
    staged = out / "_mmcurate" / "staging" / shard_tag(redo) / "data"
    staged.mkdir(parents=True)
    (staged / "b.parquet").write_bytes(b"1")
    (staged / "a.parquet").write_bytes(b"2")
    p = ShardProgress(redo, rows=5, rows_in=5)
    p.files["data"] = [str(staged / "b.parquet"), str(staged / "a.parquet")]
    p.counts["data"] = 5
    rec = ledger.commit(p, {"run_id": "r1"})
    tag = shard_tag(redo)
    assert rec["files"]["data"] == [f"{tag}-00000.parquet", f"{tag}-00001.parquet"]
    assert (out / "data" / f"{tag}-00000.parquet").read_bytes() == b"2"  # sorted staging order
    assert not (out / "_mmcurate" / "staging" / tag).exists()
    assert json.loads((out / "_mmcurate" / "ledger" / f"{tag}.json").read_text())["rows_in"] == 5
    assert tag in ledger.committed_tags()

    bad = ShardProgress("/in/00002.tar", rows=2, rows_in=3)
    bad.counts["data"] = 2
    with pytest.raises(AccountingError, match="rows_in=3 != kept=2"):
        ledger.commit(bad, {})
    assert fsspec.filesystem("file").exists(str(out / "_mmcurate" / "ledger"))
