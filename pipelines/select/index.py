"""The cross-run dedup index under ``CURATED/_mmcurate/index/``.

One Parquet file per committed input file and kind, named by the input file's tag::

    index/exact/<tag>.parquet          sha256, caption digest, key of every survivor
    index/phash/<tag>.parquet          phash, key of every survivor
    index/semantic-<column>/<tag>.parquet   cluster, embedding, key of every survivor
    index/centroids/<column>.parquet   the k-means centroids every run reuses

Entries of an input file are published just before its ledger record, so they exist exactly
for committed files (a leftover of a killed commit belongs to a pending file and is deleted
before that file is redone). A run reads every entry except those of the files it is (re)doing:
tonight's rows are deduplicated against earlier nights, never against themselves.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ground.layout import META_DIR
from ground.storage import filesystem, join, retry

logger = logging.getLogger(__name__)

INDEX = f"{META_DIR}/index"
EXACT = "exact"
PHASH = "phash"
CENTROIDS = "centroids"


def semantic_kind(column: str) -> str:
    return f"semantic-{column}"


class DedupIndex:
    """Lists, reads and publishes index entries of one curated output."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = filesystem(root, storage_options or {})
        self.storage_options = storage_options or {}

    def path(self, kind: str, tag: str) -> str:
        return join(self.root, INDEX, kind, f"{tag}.parquet")

    def entry_files(self, kind: str, exclude_tags: set[str]) -> list[str]:
        """Entry files of ``kind`` except those of ``exclude_tags``, sorted (deterministic)."""
        self.fs.invalidate_cache()
        try:
            names = self.fs.ls(join(self.root, INDEX, kind), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in sorted(names):
            name = p.rsplit("/", 1)[-1]
            if name.endswith(".parquet") and name[: -len(".parquet")] not in exclude_tags:
                out.append(p)
        return out

    def read(self, kind: str, exclude_tags: set[str], columns: list[str] | None = None) -> pa.Table | None:
        """All entries of ``kind`` outside ``exclude_tags`` as one table, or None when there are none.

        Read on the caller (a Ray task); entries are compact (a 64-char digest or one int64 per
        kept row) so this is the dedup set of earlier runs, not their rows.
        """
        files = self.entry_files(kind, exclude_tags)
        if not files:
            return None
        tables = []
        for p in files:
            with self.fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables, promote_options="default")

    def remove(self, tags: set[str]) -> int:
        """Delete the entries of ``tags`` (files about to be redone). Returns files removed."""
        removed = 0
        try:
            kinds = [p.rsplit("/", 1)[-1] for p in self.fs.ls(join(self.root, INDEX), detail=False)]
        except FileNotFoundError:
            return 0
        for kind in kinds:
            if kind == CENTROIDS:
                continue
            for tag in tags:
                p = self.path(kind, tag)
                if self.fs.exists(p):
                    retry(lambda p=p: self.fs.rm(p), f"delete {p}")
                    removed += 1
        return removed

    def publish(self, staged: list[str], tag: str) -> None:
        """Move staged entry files (``.../<kind>.parquet``) to ``index/<kind>/<tag>.parquet``."""
        for src in staged:
            kind = src.rsplit("/", 1)[-1][: -len(".parquet")]
            dst = self.path(kind, tag)
            if self.fs.protocol in ("file", "local") or "file" in self.fs.protocol:
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            retry(lambda s=src, d=dst: self.fs.mv(s, d), f"publish {src}")

    def centroids(self, column: str) -> np.ndarray | None:
        p = join(self.root, INDEX, CENTROIDS, f"{column}.parquet")
        try:
            with self.fs.open(p, "rb") as f:
                t = pq.read_table(f)
        except FileNotFoundError:
            return None
        col = t["centroid"].combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), col.type.list_size)

    def write_centroids(self, column: str, centroids: np.ndarray) -> None:
        p = join(self.root, INDEX, CENTROIDS, f"{column}.parquet")
        dim = centroids.shape[1]
        arr = pa.FixedSizeListArray.from_arrays(pa.array(centroids.reshape(-1).astype(np.float32)), dim)
        table = pa.table({"centroid": arr})
        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            self.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)

        def write() -> None:
            with self.fs.open(p, "wb") as f:
                pq.write_table(table, f)

        retry(write, f"write {p}")
