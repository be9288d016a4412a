"""Shard readers: one Ray read task per input shard, rows stamped with their provenance.

A reader turns one shard URL into :class:`Sample` records; ``pipelines.datasource.ShardDatasource`` wraps
them into Arrow blocks of ``block_rows`` rows with the core reader columns. Rows of a
shard's final block carry the shard's total row count (``_shard_rows``) so the driver's
commit loop knows when every row of the shard has been written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from ground.schema import INTERNAL_FIELDS, READER_SCHEMA, SHARD_DAMAGE, SHARD_ROWS
from ground.storage import expand_paths, filesystem

logger = logging.getLogger(__name__)

BLOCK_SCHEMA = pa.schema(list(READER_SCHEMA) + INTERNAL_FIELDS)


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
    """Damage found while reading a shard (recorded in the ledger, not raised)."""

    message: str | None = None


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

    def open(self, url: str):
        fs, path = filesystem(url, self.storage_options)
        return fs.open(path, "rb")

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
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"shard {shard} disappeared while reading: {exc}") from None
        total += len(pending)
        if damage.message:
            logger.warning("shard %s damaged: %s", shard, damage.message)
        if pending:
            yield self._block(shard, pending, total, damage.message)

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
