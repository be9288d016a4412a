"""Commit path on an S3 API: requests per shard and driver seconds per shard, before and after.

Starts a moto S3 server with ``tests/faultproxy.py`` in front of it in a child process (so the
server's CPU is not charged to the driver being measured), stages N tiny shards with the real
``StagingParquetWriter`` (in a run, Ray workers do this; it is not counted), then commits them:

* before: ``pipelines/ledger.py`` as of ``--before-ref`` (git), one shard at a time in the
  consuming loop, as the old runner did;
* after: this checkout's ``Committer`` (thread pool, batched deletes).

Every HTTP request of the commit phase is counted at the proxy. It also counts ``prepare`` for a
few pending shards once N shards are committed (before: lists all output; after: by prefix).

Usage (about a minute for 1,000 shards on a busy 2-core machine)::

    PYTHONPATH=$PWD python benchmarks/bench_commit_s3.py --shards 1000 [--before-shards 150]
    PYTHONPATH=$PWD python benchmarks/bench_commit_s3.py --shards 50 --parts-per-shard 4   # merges

Timings on a shared machine against moto are noisy and moto answers in ~1-5 ms, not S3's
~10-50 ms; the request counts are exact, and README figures scale them by S3 latency.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# The commit before the new commit path (main at the start of issue 8 items 4-5).
DEFAULT_BEFORE_REF = "d00699a"


def _server(conn) -> None:
    """Child process: moto + fault proxy; answers 'mark' and ('since', n) over the pipe."""
    import socket

    from moto.server import ThreadedMotoServer

    import logging

    from tests.faultproxy import FaultProxy
    from tests.integration.test_commit_path import request_kind

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    conn.send((f"http://127.0.0.1:{port}", proxy.url))
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        if cmd == "mark":
            conn.send(len(proxy.log))
        else:
            conn.send(Counter(request_kind(m, t) for m, t, _ in proxy.log[cmd[1]:]))
    proxy.stop()
    server.stop()


class Wire:
    def __init__(self, conn):
        self.conn = conn

    def mark(self) -> int:
        self.conn.send("mark")
        return self.conn.recv()

    def since(self, n: int) -> Counter:
        self.conn.send(("since", n))
        return self.conn.recv()


def load_before_ledger(ref: str):
    """``pipelines/ledger.py`` at ``ref`` as a module (it imports only ground/, which is unchanged)."""
    source = subprocess.run(["git", "show", f"{ref}:pipelines/ledger.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "ledger_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ledger_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ledger_before"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def stage(writer, progress_cls, shards: list[str], rows: int, parts: int) -> list:
    """Write each shard's rows as ``parts`` writer batches; returns ShardProgress per shard."""
    from tests.unit.test_commit import shard_batch

    def one(shard: str):
        p = progress_cls(shard)
        per = max(1, rows // parts)
        for start in range(0, rows, per):
            n = min(per, rows - start)
            batch = shard_batch(shard, start, n, rows if start + n == rows else None, image_bytes=200, reject_every=4)
            for rec in writer(batch).to_pylist():
                p.add(rec)
        assert p.complete
        return p

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, shards))


def fmt(counter: Counter, n: int) -> str:
    return ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(counter.items())) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=20, help="rows per shard")
    ap.add_argument("--parts-per-shard", type=int, default=1, help="writer batches per shard (>1: merges)")
    ap.add_argument("--pending", type=int, default=10, help="pending shards for the prepare count")
    ap.add_argument("--before-ref", default=DEFAULT_BEFORE_REF)
    ap.add_argument("--before-shards", type=int, default=None,
                    help="shards for the old path (default --shards): its requests per shard do not "
                         "depend on how many are committed, and it is slow on a busy machine")
    ap.add_argument("--skip-before", action="store_true")
    args = ap.parse_args()

    import boto3

    from operators.writers.parquet import StagingParquetWriter, merge_shard_parts
    from pipelines.commit import Committer
    from pipelines.ledger import Ledger, ShardProgress

    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_server, args=(child,), daemon=True)
    proc.start()
    moto_url, proxy_url = parent.recv()
    wire = Wire(parent)
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="bench")
    opts = {"endpoint_url": proxy_url, "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    meta = {"pipeline": "bench"}
    results = {}

    for label in ("before", "after"):
        if label == "before" and args.skip_before:
            continue
        n = args.before_shards or args.shards if label == "before" else args.shards
        out = f"s3://bench/{label}"
        output = {"path": out, "storage_options": opts, "target_file_size_mb": 256, "compression": "zstd",
                  "compression_level": 3}
        ledger_mod = load_before_ledger(args.before_ref) if label == "before" else None
        progress_cls = ledger_mod.ShardProgress if ledger_mod else ShardProgress
        shards = [f"s3://in/{label}-{i:05d}.tar" for i in range(n)]
        t = time.perf_counter()
        staged = stage(StagingParquetWriter(output, "bench", meta), progress_cls, shards, args.rows,
                       args.parts_per_shard)
        print(f"[{label}] staged {n} shards in {time.perf_counter() - t:.1f}s", flush=True)

        mark = wire.mark()
        started = time.perf_counter()
        if ledger_mod:
            ledger = ledger_mod.Ledger(out, opts)
            for p in staged:  # the old loop: commit inline, shard by shard
                ledger.commit(p, {"run_id": "bench"})
            loop_s = wall_s = time.perf_counter() - started
        else:
            ledger = Ledger(out, opts)
            committer = Committer(ledger, output, record_info=lambda p: {"run_id": "bench"},
                                  merge_runner=merge_shard_parts)
            for p in staged:
                committer.submit(p)
            loop_s = time.perf_counter() - started  # what the consuming loop spent on commits
            committer.close()
            wall_s = time.perf_counter() - started
        sent = wire.since(mark)
        assert len(ledger.committed_tags()) == n

        # prepare for a few pending shards, with n shards committed in the output
        pending = [f"s3://in/{label}-pending-{i:03d}.tar" for i in range(args.pending)]
        mark = wire.mark()
        t = time.perf_counter()
        ledger.prepare(pending)  # after: by prefix per pending shard
        prep_s = time.perf_counter() - t
        prep = wire.since(mark)
        results[label] = dict(n=n, sent=sent, loop_s=loop_s, wall_s=wall_s, prep=prep, prep_s=prep_s)
        print(f"[{label}] commit: {sum(sent.values()) / n:.2f} requests/shard ({fmt(sent, n)}); "
              f"driver loop {1000 * loop_s / n:.2f} ms/shard; all committed after {1000 * wall_s / n:.2f} ms/shard "
              f"({n / wall_s:.0f} shards/s)", flush=True)
        print(f"[{label}] prepare for {len(pending)} pending shards with {n} committed: "
              f"{sum(prep.values())} requests ({fmt(prep, 1)}) in {prep_s:.2f}s", flush=True)
        if not ledger_mod:
            mark = wire.mark()
            ledger.prepare(pending, committed=n)  # as the runner calls it: the cheaper strategy
            print(f"[after] the same prepare told that {n} shards are committed: "
                  f"{sum(wire.since(mark).values())} requests", flush=True)

    parent.send("stop")
    proc.join(10)
    if "before" in results:
        b, a = results["before"], results["after"]
        print(f"ratio after/before: requests per shard "
              f"{sum(a['sent'].values()) / a['n'] / (sum(b['sent'].values()) / b['n']):.2f}, "
              f"driver loop s/shard {a['loop_s'] / a['n'] / (b['loop_s'] / b['n']):.3f}, commit throughput "
              f"{(a['n'] / a['wall_s']) / (b['n'] / b['wall_s']):.1f}x, prepare requests "
              f"{sum(a['prep'].values())}/{sum(b['prep'].values())}")


if __name__ == "__main__":
    main()
