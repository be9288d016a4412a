"""Shard readers: one Ray read task per input shard, rows stamped with their provenance.

A reader turns one shard URL into :class:`Sample` records; ``pipelines.datasource.ShardDatasource`` wraps
them into Arrow blocks of ``block_rows`` rows with the core reader columns. Rows of a
shard's final block carry the shard's total row count (``_shard_rows``) so the driver's
commit loop knows when every row of the shard has been written.

Every shard ends in exactly one outcome the driver hears about, and reading never raises
for a data problem:

* complete: the last block is stamped with the row total (and the damage, if the reader
  found bad bytes after some samples: truncated tar, corrupt row group);
* complete with no rows (an empty or wholly unreadable shard): one ``end`` marker row carries
  the total 0 and the damage;
* failed (a transient or unexplained error that outlasted the read retries): a ``failed``
  marker row carries the message; rows already emitted are discarded by the driver.

Only a :class:`~ground.errors.ConfigError` (the config does not fit the data) is raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar

import pyarrow as pa

from ground.errors import ConfigError
from ground.schema import (INTERNAL_FIELDS, MARKER_END, MARKER_FAILED, READER_SCHEMA, SHARD_DAMAGE,
                           SHARD_MARKER, SHARD_ROWS)
from ground.storage import READ_ATTEMPTS, ResumableFile, describe_error, expand_paths, filesystem

logger = logging.getLogger(__name__)

BLOCK_SCHEMA = pa.schema(list(READER_SCHEMA) + INTERNAL_FIELDS)

# Bytes a shard's head must hold to be told apart: a tar header is 512 bytes, with "ustar" at 257.
SNIFF_BYTES = 512
FORMAT_NAMES = {"webdataset": "tar archive (WebDataset)", "parquet": "Parquet file"}
# Shards whose format is checked before a run, one per file extension: bounded, so names whose
# "extension" is a number (``x.0001``, ``x.0002``) cost a few reads, not one per shard.
FORMAT_CHECKS = 8


def sniff_format(head: bytes) -> str | None:
    """The ``input.format`` whose shards start like ``head`` ("webdataset" for an uncompressed
    tar, "parquet"), or None: anything else (compressed tars, other files, garbage) is not
    recognised, and reading decides what it is."""
    if head[:4] == b"PAR1":
        return "parquet"
    if head[257:262] == b"ustar":
        return "webdataset"
    return None


def _extension(shard: str) -> str:
    """The last extension of a shard URL's file name (``.tar``, ``.gz``, ``.parquet``), lower-cased."""
    return PurePosixPath(shard.split("#", 1)[0].rsplit("/", 1)[-1]).suffix.lower()


@dataclass
class Sample:
    """One sample as read from a shard, before any decoding."""

    key: str
    image: bytes | None = None
    image_path: str | None = None
    text: str | None = None
    meta: str | None = None
    reject: str | None = None  # reason without the reader prefix


@dataclass
class ShardDamage:
    """Damage found while reading a shard (recorded in the ledger, not raised).

    ``rows_lost``: rows the shard held past the damage, when the format says (Parquet's footer).
    """

    message: str | None = None
    rows_lost: int | None = None

    def describe(self) -> str | None:
        """The message as it travels to the ledger: ``... [rows_lost=N]`` when the count is known."""
        if self.message is None or self.rows_lost is None:
            return self.message
        return f"{self.message} [rows_lost={self.rows_lost}]"


_ROWS_LOST = re.compile(r"\[rows_lost=(\d+)\]$")


def rows_lost_of(damage: str | None) -> int | None:
    """The ``rows_lost`` count a damage message carries, or None when it is not knowable."""
    match = _ROWS_LOST.search(damage or "")
    return int(match.group(1)) if match else None


@dataclass
class ShardReader:
    """Base: subclasses implement :meth:`samples` (and :meth:`list_shards` if shards are virtual).

    Attributes:
        options: the validated ``input`` config section as a dict (storage options included).
    """

    name: ClassVar[str] = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.options.get("storage_options") or {}

    def list_shards(self) -> list[str]:
        """Shard URLs for the configured paths (brace ranges and globs expanded)."""
        return expand_paths(self.options["paths"], self.storage_options)

    def samples(self, shard: str, damage: ShardDamage) -> Iterator[Sample]:  # pragma: no cover
        raise NotImplementedError

    def check_formats(self, shards: list[str]) -> None:
        """Refuse shards that are plainly another format this tool reads (a tar under
        ``format: parquet``, a Parquet file under ``format: webdataset``).

        Without it every such shard reads as damaged with 0 rows, the run exits 0, and the
        ledger marks the shards done, so fixing ``input.format`` afterwards redoes nothing.
        Looks at the first bytes of ``shards[0]`` and of the first shard of every other file
        extension (a ``.parquet`` among ``.tar`` files), at most :data:`FORMAT_CHECKS` shards:
        one small read each, however many shards. A shard that cannot be read here is left to
        the read tasks, whose outcome (failed, damaged) is the shard's own.

        Raises:
            ConfigError: names the shard, what it is and the ``input.format`` that reads it;
                when other shards are of ``input.format``, that the paths mix formats.
        """
        if not shards or self.name not in FORMAT_NAMES:
            return  # folders of images and caption files are not single-format shards
        firsts: dict[str, str] = {}
        for shard in shards:
            firsts.setdefault(_extension(shard), shard)
        seen = [(shard, self._sniff(shard)) for shard in list(firsts.values())[:FORMAT_CHECKS]]
        wrong = [(shard, found) for shard, found in seen if found is not None and found != self.name]
        if not wrong:
            return
        shard, found = wrong[0]
        right = [s for s, f in seen if f == self.name]
        if right:
            raise ConfigError(f"{shard} is a {FORMAT_NAMES[found]}, but input.format is {self.name!r}, the format "
                              f"of {right[0]}: input.paths mixes two formats; narrow it to one format's files")
        raise ConfigError(f"{shard} is a {FORMAT_NAMES[found]}, but input.format is {self.name!r} "
                          f"(set input.format: {found})")

    def _sniff(self, shard: str) -> str | None:
        """The format ``shard``'s first bytes show (:func:`sniff_format`), or None when they show
        nothing known or the shard cannot be read here."""
        url = shard.split("#", 1)[0]
        try:
            fs, path = filesystem(url, self.storage_options)
            head = fs.cat_file(path, start=0, end=SNIFF_BYTES)  # one ranged GET on object storage
        except Exception as exc:  # noqa: BLE001 - left to the read tasks
            logger.debug("could not read the head of %s to check its format: %s", shard, exc)
            return None
        return sniff_format(head)

    def open(self, url: str) -> ResumableFile:
        """Open a shard for reading; transient errors re-open it at the same offset."""
        fs, path = filesystem(url, self.storage_options)
        return ResumableFile(fs, path, attempts=int(self.options.get("read_attempts") or READ_ATTEMPTS))

    def fingerprint(self, shard: str) -> dict[str, Any]:
        """Size and ETag (or mtime) of the shard's object: how a later run sees that it changed.

        Returns ``{"source_size": None, "source_etag": None}`` when the object cannot be
        inspected (a fingerprint is informative, not required).
        """
        url = shard.split("#", 1)[0]
        try:
            fs, path = filesystem(url, self.storage_options)
            info = fs.info(path)
        except Exception as exc:  # noqa: BLE001 - see Returns
            logger.debug("no fingerprint for %s: %s", shard, exc)
            return {"source_size": None, "source_etag": None}
        etag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        return {"source_size": info.get("size"),
                "source_etag": None if etag is None else str(etag).strip('"')}

    # -- block building -------------------------------------------------------------
    def read_blocks(self, shard: str) -> Iterator[pa.Table]:
        """Yield Arrow blocks for one shard; the last block is stamped with the row total."""
        block_rows = int(self.options.get("block_rows", 256))
        damage = ShardDamage()
        pending: list[Sample] = []
        total = 0
        try:
            for sample in self.samples(shard, damage):
                pending.append(sample)
                if len(pending) > block_rows:  # keep one back so the last block is stamped
                    out, pending = pending[:block_rows], pending[block_rows:]
                    total += len(out)
                    yield self._block(shard, out, None, None)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - transient or unexplained: the shard failed, not the run
            message = describe_error(exc)
            if isinstance(exc, FileNotFoundError):
                message = f"disappeared while reading ({message})"
            logger.warning("shard %s failed: %s", shard, message)
            yield self.marker(shard, MARKER_FAILED, message=message)
            return
        total += len(pending)
        if damage.message:
            logger.warning("shard %s damaged: %s", shard, damage.message)
        if pending:
            yield self._block(shard, pending, total, damage.describe())
        else:  # nothing to stamp: the driver still hears how the shard ended
            yield self.marker(shard, MARKER_END, message=damage.describe())

    def marker(self, shard: str, kind: str, message: str | None = None) -> pa.Table:
        """One marker row (not a sample) telling the driver a shard ended with no row to stamp.

        ``end``: the shard is complete with 0 rows (``message`` is its damage, if any);
        ``failed``: reading failed (``message`` says why). The writer reports it, never writes it.
        """
        cols = {name: [None] for name in BLOCK_SCHEMA.names}
        cols.update({"key": [""], "source_shard": [shard], "reject_reason": [f"{self.name}:shard_marker"],
                     SHARD_ROWS: [0 if kind == MARKER_END else None], SHARD_DAMAGE: [message],
                     SHARD_MARKER: [kind]})
        return pa.table(cols, schema=BLOCK_SCHEMA)

    def _block(self, shard: str, samples: list[Sample], total: int | None, damage: str | None) -> pa.Table:
        n = len(samples)
        images = [None if s.image is None else {"bytes": s.image, "path": s.image_path} for s in samples]
        cols = {
            "key": [s.key for s in samples],
            "source_shard": [shard] * n,
            "image": images,
            "text": [s.text for s in samples],
            "meta": [s.meta for s in samples],
            "sha256": [None if s.image is None else hashlib.sha256(s.image).hexdigest() for s in samples],
            "reject_reason": [None if s.reject is None else f"{self.name}:{s.reject}" for s in samples],
            SHARD_ROWS: [total] * n,
            SHARD_DAMAGE: [damage] * n,
            SHARD_MARKER: [None] * n,
        }
        return pa.table(cols, schema=BLOCK_SCHEMA)


def decode_text(data: bytes) -> tuple[str, str | None]:
    """UTF-8 text (BOM and surrounding whitespace stripped) and a reject reason if it was not UTF-8."""
    try:
        return data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").strip(), "text_not_utf8"


def check_json(data: bytes | str) -> tuple[str | None, str | None]:
    """The sidecar text untouched if it is a JSON value, else (the text as a JSON string, reason).

    A broken sidecar is kept (as one JSON string holding its text) so the rejected row still
    shows what was there.
    """
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    try:
        json.loads(text)
        return text, None
    except ValueError:
        return json.dumps(text), "invalid_json"
