"""The run lock on a local folder and on the moto S3 server: one holder, conditional takeover."""

from __future__ import annotations

import json
import socket
import time

import pytest

from ground.errors import LockHeldError, StorageError
from pipelines.lock import RunLock
from tests.conftest import free_port


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    """An output root and its storage options, on a local folder or a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    fs, opts, bucket = request.getfixturevalue("s3")
    return f"s3://{bucket}/out", opts


def _lease(lock: RunLock) -> dict:
    lease, _ = lock.read()
    return lease


def test_a_second_run_is_refused_with_the_holder_named(out):
    path, opts = out
    first = RunLock(path, opts, "run-A", ttl_s=600)
    first.acquire()
    try:
        with pytest.raises(LockHeldError) as err:
            RunLock(path, opts, "run-B", ttl_s=600).acquire()
        msg = str(err.value)
        assert "\n" not in msg and "run run-A" in msg and socket.gethostname() in msg and "since 20" in msg
        assert _lease(first)["run_id"] == "run-A"
    finally:
        first.release()
    assert first.read() == (None, None)  # released: the next night starts cleanly
    second = RunLock(path, opts, "run-B", ttl_s=600)
    second.acquire()
    second.release()


def test_an_expired_lease_is_taken_over_and_the_old_holder_learns_it_lost(out, caplog):
    path, opts = out
    crashed = RunLock(path, opts, "run-crashed", ttl_s=0.05)
    crashed.acquire()
    crashed._stop.set()  # the process "dies": no more heartbeats (its thread exits)
    crashed._thread.join()
    time.sleep(0.2)  # let the 50 ms lease lapse (a setup step; nothing is timed)
    nxt = RunLock(path, opts, "run-next", ttl_s=600)
    nxt.acquire()
    try:
        assert _lease(nxt)["run_id"] == "run-next"
        assert any("took over the run lock (expired)" in r.getMessage() and "run-crashed" in r.getMessage()
                   for r in caplog.records)
        # The old holder wakes up: it may neither renew nor release a lease that is not its own.
        assert crashed.renew() is False and crashed.lost
        crashed.release()
        assert _lease(nxt)["run_id"] == "run-next"
    finally:
        nxt.release()


def test_break_lock_takes_a_live_lease_and_renewal_extends_ours(out):
    path, opts = out
    holder = RunLock(path, opts, "run-A", ttl_s=600)
    holder.acquire()
    breaker = RunLock(path, opts, "run-B", ttl_s=600)
    breaker.acquire(break_lock=True)
    try:
        assert _lease(breaker)["run_id"] == "run-B"
        before = _lease(breaker)["expires_at"]
        assert breaker.renew() and _lease(breaker)["expires_at"] >= before
        assert holder.renew() is False and holder.lost
    finally:
        holder.release()
        breaker.release()
    assert breaker.read() == (None, None)


def test_lease_names_run_host_pid_and_expiry(out):
    path, opts = out
    lock = RunLock(path, opts, "run-A", ttl_s=120)
    lock.acquire()
    try:
        lease = _lease(lock)
        assert {"run_id", "host", "pid", "acquired_at", "expires_at", "ttl_s"} <= set(lease)
        assert lease["expires_at"] - lease["renewed_at"] == pytest.approx(120)
        json.dumps(lease)
    finally:
        lock.release()


def test_a_live_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(out):
    """SIGKILL leaves the lease behind; on the same host a dead pid frees it without the TTL."""
    import subprocess
    import sys

    path, opts = out
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    killed = RunLock(path, opts, "run-killed", ttl_s=600)
    killed._lease = lambda: json.dumps({"run_id": "run-killed", "host": socket.gethostname(), "pid": gone.pid,
                                        "started_at": time.time(), "expires_at": time.time() + 600}).encode()
    assert killed._create()
    rerun = RunLock(path, opts, "run-again", ttl_s=600)
    rerun.acquire()
    try:
        assert _lease(rerun)["run_id"] == "run-again"
    finally:
        rerun.release()
    # A lease whose process is alive (ours) or on another host is still respected.
    other = RunLock(path, opts, "run-elsewhere", ttl_s=600)
    other._lease = lambda: json.dumps({"run_id": "run-elsewhere", "host": "another-host", "pid": gone.pid,
                                       "started_at": time.time(), "expires_at": time.time() + 600}).encode()
    assert other._create()
    with pytest.raises(LockHeldError, match="run-elsewhere"):
        RunLock(path, opts, "run-third", ttl_s=600).acquire()


def test_the_heartbeat_renews_the_lease_on_its_own_while_the_run_holds_it(out):
    path, opts = out
    lock = RunLock(path, opts, "run-long", ttl_s=0.6)  # heartbeat every 0.2 s
    lock.acquire()
    try:
        first = _lease(lock)
        deadline = time.time() + 30
        while _lease(lock)["renewed_at"] <= first["renewed_at"] and time.time() < deadline:
            time.sleep(0.05)
        later = _lease(lock)
        # Renewed without anyone calling renew(): the expiry moved on, the holder did not change.
        assert later["renewed_at"] > first["renewed_at"] and later["expires_at"] > first["expires_at"]
        assert later["run_id"] == "run-long" and not lock.lost
    finally:
        lock.release()


def test_an_output_that_cannot_be_written_is_a_storage_error_naming_the_lock(tmp_path, s3_server):
    # The lease is a run's first request to its output: an unreachable bucket or a path that
    # cannot be a folder must be a one-line storage error (CLI exit 2), not an unexplained exit 1.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=r"cannot take the run lock .*a-file/out/_mmcurate/lock") as err:
        RunLock(str(blocker / "out"), {}, "run-A", ttl_s=600).acquire()
    assert "\n" not in str(err.value)

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    opts = {"endpoint_url": dead, "key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageError, match=r"cannot take the run lock nobucket/out/_mmcurate/lock"):
        RunLock("s3://nobucket/out", opts, "run-A", ttl_s=600).acquire()
