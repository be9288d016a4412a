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


def published_name(tag: str, seq: int, generation: int = 0) -> str:
    """The final file name of a shard's ``seq``-th file of one kind (under ``data/`` or ``rejected/``).

    A shard redone after its input changed (``input.on_change: redo``) publishes a new
    ``generation`` under names its previous record does not use, so the record swap is atomic.
    Either way ``tag_of_file`` gives the shard's tag back.
    """
    if generation:
        return f"{tag}-g{generation}x{seq:05d}.parquet"
    return f"{tag}-{seq:05d}.parquet"


def staging_prefix(tag: str) -> str:
    """Where a shard's staged parts live until its commit (``<kind>/<run>-<id>.parquet`` below)."""
    return f"{STAGING}/{tag}"


def tag_of_file(name: str) -> str:
    """The shard tag a published file name (``<tag>-<seq>.parquet``) belongs to."""
    return posixpath.basename(name).rsplit("-", 1)[0]
