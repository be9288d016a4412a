"""The ledger and publish step of the exactly-once commit loop.

A shard is committed when its ledger record exists; nothing else counts. Publishing moves
a shard's staged files to their final names (rename locally, copy+delete on S3) and writes
the ledger record last. A rerun skips committed shards and first deletes every staged or
published file of the shards it is about to redo, so a kill at any moment followed by a
rerun yields exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ground.errors import AccountingError
from ground.layout import FAILURES, KINDS, LEDGER, QUARANTINE, REPLACED, STAGING, shard_tag, tag_of_file
from ground.schema import MARKER_END, MARKER_FAILED
from operators.readers.base import rows_lost_of
from ground.storage import filesystem, is_local, join, retry

logger = logging.getLogger(__name__)


@dataclass
class ShardProgress:
    """What the driver has heard about one shard from the writer's file records."""

    shard: str
    rows: int = 0
    rows_in: int | None = None
    damage: str | None = None
    failed: str | None = None  # why the read failed; a failed shard is never committed
    files: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)

    def add(self, rec: dict[str, Any]) -> None:
        marker = rec.get("shard_marker")
        if marker == MARKER_FAILED:
            self.failed = rec.get("shard_damage") or "read failed"
            return
        if marker == MARKER_END:
            self.rows_in = rec["shard_rows"] if rec.get("shard_rows") is not None else 0
            self.damage = rec.get("shard_damage") or self.damage
            return
        self.rows += rec["rows"]
        self.files[rec["kind"]].append(rec["path"])
        self.counts[rec["kind"]] += rec["rows"]
        self.reasons.update(json.loads(rec["reasons"] or "{}"))
        if rec.get("shard_rows") is not None:
            self.rows_in = rec["shard_rows"]
        if rec.get("shard_damage"):
            self.damage = rec["shard_damage"]

    @property
    def complete(self) -> bool:
        if self.failed:
            return False
        if self.rows_in is not None and self.rows > self.rows_in:
            raise AccountingError(
                f"shard {self.shard}: {self.rows} rows written but the reader counted {self.rows_in} "
                "(a task was retried after emitting rows); rerun to redo this shard")
        return self.rows_in is not None and self.rows == self.rows_in


class Ledger:
    """Reads and writes ``OUT/_mmcurate/ledger`` and moves files out of staging."""

    def __init__(self, output_path: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = filesystem(output_path, storage_options or {})
        self._local = is_local(self.fs)

    def _p(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _ls(self, path: str) -> list[str]:
        try:
            return [p if isinstance(p, str) else p["name"] for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def committed_tags(self) -> set[str]:
        self.fs.invalidate_cache()
        return {p.rsplit("/", 1)[-1][: -len(".json")] for p in self._ls(self._p(LEDGER)) if p.endswith(".json")}

    def records(self) -> list[dict[str, Any]]:
        """Every ledger record (reads one small JSON per committed shard)."""
        out = []
        for p in sorted(self._ls(self._p(LEDGER))):
            if p.endswith(".json"):
                with self.fs.open(p, "rb") as f:
                    out.append(json.load(f))
        return out

    def record(self, shard: str) -> dict[str, Any] | None:
        """The ledger record of one shard, or None if it is not committed."""
        try:
            with self.fs.open(self._p(LEDGER, f"{shard_tag(shard)}.json"), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def prepare(self, pending: list[str], keep: set[str] | None = None) -> int:
        """Delete staged and published files of shards about to be (re)done. Returns files removed.

        Args:
            pending: shards this run will write.
            keep: published file names to leave alone: the files of committed shards being
                redone (``input.on_change: redo``) stay visible until the new record replaces them.
        """
        tags = {shard_tag(s) for s in pending}
        keep = keep or set()
        removed = 0
        for kind in KINDS:
            for p in self._ls(self._p(kind)):
                if tag_of_file(p) in tags and p.rsplit("/", 1)[-1] not in keep:
                    retry(lambda p=p: self.fs.rm(p), f"delete {p}")
                    removed += 1
        for p in self._ls(self._p(STAGING)):
            if p.rstrip("/").rsplit("/", 1)[-1] in tags:
                retry(lambda p=p: self.fs.rm(p, recursive=True), f"delete {p}")
                removed += 1
        if removed:
            logger.info("removed %d leftover file(s)/folder(s) of %d pending shard(s)", removed, len(tags))
        return removed

    def commit(self, progress: ShardProgress, info: dict[str, Any],
               replaces: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish a complete shard's files, then write its ledger record (last).

        Args:
            replaces: the shard's current ledger record when it is being redone. New files get
                names the old record does not use; the old files are deleted only after the new
                record is written, so readers see the old rows or the new ones, never both.
        """
        tag = shard_tag(progress.shard)
        generation = int((replaces or {}).get("generation") or 0) + 1 if replaces else 0
        kept, rejected = progress.counts["data"], progress.counts["rejected"]
        rows_in = progress.rows_in if progress.rows_in is not None else 0
        if rows_in != kept + rejected:
            raise AccountingError(f"shard {progress.shard}: rows_in={rows_in} != kept={kept} + rejected={rejected}")
        published: dict[str, list[str]] = {}
        for kind in KINDS:
            published[kind] = []
            if progress.files[kind] and self._local:
                self.fs.makedirs(self._p(kind), exist_ok=True)
            for seq, src in enumerate(sorted(progress.files[kind])):
                name = f"{tag}-{seq:05d}.parquet" if not generation else f"{tag}-g{generation}x{seq:05d}.parquet"
                dst = self._p(kind, name)
                retry(lambda s=src, d=dst: self.fs.mv(s, d), f"publish {src}")
                published[kind].append(dst.rsplit("/", 1)[-1])
        record = {
            "shard": progress.shard, "tag": tag, "rows_in": rows_in, "kept": kept, "rejected": rejected,
            "rejected_by_reason": dict(sorted(progress.reasons.items())), "damage": progress.damage,
            "files": published, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info,
        }
        if progress.damage:
            record["rows_lost"] = rows_lost_of(progress.damage)
        if generation:
            record["generation"] = generation
            # Written before the swap: a crash after it still gets the old files deleted next run.
            self._write_json(self._p(REPLACED, f"{tag}.json"),
                             {"shard": progress.shard, "files": replaces.get("files") or {}})
        self._write_json(self._p(LEDGER, f"{tag}.json"), record)
        try:
            self.fs.rm(self._p(STAGING, tag), recursive=True)
        except FileNotFoundError:
            pass
        if generation:
            self.finish_replacement(tag)
        return record

    def finish_replacement(self, tag: str) -> None:
        """Delete the old files of a redone shard that its current ledger record no longer names."""
        note = self._read_json(self._p(REPLACED, f"{tag}.json"))
        if note is None:
            return
        current = self._read_json(self._p(LEDGER, f"{tag}.json")) or {}
        named = {n for names in (current.get("files") or {}).values() for n in names}
        for kind, names in (note.get("files") or {}).items():
            for old in set(names) - named:
                try:
                    retry(lambda o=old, k=kind: self.fs.rm(self._p(k, o)), f"delete replaced {old}")
                except FileNotFoundError:
                    pass
        self.fs.rm(self._p(REPLACED, f"{tag}.json"))

    def finish_replacements(self) -> int:
        """Complete redo swaps a crash interrupted (``OUT/_mmcurate/replaced``). Returns how many."""
        notes = [p for p in self._ls(self._p(REPLACED)) if p.endswith(".json")]
        for p in notes:
            self.finish_replacement(p.rsplit("/", 1)[-1][: -len(".json")])
        return len(notes)

    def _write_json(self, path: str, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        if self._local:
            # Local: write then rename so a crash never leaves half a record.
            tmp = path + ".tmp"
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:  # an object PUT is atomic
            retry(lambda: self.fs.pipe_file(path, data), f"write {path}")

    def write_json(self, rel: str, obj: dict[str, Any]) -> None:
        self._write_json(self._p(rel), obj)

    def write_text(self, rel: str, text: str) -> None:
        path = self._p(rel)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        retry(lambda: self.fs.pipe_file(path, text.encode()), f"write {path}")

    # -- failures and quarantine ------------------------------------------------------
    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def failure_record(self, shard: str) -> dict[str, Any] | None:
        """The failure count of a pending shard (``OUT/_mmcurate/failures/<tag>.json``), if any."""
        return self._read_json(self._p(FAILURES, f"{shard_tag(shard)}.json"))

    def record_failure(self, shard: str, message: str, run_id: str) -> int:
        """Count one more consecutive failed run for ``shard``; returns the new count."""
        prev = self.failure_record(shard) or {}
        count = int(prev.get("consecutive_failures", 0)) + 1
        self._write_json(self._p(FAILURES, f"{shard_tag(shard)}.json"), {
            "shard": shard, "consecutive_failures": count, "last_error": message, "last_run_id": run_id,
            "first_failed_at": prev.get("first_failed_at") or _now(), "last_failed_at": _now()})
        return count

    def clear_failure(self, shard: str) -> None:
        """Forget a shard's failures (it committed)."""
        try:
            self.fs.rm(self._p(FAILURES, f"{shard_tag(shard)}.json"))
        except FileNotFoundError:
            pass

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Quarantine records by shard URL."""
        self.fs.invalidate_cache()
        out = {}
        for p in self._ls(self._p(QUARANTINE)):
            if p.endswith(".json"):
                rec = self._read_json(p)
                if rec:
                    out[rec["shard"]] = rec
        return out

    def quarantine(self, shard: str, failure: dict[str, Any]) -> None:
        """Skip ``shard`` in later runs until ``--retry-quarantined``; the record says why."""
        self._write_json(self._p(QUARANTINE, f"{shard_tag(shard)}.json"), {**failure, "quarantined_at": _now()})

    def release(self, shard: str) -> None:
        """Take a shard out of quarantine (it is retried; its failure count restarts)."""
        for folder in (QUARANTINE, FAILURES):
            try:
                self.fs.rm(self._p(folder, f"{shard_tag(shard)}.json"))
            except FileNotFoundError:
                pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
