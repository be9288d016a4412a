"""One run at a time per output: a lease object ``OUT/_mmcurate/lock`` kept alive by a heartbeat.

The lease is created with a conditional write, so of two runs starting together exactly one
gets it: on S3 a PUT with ``If-None-Match: *``, locally ``O_CREAT | O_EXCL``. It holds the run
id, host, pid and an expiry; a heartbeat thread renews it every ``ttl / 3`` seconds. Only the
holder renews or releases it: on S3 each renewal is a PUT with ``If-Match: <our ETag>`` and the
release a DELETE with the same condition; locally the run id in the file is compared first.
A run that crashed (no heartbeat) leaves a lease that expires after ``output.lock_ttl_s``; the
next run takes it over, again conditionally (``If-Match`` on the expired lease's ETag, or an
atomic rename locally), so two runs cannot both take over one stale lease.

Other filesystems (GCS, Azure, ...) get the same protocol without the conditions (a warning
says so): good enough against a nightly run overlapping yesterday's, not against a race.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from ground.errors import LockHeldError, StorageError
from ground.layout import LOCK
from ground.storage import describe_error, filesystem, is_local, join

logger = logging.getLogger(__name__)


def _fmt_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def holder_is_dead_here(lease: dict[str, Any]) -> bool:
    """True when the lease was taken on this host by a process that no longer exists.

    A run killed with SIGKILL cannot release its lease; on the same host we can tell it is dead
    without waiting for the TTL, so "rerun the same command" resumes at once. A holder on
    another host is only known dead by its lease expiring.
    """
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError):
        return False
    return False


def describe_holder(lease: dict[str, Any]) -> str:
    """``run <id> on <host> (pid N) since <time>, expires <time>`` for messages."""
    return (f"run {lease.get('run_id')} on {lease.get('host')} (pid {lease.get('pid')}) since "
            f"{_fmt_time(float(lease.get('acquired_at', 0)))}, lease expires "
            f"{_fmt_time(float(lease.get('expires_at', 0)))}")


class RunLock:
    """The lease on one output root.

    Args:
        output_path: the output root (``OUT``); the lease is ``OUT/_mmcurate/lock``.
        storage_options: fsspec options for the output.
        run_id: this run's id, written into the lease and compared before renew/release.
        ttl_s: how long a lease lives without renewal.

    Attributes:
        lost: set by the heartbeat when the lease was taken from us (we were paused longer than
            the TTL and another run took over); the runner stops committing when it is set.
    """

    def __init__(self, output_path: str, storage_options: dict[str, Any] | None, run_id: str, ttl_s: float):
        self.fs, root = filesystem(output_path, storage_options or {})
        self.path = join(root, LOCK)
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        self.local = is_local(self.fs)
        self.s3 = not self.local and hasattr(self.fs, "call_s3")
        self.lost = False
        self._etag: str | None = None
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not (self.local or self.s3):
            logger.warning("%s: conditional writes are not supported on this filesystem; the run lock "
                           "cannot rule out two runs starting at the same instant", self.path)

    # -- lease content -------------------------------------------------------------
    def _lease(self) -> bytes:
        now = time.time()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired_at": self._acquired_at, "renewed_at": now, "expires_at": now + self.ttl_s,
                           "ttl_s": self.ttl_s}, sort_keys=True).encode()

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the current lease or None, its ETag on S3 or None)."""
        for _ in range(3):
            try:
                if self.local:
                    with open(self.path, "rb") as f:
                        return json.loads(f.read() or b"{}"), None
                self.fs.invalidate_cache(self.path)
                etag = self.fs.info(self.path).get("ETag")
                data = self.fs.cat_file(self.path)
                self.fs.invalidate_cache(self.path)
                if self.fs.info(self.path).get("ETag") != etag:
                    continue  # renewed between the two reads: read again
                return json.loads(data or b"{}"), etag
            except FileNotFoundError:
                return None, None
            except ValueError:
                # A half-written local lease (a crash inside the write): treat it as expired.
                return {"run_id": "?", "expires_at": 0}, None
        raise StorageError(f"{self.path}: the lock changes faster than it can be read")

    # -- conditional writes ----------------------------------------------------------
    def _create(self) -> bool:
        """Create the lease if there is none. True if we got it."""
        data = self._lease()
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except FileExistsError:
                return False
            except OSError as exc:
                if _precondition_failed(exc) or "ConditionalRequestConflict" in str(exc):
                    return False
                raise
            self._etag = out.get("ETag")
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, data)
        return True

    def _replace(self, expected_etag: str | None, expected_run_id: str | None) -> bool:
        """Overwrite the lease only if it is still the one we saw. True on success."""
        data = self._lease()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=expected_etag)
            except (FileNotFoundError, FileExistsError):
                return False
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                raise
            self._etag = out.get("ETag")
            return True
        current, _ = self.read()
        if current is None or current.get("run_id") != expected_run_id:
            return False
        if self.local:
            tmp = f"{self.path}.{self.run_id}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, data)
        return True

    def _take_over(self, stale: dict[str, Any], etag: str | None) -> bool:
        """Replace an expired (or broken-on-purpose) lease; only one contender wins."""
        if self.local:
            aside = f"{self.path}.stale-{self.run_id}"
            try:
                os.rename(self.path, aside)  # atomic: a second contender finds nothing to rename
            except FileNotFoundError:
                return False
            try:
                os.remove(aside)
            except OSError:
                pass
            return self._create()
        if self.s3:
            return self._replace(etag, None)
        self.fs.rm(self.path)
        return self._create()

    # -- public ----------------------------------------------------------------------
    def acquire(self, break_lock: bool = False) -> None:
        """Take the lease (or raise). Starts the heartbeat.

        Args:
            break_lock: take the lease even if another run holds it (an operator's decision,
                e.g. after a host died without its lease expiring yet). Logged as a warning.

        Raises:
            LockHeldError: another run holds a live lease; the message names it.
            StorageError: the output cannot be written (unreachable bucket, denied, not a folder):
                the first request of every run, so this is where a bad output is named.
        """
        try:
            self._acquire(break_lock)
        except (LockHeldError, StorageError):
            raise
        except Exception as exc:  # noqa: BLE001 - only storage calls here: any backend fault is systemic
            raise StorageError(f"cannot take the run lock {self.path}: {describe_error(exc)}") from None
        logger.info("run lock %s held by run %s (ttl %.0fs)", self.path, self.run_id, self.ttl_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="mmcurate-lock-heartbeat", daemon=True)
        self._thread.start()

    def _acquire(self, break_lock: bool) -> None:
        self._acquired_at = time.time()
        for _ in range(5):
            if self._create():
                break
            lease, etag = self.read()
            if lease is None:
                continue  # released between our attempt and the read: try again
            expired = float(lease.get("expires_at", 0)) < time.time()
            dead = holder_is_dead_here(lease)
            if not (expired or dead or break_lock):
                raise LockHeldError(f"output is locked by {describe_holder(lease)}; wait for it, or run with "
                                    f"--break-lock if that run is dead ({self.path})")
            why = "expired" if expired else ("its process is gone" if dead else "broken with --break-lock")
            if self._take_over(lease, etag):
                logger.warning("took over the run lock (%s) from %s", why, describe_holder(lease))
                break
        else:
            raise LockHeldError(f"could not take the run lock at {self.path}: other runs keep taking it")

    def renew(self) -> bool:
        """Extend our lease. False (and ``lost`` set) when it is no longer ours."""
        ok = self._replace(self._etag, self.run_id)
        if not ok:
            self.lost = True
            lease, _ = self.read()
            logger.error("run lock lost: now held by %s", describe_holder(lease) if lease else "nobody")
        return ok

    def _heartbeat(self) -> None:
        interval = max(self.ttl_s / 3.0, 0.05)
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the TTL has slack
                logger.warning("run lock renewal failed (%s); retrying", describe_error(exc))

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.lost:
            return
        try:
            if self.s3:
                bucket, key, _ = self.fs.split_path(self.path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
                self.fs.invalidate_cache(self.path)
                return
            lease, _ = self.read()
            if lease and lease.get("run_id") == self.run_id:
                if self.local:
                    os.remove(self.path)
                else:
                    self.fs.rm(self.path)
        except Exception as exc:  # noqa: BLE001 - an unreleased lease only expires later
            logger.warning("could not release the run lock %s (%s); it expires in %.0fs",
                           self.path, describe_error(exc), self.ttl_s)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _precondition_failed(exc: BaseException) -> bool:
    # s3fs maps 412 PreconditionFailed to OSError(EINVAL, "At least one of the pre-conditions ...").
    return getattr(exc, "errno", None) == errno.EINVAL or "pre-condition" in str(exc).lower()
