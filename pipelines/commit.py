"""Commits complete shards in parallel, off the loop that consumes the Ray Data stream.

The driver's loop only sums writer records; when a shard is complete it hands the shard to a
``Committer``, whose threads publish its files (merging small parts in a Ray task), write the
ledger record last, and delete the staged parts. The loop blocks only when every thread is busy
and the bounded queue is full, which is the back-pressure that keeps the stream from running
ahead of what storage can commit.

Exactly-once is unchanged: each shard is still committed by ``Ledger.commit`` (record last), so
a kill at any moment leaves shards either committed or pending, and a rerun redoes the pending
ones from scratch. Commits of different shards touch disjoint names, so they can run at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from ground.layout import shard_tag
from operators.writers.parquet import merge_shard_parts, parts_need_merge
from pipelines.ledger import Ledger, ShardProgress

logger = logging.getLogger(__name__)

# A commit is a handful of sequential requests (copy or merge, ledger PUT, DeleteObjects), each
# 10-50 ms on S3, so ~0.1-0.3 s per shard per thread: 16 threads give 50-160 commits/s, above
# the ~49 shards/s that 100 GPUs produce (README: "Output files and the commit path at scale"). More threads mostly queue on
# s3fs's connection pool (10 per client by default).
COMMIT_THREADS = 16
# Complete shards that may wait for a thread before the consuming loop blocks: enough to ride
# out a burst of shards finishing together, small enough that a failure is noticed quickly.
MAX_WAITING = 2 * COMMIT_THREADS
# A merge mostly waits on storage and zstd; asking for no CPU means it can never deadlock behind
# a plan's actor pools that hold every CPU, and COMMIT_THREADS bounds how many run at once.
# SPREAD keeps those merges off the driver's node on a cluster.
MERGE_NUM_CPUS = 0
MERGE_SCHEDULING = "SPREAD"

MergeRunner = Callable[[dict[str, Any], str, str, list[str], list[int], int], list[dict[str, Any]]]

_REMOTE_MERGE = None


def merge_on_ray(output: dict[str, Any], tag: str, kind: str, parts: list[str],
                 part_bytes: list[int], generation: int = 0) -> list[dict[str, Any]]:
    """Run ``merge_shard_parts`` as a Ray task and wait for its file list (needs ``ray.init``)."""
    import ray

    global _REMOTE_MERGE
    if _REMOTE_MERGE is None:
        _REMOTE_MERGE = ray.remote(merge_shard_parts).options(
            num_cpus=MERGE_NUM_CPUS, scheduling_strategy=MERGE_SCHEDULING, name="merge_shard_parts")
    return ray.get(_REMOTE_MERGE.remote(output, tag, kind, parts, part_bytes, generation=generation))


class Committer:
    """A bounded pool of threads that commit complete shards through ``Ledger.commit``.

    Args:
        ledger: the output's ledger.
        output: the run's ``output`` config as a dict (path, storage options, target file size,
            compression), handed to the merge.
        record_info: extra ledger-record fields for a shard (run id, fingerprint); called on a
            commit thread, so it may do I/O.
        on_commit: called with the shard and its ledger record after each commit, one call at a
            time (callers may update counters without their own lock).
        merge_runner: where parts are merged; ``merge_on_ray`` by default. Tests without Ray
            pass ``merge_shard_parts`` to merge in-process.
        threads: commit threads.
        max_waiting: complete shards that may wait for a thread before ``submit`` blocks.
    """

    def __init__(self, ledger: Ledger, output: dict[str, Any],
                 record_info: Callable[[ShardProgress], dict[str, Any]] | None = None,
                 on_commit: Callable[[ShardProgress, dict[str, Any]], None] | None = None,
                 merge_runner: MergeRunner = merge_on_ray, threads: int = COMMIT_THREADS,
                 max_waiting: int = MAX_WAITING):
        self.ledger = ledger
        self.output = output
        self.record_info = record_info or (lambda p: {})
        self.on_commit = on_commit or (lambda p, rec: None)
        self.merge_runner = merge_runner
        self.target_bytes = int(float(output.get("target_file_size_mb", 256)) * 1024 * 1024)
        self.committed_tags: set[str] = set()
        self.merged_files = 0
        self.blocked_s = 0.0  # how long the consuming loop waited for a free slot
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(threads + max_waiting)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mmcurate-commit")
        self._futures: set[Future] = set()
        self._error: BaseException | None = None

    def merge(self, tag: str, kind: str, parts: list[str], part_bytes: list[int],
              generation: int = 0) -> list[str] | None:
        """``Ledger.commit``'s merge hook: merge small parts, leave large ones as they are."""
        if not parts_need_merge(part_bytes, self.target_bytes):
            return None
        files = self.merge_runner(self.output, tag, kind, parts, part_bytes, generation=generation)
        with self._lock:
            self.merged_files += len(files)
        return [f["name"] for f in files]

    def submit(self, progress: ShardProgress, replaces: dict[str, Any] | None = None) -> None:
        """Queue a complete shard for commit; blocks only while every slot is taken.

        Raises:
            The first error of an earlier commit (the run stops; its shard stays pending).
        """
        self._raise_if_failed()
        started = time.perf_counter()
        self._slots.acquire()
        self.blocked_s += time.perf_counter() - started
        future = self._pool.submit(self._commit, progress, replaces)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._done)

    def _commit(self, progress: ShardProgress, replaces: dict[str, Any] | None = None) -> None:
        try:
            record = self.ledger.commit(progress, self.record_info(progress), merge=self.merge, replaces=replaces)
            with self._lock:
                self.committed_tags.add(shard_tag(progress.shard))
                self.on_commit(progress, record)
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc
            raise
        finally:
            self._slots.release()

    def _done(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Wait for every submitted commit; raise the first error, if any."""
        while True:
            with self._lock:
                futures = set(self._futures)
            if not futures:
                break
            wait_futures(futures)
        self._raise_if_failed()

    def close(self, committed_before: set[str] | frozenset[str] = frozenset()) -> None:
        """Wait for every commit, stop the threads, and sweep staged leftovers of committed shards.

        Args:
            committed_before: tags of shards committed by earlier runs. A run killed after a
                shard's record was written but before its staged parts were deleted leaves
                parts no later run would otherwise look at (the shard is never pending again).
        """
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
        tags = self.committed_tags | set(committed_before)
        if tags:
            swept = self.ledger.sweep_staging(tags)
            if swept:
                logger.info("deleted %d staged leftover(s) of committed shards", swept)
