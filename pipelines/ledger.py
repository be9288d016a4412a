"""The ledger and publish step of the exactly-once commit loop.

A shard is committed when its ledger record exists; nothing else counts. Publishing puts a
shard's files under their final names (parts merged into few large files by a Ray task, or a
single large part copied/renamed as it is), then the ledger record is written last, then the
staged parts are deleted in one batched request. A rerun skips committed shards and first
deletes every staged or published file of the shards it is about to redo (found by prefix, per
pending shard), so a kill at any moment followed by a rerun yields exactly the rows of an
uninterrupted run.

Readers: between a crash and the rerun, ``data/`` may hold files of a shard that has no ledger
record yet. Readers that must never see them read the files named in the ledger records.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ground.errors import AccountingError
from ground.layout import (FAILURES, KINDS, LEDGER, QUARANTINE, REPLACED, STAGING, published_name, shard_tag,
                           staging_prefix, tag_of_file)
from ground.schema import MARKER_END, MARKER_FAILED
from operators.readers.base import rows_lost_of
from ground.storage import filesystem, is_local, join, retry

logger = logging.getLogger(__name__)

# Listings that ``prepare`` runs at once (three small prefix LISTs per pending shard); s3fs keeps
# 10 connections per client by default, so more threads would only queue.
PREPARE_THREADS = 8

# ``merge(tag, kind, parts, part_bytes, generation)`` publishes a shard's parts of one kind and returns the
# final file names, or None to publish the parts as they are.
MergeFn = Callable[[str, str, list[str], list[int], int], "list[str] | None"]


@dataclass
class ShardProgress:
    """What the driver has heard about one shard from the writer's file records."""

    shard: str
    rows: int = 0
    rows_in: int | None = None
    damage: str | None = None
    failed: str | None = None  # why the read failed; a failed shard is never committed
    files: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    part_bytes: dict[str, int] = field(default_factory=dict)  # staged path -> size
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
        self.part_bytes[rec["path"]] = rec.get("bytes") or 0
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


def _listing_requests(committed: int) -> float:
    """Estimated LIST pages for all of data/, rejected/ and staging/ with ``committed`` shards.

    S3 returns 1,000 keys a page; a committed shard has about one file per kind (few, large
    files), so two keys per shard, plus a page for staging/ (only in-flight leftovers).
    """
    return 2 * committed / 1000 + len(KINDS) + 1


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

    def _files_with_prefix(self, folder: str, prefix: str) -> list[str]:
        """Files directly in ``folder`` whose names start with ``prefix``: one prefix LIST on S3/GCS."""
        if self._local:
            return [p for p in self._ls(folder) if p.rsplit("/", 1)[-1].startswith(prefix)]
        try:
            return sorted(self.fs.find(folder, prefix=prefix))
        except TypeError:  # a backend without server-side prefixes: list the folder
            return [p for p in self._ls(folder) if p.rsplit("/", 1)[-1].startswith(prefix)]
        except FileNotFoundError:
            return []

    def _find(self, folder: str) -> list[str]:
        try:
            return sorted(self.fs.find(folder))
        except FileNotFoundError:
            return []

    def leftovers(self, shard: str) -> tuple[list[str], list[str]]:
        """(published files, staged parts) that exist for a shard, found by its tag prefix."""
        tag = shard_tag(shard)
        published = [p for kind in KINDS for p in self._files_with_prefix(self._p(kind), f"{tag}-")
                     if tag_of_file(p) == tag]
        if self._local:
            return published, self._find(self._p(staging_prefix(tag)))
        # A prefix listing of staging/ rather than find(staging/<tag>): find on a missing folder
        # costs a HEAD and a second LIST to tell "empty" from "absent".
        try:
            staged = sorted(self.fs.find(self._p(STAGING), prefix=f"{tag}/"))
        except TypeError:  # a backend without server-side prefixes
            staged = self._find(self._p(staging_prefix(tag)))
        except FileNotFoundError:
            staged = []
        return published, staged

    def _leftovers_by_listing(self, tags: set[str]) -> tuple[list[str], list[str]]:
        """(published, staged) files of ``tags`` from one listing of each output folder."""
        published = [p for kind in KINDS for p in self._find(self._p(kind)) if tag_of_file(p) in tags]
        base = self._p(STAGING)
        staged = [p for p in self._find(base) if p[len(base) + 1:].split("/", 1)[0] in tags]
        return published, staged

    def remove(self, paths: list[str]) -> None:
        """Delete files in batches (S3: one DeleteObjects per 1,000 keys)."""
        if not paths:
            return
        if self._local:
            for p in paths:
                try:
                    self.fs.rm(p)
                except FileNotFoundError:
                    pass
            return
        retry(lambda: self.fs.rm(list(paths)), f"delete {len(paths)} file(s) under {self.root}")

    def prepare(self, pending: list[str], committed: int | None = None, keep: set[str] | None = None) -> int:
        """Delete staged and published files of shards about to be (re)done. Returns files removed.

        ``keep`` names published files to leave alone: the files of committed shards being redone
        (``input.on_change: redo``) stay visible until the new record replaces them.

        Cost is proportional to the pending shards, not to the output: three prefix listings per
        pending shard (``data/<tag>-``, ``rejected/<tag>-``, ``staging/<tag>/``), run in parallel,
        then batched deletes. When ``committed`` (shards already in the ledger) says the whole
        output lists in fewer requests (a first night: 10,000 pending, nothing committed), it
        lists ``data/``, ``rejected/`` and ``staging/`` once instead. Published files go first, so
        a kill in between leaves staged parts for the next rerun to find, never the reverse.
        """
        self.fs.invalidate_cache()
        if not pending:
            return 0
        if self._local or (committed is not None and _listing_requests(committed) < 3 * len(pending)):
            published, staged = self._leftovers_by_listing({shard_tag(s) for s in pending})
        else:
            with ThreadPoolExecutor(PREPARE_THREADS) as pool:
                found = list(pool.map(self.leftovers, pending))
            published = [p for pub, _ in found for p in pub]
            staged = [p for _, stg in found for p in stg]
        keep = keep or set()
        published = [p for p in published if p.rsplit("/", 1)[-1] not in keep]
        self.remove(published)
        self.remove(staged)
        if self._local:
            for shard in pending:
                folder = self._p(staging_prefix(shard_tag(shard)))
                if self.fs.exists(folder):
                    self.fs.rm(folder, recursive=True)
        removed = len(published) + len(staged)
        if removed:
            logger.info("removed %d leftover file(s) of %d pending shard(s)", removed, len(pending))
        return removed

    def commit(self, progress: ShardProgress, info: dict[str, Any], merge: MergeFn | None = None,
               replaces: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish a complete shard's files, then write its ledger record (last), then drop its parts.

        Args:
            progress: the shard's staged parts and counts.
            info: extra fields of the ledger record (run id, config hash, fingerprint).
            merge: merges parts into final files (``pipelines.commit`` runs it as a Ray task);
                None publishes every part as one file.
            replaces: the shard's current ledger record when it is being redone. New files get
                names the old record does not use (a new generation); the old files are deleted
                only after the new record is written, so readers see the old rows or the new
                ones, never both.

        Requests on S3 per shard: the merge's own reads and writes (or one copy per part when
        parts are published as they are), one PUT for the record, one DeleteObjects for the
        parts. None of it depends on how much is already committed.
        """
        tag = shard_tag(progress.shard)
        generation = int((replaces or {}).get("generation") or 0) + 1 if replaces else 0
        kept, rejected = progress.counts["data"], progress.counts["rejected"]
        rows_in = progress.rows_in if progress.rows_in is not None else 0
        if rows_in != kept + rejected:
            raise AccountingError(f"shard {progress.shard}: rows_in={rows_in} != kept={kept} + rejected={rejected}")
        published: dict[str, list[str]] = {}
        staged: list[str] = []
        for kind in KINDS:
            parts = sorted(progress.files[kind])
            staged += parts
            names = merge(tag, kind, parts, [progress.part_bytes.get(p, 0) for p in parts], generation) \
                if merge is not None and parts else None
            if names is None:
                names = self._publish_as_is(tag, kind, parts, generation)
            published[kind] = names
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
        # The commit point: until this PUT lands the shard is pending and a rerun redoes it.
        self._write_json(self._p(LEDGER, f"{tag}.json"), record)
        try:
            if self._local:
                self.fs.rm(self._p(staging_prefix(tag)), recursive=True)
            else:
                self.remove(staged)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - the shard is committed; a leftover part is garbage
            logger.warning("shard %s committed, but its staged parts were not deleted: %s", progress.shard, exc)
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

    def _publish_as_is(self, tag: str, kind: str, parts: list[str], generation: int = 0) -> list[str]:
        """Each part becomes one final file: a rename locally, a server-side copy on S3.

        On S3 the parts stay in staging until the record is written (``commit`` deletes them in
        one batch), so a kill before the record leaves the staged parts for the rerun to find.
        """
        names = []
        if parts and self._local:
            self.fs.makedirs(self._p(kind), exist_ok=True)
        for seq, src in enumerate(parts):
            dst = self._p(kind, published_name(tag, seq, generation))
            if self._local:
                retry(lambda s=src, d=dst: self.fs.mv(s, d), f"publish {src}")
            else:
                # cp_file, not copy: copy first asks whether source and target are folders (two LISTs).
                retry(lambda s=src, d=dst: self.fs.cp_file(s, d), f"publish {src}")
            names.append(published_name(tag, seq, generation))
        return names

    def sweep_staging(self, tags: set[str]) -> int:
        """Delete staged leftovers of committed shards (parts of retried writer tasks).

        One listing of ``staging/``, which holds only in-flight and leftover parts (committed
        shards' parts are deleted at commit), so the cost does not grow with the output.
        """
        root = self._p(STAGING)
        if self._local:
            # Local folders outlive their files (a kill inside a commit's rm(recursive) can leave an
            # emptied one): each committed shard's folder goes whole.
            try:
                folders = [f for f in self.fs.ls(root, detail=False) if f.rstrip("/").rsplit("/", 1)[-1] in tags]
            except FileNotFoundError:
                return 0
            swept = 0
            for folder in folders:
                swept += len(self._find(folder))
                self.fs.rm(folder, recursive=True)
            return swept
        leftovers = [p for p in self._find(root) if p[len(root) + 1:].split("/", 1)[0] in tags]
        self.remove(leftovers)
        return len(leftovers)

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
