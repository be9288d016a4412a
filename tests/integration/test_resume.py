"""Exactly-once: real `mmcurate run` subprocesses SIGKILLed mid-run, then rerun, equal a clean run.

Rows are compared as sorted lists with duplicates counted, each with the source image's
sha256 and a digest of the stored image bytes, so a lost row, a row published twice or a
damaged image all fail. On S3 the kills land at known points through ``tests/faultproxy.py``
(a proxy in front of the moto server holds one request until the test has killed the run):
between a shard's published files and its ledger record, in the middle of publishing, and
in the middle of reading. Kill points are keyed on requests that stay stable whatever the
publish mechanism (the ledger record PUT, any PUT under data/ or rejected/, input GETs).
The local-disk run that is killed starts its own Ray (the embedded default: the kill takes Ray
with it); the killed S3 runs join the session's Ray as drivers on a cluster do (the kill leaves
the job's workers). The rerun that must recover runs ``run()`` in this process on the session's
Ray: what it recovers from is in the output (staged files, ledger, the dead run's lock), and the
CLI around ``run()`` (its exit codes and output) is under test in test_cli and test_nightly_runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import yaml

from jobs.sample_data import make_webdataset_shards
from pipelines import config as config_mod
from pipelines.runner import run
from tests.conftest import TEST_KEY, TEST_SECRET
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import ledger_records, row_list

REPO = Path(__file__).resolve().parents[2]
# Good samples per shard; jobs.sample_data adds 4 bad ones (truncated, not an image, no image, tiny).
GOOD, BAD = 10, 4
# Small decode batches keep shard completions apart in time (resources do not change rows).
OPERATORS = [{"decode": {"resize_max_side": 96, "reencode_format": "png",
                         "resources": {"num_cpus": 1, "batch_size": 8}}},
             {"min_side": {"min": 32}}]
# A killed run must not be waited on forever on a loaded machine; generous, never asserted on.
WAIT_S = 240
# Ray gives a new node a fixed 30 s to register, which a machine shared by many jobs can miss;
# a run that dies of exactly that before doing anything is started again, this many times.
START_ATTEMPTS = 5
# Four `mmcurate run` processes each start their own Ray; on a loaded 2-core machine that
# passes the suite's default 600 s timeout (pyproject.toml), so these tests get more.
RUN_TIMEOUT_S = 1800
RAY_START_TIMEOUT = "timed out during startup"


def _write_config(path: Path, paths: list[str], out: str, in_opts: dict | None = None,
                  out_opts: dict | None = None) -> Path:
    cfg = {
        "name": "resume",
        # One shard read at a time and small batches, so commits are spread over the run and
        # the kill lands between them rather than after a burst at the end.
        "input": {"format": "webdataset", "paths": paths, "block_rows": 8, "read_concurrency": 1,
                  "storage_options": in_opts or {}},
        "output": {"path": out, "write_batch_rows": 8, "storage_options": out_opts or {}},
        "operators": OPERATORS,
        "ray": {"num_cpus": 2, "no_progress_timeout_s": 120, "object_store_memory_mb": 300},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, ray_address: str) -> subprocess.Popen:
    """``mmcurate run`` in a new process group; ``ray_address`` "local" (its own Ray, the embedded
    default) or the session Ray's address (a driver joining a running cluster, as on a head node)."""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO), RAY_ADDRESS=ray_address)
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(config), "--log-level", "WARNING"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (the driver, and the Ray it started if it started one)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _finish(config: Path) -> None:
    """The rerun after the kills: ``run()`` in this process, on the session's Ray (a fresh
    subprocess would add ~20 CPU-s of Ray workers for its new job and prove nothing more)."""
    summary = run(config_mod.load(config))
    assert summary.exit_code == 0 and not summary.failed_shards, summary


def _start_until(config: Path, reached, what: str, ray_address: str) -> subprocess.Popen:
    """Start a run and return it, still running, once ``reached()`` is true (then kill it)."""
    for attempt in range(START_ATTEMPTS):
        proc = _start(config, ray_address)
        deadline = time.time() + WAIT_S
        while not reached():
            if proc.poll() is not None:
                err = proc.stderr.read().decode()
                if RAY_START_TIMEOUT in err and attempt < START_ATTEMPTS - 1:
                    break
                pytest.fail(f"run ended before {what}: {err[-2000:]}")
            if time.time() > deadline:
                _kill(proc)
                pytest.fail(f"the run never reached {what}")
            time.sleep(0.05)
        else:
            return proc
    raise AssertionError("unreachable")


def _reference(config: Path) -> None:
    """The uninterrupted run to compare with: the same config, run in this process on the
    session's Ray (the reference is not what is under test; the killed subprocess runs are)."""
    summary = run(config_mod.load(config))
    assert not summary.failed_shards and summary.shards_committed > 0, summary


def _check_committed_output(fs, out: str, reference: list[tuple], n_shards: int) -> None:
    """The rows equal the reference; every shard committed once; no file outside a ledger record."""
    assert row_list(fs, out) == reference
    records = ledger_records(fs, out)
    assert sorted(r["shard"].rsplit("/", 1)[-1] for r in records) == [f"{i:05d}.tar" for i in range(n_shards)]
    assert all(r["rows_in"] == r["kept"] + r["rejected"] == GOOD + BAD for r in records)
    named = {f for r in records for kind in ("data", "rejected") for f in r["files"][kind]}
    fs.invalidate_cache()
    published = {p.rsplit("/", 1)[-1] for kind in ("data", "rejected")
                 for p in (fs.find(f"{out}/{kind}") if fs.exists(f"{out}/{kind}") else [])}
    assert published == named
    staging = f"{out}/_mmcurate/staging"
    assert not [p for p in (fs.find(staging) if fs.exists(staging) else []) if p.endswith(".parquet")]


def _committed(fs, out: str) -> int:
    return len(ledger_records(fs, out)) if fs.exists(f"{out}/_mmcurate/ledger") else 0


def _kill_after(config: Path, ledger: Path, at_least: int) -> int:
    """SIGKILL a run once ``at_least`` shards are committed (local disk: no proxy to hold it)."""
    count = lambda: len(list(ledger.glob("*.json"))) if ledger.exists() else 0  # noqa: E731
    proc = _start_until(config, lambda: count() >= at_least, f"{at_least} committed shard(s)", "local")
    _kill(proc)
    return count()


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_sigkill_on_local_disk_then_rerun_matches_uninterrupted_run(ray_session, tmp_path):
    n_shards = 6
    shards = tmp_path / "shards"
    make_webdataset_shards(shards, n_shards=n_shards, samples_per_shard=GOOD, seed=7)
    fs = fsspec.filesystem("file")

    # Reference: one uninterrupted run of the same config.
    ref_out = tmp_path / "ref"
    _reference(_write_config(tmp_path / "ref.yaml", [str(shards / "*.tar")], str(ref_out)))
    reference = row_list(fs, str(ref_out))
    assert len(reference) == n_shards * (GOOD + BAD)

    out = tmp_path / "out"
    config = _write_config(tmp_path / "resume.yaml", [str(shards / "*.tar")], str(out))
    killed_at = _kill_after(config, out / "_mmcurate" / "ledger", at_least=1)
    assert killed_at < n_shards, "the run finished before the kill; make it slower"
    # The killed run was the embedded default (its own Ray, killed with it); what the rerun must
    # recover is on disk.
    _finish(config)
    _check_committed_output(fs, str(out), reference, n_shards)


def _held(config: Path, rule: Rule, ray_address: str) -> subprocess.Popen:
    """Start a run; return it once it has sent the request ``rule`` holds (it cannot get past it)."""
    return _start_until(config, rule.waiting.is_set, f"a request matching {rule.method} {rule.path}", ray_address)


def _held_target(proxy: FaultProxy, rule: Rule) -> str:
    return next(target for method, target, action in proxy.log
                if action == "hold" and rule.matches(method, target))


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_sigkill_on_s3_at_ledger_publish_and_read_then_rerun_matches(ray_session, session_ray_address, s3, s3_server,
                                                                     tmp_path):
    fs, opts, bucket = s3
    n_shards = 5
    for p in make_webdataset_shards(tmp_path / "wds", n_shards=n_shards, samples_per_shard=GOOD, seed=11):
        fs.put_file(str(p), f"{bucket}/in/{p.name}")
    paths = [f"s3://{bucket}/in/*.tar"]

    # Reference: one uninterrupted run of the same config, straight to the moto server.
    _reference(_write_config(tmp_path / "ref.yaml", paths, f"s3://{bucket}/ref", opts, opts))
    reference = row_list(fs, f"{bucket}/ref")
    assert len(reference) == n_shards * (GOOD + BAD)

    # These runs join the session's Ray as a driver on a cluster's head node would: a SIGKILL
    # kills only the driver, and the workers of its job outlive it for a moment (Ray reaps them),
    # the harder case for exactly-once. (The local-disk test kills a run with its own Ray.)
    cluster = session_ray_address
    proxy = FaultProxy(s3_server)
    try:
        via_proxy = {"endpoint_url": proxy.url, "key": TEST_KEY, "secret": TEST_SECRET}
        out = f"{bucket}/out"
        config = _write_config(tmp_path / "resume.yaml", paths, f"s3://{out}", via_proxy, via_proxy)

        # 1. Between publish and ledger: hold the second shard's ledger record PUT, and every later
        # one (the committer publishes several shards in parallel: a third shard's record must not
        # slip past while the second is held).
        rule = proxy.add_rule("hold", method="PUT", path=r"_mmcurate/ledger/[^/?]+\.json", skip=1, times=None)
        proc = _held(config, rule, cluster)
        tag = re.search(r"_mmcurate/ledger/([^/?]+)\.json", _held_target(proxy, rule)).group(1)
        fs.invalidate_cache()
        published = [p for p in fs.find(f"{out}/data") if p.rsplit("/", 1)[-1].startswith(tag)]
        assert published, f"shard {tag}: its ledger record is being written but no data file is published"
        _kill(proc)
        proxy.clear()
        assert _committed(fs, out) == 1, "the held ledger record landed although its run was killed"
        assert not fs.exists(f"{out}/_mmcurate/ledger/{tag}.json")

        # 2. Mid-publish: hold the second PUT (or server-side copy) of a file under data/ or rejected/.
        rule = proxy.add_rule("hold", method="PUT", path=r"/(data|rejected)/[^?]*\.parquet", skip=1)
        proc = _held(config, rule, cluster)
        _kill(proc)
        proxy.clear()

        # 3. Mid-read: hold a ranged GET of an input shard while earlier rows are in flight.
        rule = proxy.add_rule("hold", method="GET", path=r"/in/\d+\.tar", skip=2)
        proc = _held(config, rule, cluster)
        _kill(proc)
        proxy.clear()
        assert _committed(fs, out) < n_shards, "every shard committed before the last kill"

        _finish(config)
        _check_committed_output(fs, out, reference, n_shards)
        # The held ledger PUT was dropped, never forwarded after its sender died. (Requests held
        # from Ray workers may outlive the kill of the driver's process group by a moment, so
        # only the driver's ledger PUT is counted.)
        assert [a for _, _, a in proxy.log].count("dropped") >= 1
    finally:
        proxy.stop()
