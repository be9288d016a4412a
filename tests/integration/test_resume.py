"""Exactly-once: a real `mmcurate run` subprocess SIGKILLed mid-run, then rerun, equals a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import yaml

from jobs.sample_data import make_webdataset_shards
from pipelines.runner import run
from tests.helpers import ledger_records, make_config, row_set

N_SHARDS = 10
REPO = Path(__file__).resolve().parents[2]
# Small decode batches keep shard completions apart in time (resources do not change rows).
OPERATORS = [{"decode": {"resize_max_side": 96, "reencode_format": "png",
                         "resources": {"num_cpus": 1, "batch_size": 8}}},
             {"min_side": {"min": 32}}]


def _write_config(path: Path, shards: Path, out: Path) -> Path:
    cfg = {
        "name": "resume",
        # One shard read at a time and small batches, so commits are spread over the run and
        # the kill lands between them rather than after a burst at the end.
        "input": {"format": "webdataset", "paths": [str(shards / "*.tar")], "block_rows": 8,
                  "read_concurrency": 1},
        "output": {"path": str(out), "write_batch_rows": 8},
        "operators": OPERATORS,
        "ray": {"num_cpus": 2, "no_progress_timeout_s": 120, "object_store_memory_mb": 300},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(config), "--log-level", "WARNING"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _kill_after(proc: subprocess.Popen, ledger: Path, at_least: int, timeout: float = 240) -> int:
    """SIGKILL the run's whole process group once ``at_least`` shards are committed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = len(list(ledger.glob("*.json"))) if ledger.exists() else 0
        if n >= at_least:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return n
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("no shard committed in time")


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_uninterrupted_run(ray_session, tmp_path):
    shards = tmp_path / "shards"
    make_webdataset_shards(shards, n_shards=N_SHARDS, samples_per_shard=40, seed=7)
    fs = fsspec.filesystem("file")

    # Reference: one uninterrupted run (in-process, on the session's Ray).
    ref_out = tmp_path / "ref"
    run(make_config([str(shards / "*.tar")], str(ref_out), operators=OPERATORS))
    reference = row_set(fs, str(ref_out))
    assert len(reference) == N_SHARDS * (40 + 4)

    out = tmp_path / "out"
    config = _write_config(tmp_path / "resume.yaml", shards, out)
    ledger = out / "_mmcurate" / "ledger"

    killed_at = _kill_after(_start(config), ledger, at_least=1)
    assert killed_at < N_SHARDS, "the run finished before the kill; make it slower"
    # Kill the rerun too, later in the run, then let a third run finish.
    killed_again = _kill_after(_start(config), ledger, at_least=killed_at + 1)
    final = _start(config)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()[-2000:]

    assert row_set(fs, str(out)) == reference
    records = ledger_records(fs, str(out))
    assert len(records) == N_SHARDS
    assert all(r["rows_in"] == r["kept"] + r["rejected"] == 44 for r in records)
    # No file left in staging, and no published file outside a ledger record.
    named = {f for r in records for kind in ("data", "rejected") for f in r["files"][kind]}
    on_disk = {p.name for kind in ("data", "rejected") for p in (out / kind).glob("*.parquet")}
    assert on_disk == named
    assert not list((out / "_mmcurate" / "staging").rglob("*.parquet"))
    assert killed_at >= 1 and killed_again > killed_at
    print(f"killed after {killed_at} and {killed_again} of {N_SHARDS} committed shards")
