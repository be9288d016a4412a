"""fsspec helpers: one way to open, list and move objects on any filesystem.

``storage_options`` go to fsspec as given. On S3 the standard AWS chain (env vars,
``AWS_ENDPOINT_URL``, profiles, instance roles) applies when options are empty.
"""

from __future__ import annotations

import glob as _glob
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
from braceexpand import braceexpand

from ground.errors import StorageError, TransientStorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# botocore's adaptive retry mode backs off on throttling (503 SlowDown) and 5xx errors;
# six attempts (about 20 s of backoff) ride out short brown-outs on busy buckets while an
# unreachable endpoint still fails within a minute.
S3_RETRY_CONFIG = {"retries": {"max_attempts": 6, "mode": "adaptive"}}
_GLOB_CHARS = set("*?[")
# Our own read retries sit on top of botocore's and s3fs's: a reset or timeout that outlasts
# theirs gets a fresh connection at the same byte offset. Five attempts with 0.5 s doubling
# backoff (about 15 s in all) ride out a flapping link; a dead endpoint still fails the shard
# quickly enough for the in-run shard retries to try again later.
READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.5
# Errors that are the object's answer, not the network's: retrying them cannot help.
_PERMANENT_OPEN_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _with_defaults(protocol: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    opts = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        cfg = dict(opts.get("config_kwargs") or {})
        # a copy: botocore writes total_max_attempts into the dict it is given
        cfg.setdefault("retries", dict(S3_RETRY_CONFIG["retries"]))
        opts["config_kwargs"] = cfg
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for a URL or local path."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        return fsspec.core.url_to_fs(url, **_with_defaults(protocol, storage_options or {}))
    except (ImportError, ValueError, TypeError) as exc:
        raise StorageError(f"{url}: cannot open filesystem ({exc})") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The canonical URL of ``path`` on ``fs``: plain absolute path locally, scheme://... elsewhere."""
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def describe_error(exc: BaseException) -> str:
    """A short message for a storage exception (no credentials in it)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:300]


def expand_paths(patterns: Iterable[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand brace ranges ({00000..00099}) and globs into a sorted, de-duplicated list of URLs.

    Raises:
        StorageError: the filesystem is unreachable, or a pattern matches nothing.
    """
    urls: list[str] = []
    # One LIST per parent folder instead of one HEAD per shard: {00000..99999} over S3
    # would otherwise cost 100k requests before the run starts.
    listings: dict[str, set[str]] = {}
    for pattern in patterns:
        for item in braceexpand(pattern):
            fs, path = filesystem(item, storage_options)
            try:
                if _GLOB_CHARS & set(path):
                    matches = sorted(fs.glob(path))
                    if not matches:
                        raise StorageError(f"input path {item!r} matches no file")
                    urls.extend(to_url(fs, m) for m in matches)
                else:
                    parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""
                    key = f"{fs.protocol}:{parent}"
                    if key not in listings:
                        try:
                            listings[key] = {p.rstrip("/") for p in fs.ls(parent, detail=False)} if parent else set()
                        except FileNotFoundError:
                            listings[key] = set()
                    if path.rstrip("/") not in listings[key] and not fs.exists(path):
                        raise StorageError(f"input path {item!r} does not exist")
                    urls.append(to_url(fs, path))
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - any backend fault is systemic here
                raise StorageError(f"input path {item!r}: {describe_error(exc)}") from None
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run ``fn`` with exponential backoff on transient errors (OSError, timeouts)."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, TimeoutError) as exc:
            if i == attempts - 1:
                raise StorageError(f"{what}: {describe_error(exc)}") from None
            delay = base_delay * 2**i * (1 + random.random())
            logger.warning("%s failed (%s); retrying in %.1fs", what, describe_error(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def local_glob(pattern: str) -> list[str]:
    return sorted(_glob.glob(pattern))


class ResumableFile(io.RawIOBase):
    """A read-only, seekable file that survives transient read errors by re-opening at its offset.

    ``read`` errors (resets, timeouts, cut bodies that s3fs's own retries did not absorb) close
    the underlying file, wait with exponential backoff and re-open the object at the byte where
    the stream broke, so callers (tarfile, pyarrow) see one unbroken stream.

    Raises:
        FileNotFoundError, PermissionError: the object is gone or denied (never retried).
        TransientStorageError: still failing after ``attempts`` tries; names the URL and offset.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, attempts: int = READ_ATTEMPTS,
                 base_delay: float = READ_BACKOFF_S):
        super().__init__()
        self._fs, self._path = fs, path
        self._attempts, self._base_delay = max(1, attempts), base_delay
        self._pos = 0
        self._size: int | None = None
        self._f = None
        self.reopens = 0
        self._with_retries(self._ensure_open, "open")

    def _ensure_open(self) -> None:
        if self._f is None:
            self._f = self._fs.open(self._path, "rb")
            if self._pos:
                self._f.seek(self._pos)

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass

    def _with_retries(self, fn: Callable[[], T], what: str) -> T:
        for i in range(self._attempts):
            try:
                self._ensure_open()
                return fn()
            except _PERMANENT_OPEN_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - resets surface as OSError, aiohttp or botocore errors
                self._drop()
                if i == self._attempts - 1:
                    raise TransientStorageError(
                        f"{to_url(self._fs, self._path)}: {what} failed at byte {self._pos} after "
                        f"{self._attempts} attempts ({describe_error(exc)})") from None
                delay = self._base_delay * 2**i
                logger.warning("%s: %s failed at byte %d (%s); re-opening in %.1fs", self._path, what,
                               self._pos, describe_error(exc), delay)
                self.reopens += 1
                time.sleep(delay)
        raise AssertionError("unreachable")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        if self._size is None:
            self._size = int(self._with_retries(lambda: self._fs.size(self._path), "size"))
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self.size()
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        if offset != self._pos:
            self._pos = offset
            if self._f is not None:
                try:
                    self._f.seek(offset)
                except Exception:  # noqa: BLE001 - re-opened at the new offset on next read
                    self._drop()
        return self._pos

    def read(self, size: int = -1) -> bytes:
        def once() -> bytes:
            return self._f.read(size)

        data = self._with_retries(once, "read")
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def is_permanent_open_error(exc: BaseException) -> bool:
    """True for errors that are the object's own answer (gone, denied), not a network fault."""
    return isinstance(exc, _PERMANENT_OPEN_ERRORS)
