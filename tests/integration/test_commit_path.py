"""The commit path on a real S3 API (moto over HTTP), requests counted at the wire.

``tests/faultproxy.py`` sits between s3fs and moto and logs every HTTP request; nothing is faked.
Merges run in-process (``merge_runner=merge_shard_parts``) instead of in a Ray task: that moves
where the merge runs, not what it sends.
"""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from ground.layout import shard_tag
from operators.writers.parquet import StagingParquetWriter, merge_shard_parts
from pipelines.commit import Committer
from pipelines.ledger import Ledger
from tests.faultproxy import FaultProxy
from tests.unit.test_commit import FILE_META, stage_shard


@pytest.fixture()
def proxied(s3, s3_server):
    """(s3fs, storage options through the proxy, bucket, proxy)."""
    fs, opts, bucket = s3
    proxy = FaultProxy(s3_server)
    yield fs, {**opts, "endpoint_url": proxy.url}, bucket, proxy
    proxy.stop()


def request_kind(method: str, target: str) -> str:
    """The S3 operation of a proxied request, as far as the counts here need (LIST, DeleteObjects, verb)."""
    if method == "GET" and ("list-type" in target or "prefix=" in target):
        return "LIST"
    if method == "POST" and "delete" in target:
        return "DeleteObjects"
    return method


def _requests(proxy: FaultProxy, since: int) -> Counter:
    return Counter(request_kind(m, t) for m, t, _ in proxy.log[since:])


def test_commit_requests_stay_constant_as_the_ledger_grows_and_prepare_lists_only_pending(proxied):
    fs, opts, bucket, proxy = proxied
    out = f"s3://{bucket}/curated"
    output = {"path": out, "storage_options": opts, "target_file_size_mb": 256, "compression": "zstd",
              "compression_level": 3}
    writer = StagingParquetWriter(output, "run1", FILE_META)
    ledger = Ledger(out, opts)

    def commit_one(shard: str, batch_rows: int) -> Counter:
        """Stage a 120-row shard, then count what its commit sends (staging writes excluded)."""
        progress = stage_shard(writer, shard, rows=120, batch_rows=batch_rows, reject_every=5)
        committer = Committer(ledger, output, merge_runner=merge_shard_parts, threads=1)
        since = len(proxy.log)
        committer.submit(progress)
        committer.wait()
        sent = _requests(proxy, since)
        committer._pool.shutdown()
        return sent

    # One part per kind (published as-is) and six parts per kind (merged).
    first_single, first_merged = commit_one("s3://in/a-000.tar", 120), commit_one("s3://in/b-000.tar", 20)

    # Commit 60 more shards through one committer, in parallel.
    committer = Committer(ledger, output, merge_runner=merge_shard_parts, threads=8)
    for i in range(60):
        committer.submit(stage_shard(writer, f"s3://in/bulk-{i:03d}.tar", rows=120, batch_rows=60))
    committer.close()
    assert len(ledger.committed_tags()) == 62

    later_single, later_merged = commit_one("s3://in/a-001.tar", 120), commit_one("s3://in/b-001.tar", 20)
    # Same requests whether 2 or 62 shards are committed: nothing in a commit lists the output.
    assert later_single == first_single and later_merged == first_merged
    print("requests per commit: one part per kind", dict(first_single), "six parts per kind", dict(first_merged))
    assert first_single["LIST"] == 0 and first_merged["LIST"] == 0
    # The record is one PUT; the staged parts go in one DeleteObjects, not one DELETE each.
    assert first_single["DeleteObjects"] == 1 and first_single["DELETE"] == 0
    assert sum(first_single.values()) == 6, first_single  # 2x(HEAD+COPY), PUT, DeleteObjects
    merged_rows = sum(pq.read_metadata(fs.open(f"{bucket}/curated/data/{n}")).num_rows
                      for n in ledger.record("s3://in/b-001.tar")["files"]["data"])
    assert merged_rows == 96 and len(ledger.record("s3://in/b-001.tar")["files"]["data"]) == 1

    # prepare for two pending shards (one with leftovers) lists three prefixes per shard only.
    leftover = stage_shard(writer, "s3://in/c-000.tar", rows=120, batch_rows=60)
    since = len(proxy.log)
    removed = ledger.prepare(["s3://in/c-000.tar", "s3://in/d-000.tar"])
    sent = _requests(proxy, since)
    assert removed == len(leftover.files["data"]) + len(leftover.files["rejected"]) == 2
    assert sent == Counter({"LIST": 6, "DeleteObjects": 1}), sent
    lists = [t for m, t, _ in proxy.log[since:] if request_kind(m, t) == "LIST"]
    assert all(shard_tag("s3://in/c-000.tar") in t or shard_tag("s3://in/d-000.tar") in t for t in lists), lists

    # Told how many shards are committed (as the runner does), prepare lists the whole output
    # when that is cheaper: here 64 committed shards fit in one page per folder.
    leftover = stage_shard(writer, "s3://in/c-000.tar", rows=120, batch_rows=60)
    since = len(proxy.log)
    assert ledger.prepare(["s3://in/c-000.tar", "s3://in/d-000.tar"], committed=64) == 2
    sent = _requests(proxy, since)
    assert sent["LIST"] <= 3 + 1 and sent["DeleteObjects"] == 1, sent
    assert not fs.find(f"{bucket}/curated/_mmcurate/staging", prefix=shard_tag("s3://in/c-000.tar"))
    assert len(ledger.committed_tags()) == 64
