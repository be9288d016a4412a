"""fsspec helpers: one way to open, list and move objects on any filesystem.

``storage_options`` go to fsspec as given. On S3 the standard AWS chain (env vars,
``AWS_ENDPOINT_URL``, profiles, instance roles) applies when options are empty.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
from braceexpand import braceexpand

from ground.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# botocore's adaptive retry mode backs off on throttling (503 SlowDown) and 5xx errors;
# six attempts (about 20 s of backoff) ride out short brown-outs on busy buckets while an
# unreachable endpoint still fails within a minute.
S3_RETRY_CONFIG = {"retries": {"max_attempts": 6, "mode": "adaptive"}}
_GLOB_CHARS = set("*?[")


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
