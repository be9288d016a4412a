"""Names of things under the output root (DESIGN.md "Exactly-once output")."""

from __future__ import annotations

import hashlib
import posixpath
import re

DATA = "data"
REJECTED = "rejected"
META_DIR = "_mmcurate"
LEDGER = f"{META_DIR}/ledger"
RUNS = f"{META_DIR}/runs"
STAGING = f"{META_DIR}/staging"
FAILURES = f"{META_DIR}/failures"      # <tag>.json: consecutive failed runs of a pending shard
QUARANTINE = f"{META_DIR}/quarantine"  # <tag>.json: shards skipped until --retry-quarantined
LOCK = f"{META_DIR}/lock"              # the run lease: one run at a time per output
REPLACED = f"{META_DIR}/replaced"      # <tag>.json: old files of a redone shard, deleted after its record swap
KINDS = (DATA, REJECTED)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def shard_tag(shard_url: str) -> str:
    """A stable, filename-safe id for a shard: readable stem + hash of the full URL.

    Every file and the ledger record of a shard start with its tag, so a rerun finds
    what an interrupted run left by prefix.
    """
    path, _, fragment = shard_url.partition("#")
    stem = posixpath.basename(path.rstrip("/")).split(".")[0] or "shard"
    if fragment:
        stem += "-" + fragment.rsplit("=", 1)[-1]
    stem = _UNSAFE.sub("_", stem)[:60]
    digest = hashlib.sha1(shard_url.encode()).hexdigest()[:12]
    return f"{stem}-{digest}"


def tag_of_file(name: str) -> str:
    """The shard tag a published file name (``<tag>-<seq>.parquet``) belongs to."""
    return posixpath.basename(name).rsplit("-", 1)[0]
