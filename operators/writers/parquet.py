"""Writes rows to staging Parquet, one set of files per input shard, and reports them."""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ground.schema import IMAGE_TYPE, SHARD_DAMAGE, SHARD_MARKER, SHARD_ROWS, output_schema
from ground.layout import DATA, REJECTED, STAGING, shard_tag
from ground.storage import filesystem, is_local, join, retry

logger = logging.getLogger(__name__)

RECORD_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("kind", pa.string()),
    ("path", pa.string()),
    ("rows", pa.int64()),
    ("bytes", pa.int64()),
    ("reasons", pa.string()),  # JSON {reason: count}
    ("shard_rows", pa.int64()),
    ("shard_damage", pa.string()),
    ("shard_marker", pa.string()),  # "end"/"failed" on a marker's record (kind "marker", no file)
])
MARKER_KIND = "marker"


class StagingParquetWriter:
    """Terminal operator of every plan: routes rows to ``data`` or ``rejected`` staging files.

    Input: all columns; ``source_shard`` and ``reject_reason`` decide where a row goes.
    Output: one record per file written (``RECORD_SCHEMA``), consumed by the driver's
    commit loop; rows themselves never travel to the driver.
    Files never span two shards and stay under ``target_file_size_mb``. Marker rows (a shard
    that ended with no row to stamp, or whose read failed) are never written: each becomes a
    record of kind ``marker`` with 0 rows.
    Failure behaviour: storage errors are retried, then raised (systemic).
    """

    name = "writer"

    def __init__(self, output: dict[str, Any], run_id: str, file_meta: dict[str, Any]):
        self.output = output
        self.run_id = run_id
        self.file_meta = file_meta
        self.fs, self.root = filesystem(output["path"], output.get("storage_options") or {})
        self._local = is_local(self.fs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records: list[dict[str, Any]] = []
        if SHARD_MARKER in batch.column_names and batch[SHARD_MARKER].null_count < batch.num_rows:
            is_marker = pc.is_valid(batch[SHARD_MARKER])
            for m in batch.filter(is_marker).select(["source_shard", SHARD_ROWS, SHARD_DAMAGE, SHARD_MARKER]).to_pylist():
                records.append({"shard": m["source_shard"], "kind": MARKER_KIND, "path": "", "rows": 0, "bytes": 0,
                                "reasons": "{}", "shard_rows": m[SHARD_ROWS], "shard_damage": m[SHARD_DAMAGE],
                                "shard_marker": m[SHARD_MARKER]})
            batch = batch.filter(pc.invert(is_marker))
        shards = batch["source_shard"]
        for shard in pc.unique(shards).to_pylist():
            part = batch.filter(pc.equal(shards, shard))
            totals = pc.drop_null(part[SHARD_ROWS])
            damages = pc.drop_null(part[SHARD_DAMAGE])
            shard_rows = totals[0].as_py() if len(totals) else None
            damage = damages[0].as_py() if len(damages) else None
            rejected_mask = pc.is_valid(part["reject_reason"])
            for kind, mask in ((DATA, pc.invert(rejected_mask)), (REJECTED, rejected_mask)):
                rows = part.filter(mask)
                if rows.num_rows == 0:
                    continue
                if kind == REJECTED and not self.output.get("rejected_image_bytes", False):
                    rows = _drop_image_bytes(rows)
                for chunk in self._chunks(rows):
                    records.append(self._write(shard, kind, chunk))
            # The row total travels on one record of the shard even if every row went one way.
            if records and (shard_rows is not None or damage):
                for rec in records:
                    if rec["shard"] == shard and rec["kind"] != MARKER_KIND:
                        rec["shard_rows"], rec["shard_damage"] = shard_rows, damage
                        break
        return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)

    def _chunks(self, rows: pa.Table) -> list[pa.Table]:
        """Consecutive slices whose estimated size stays under the target (at least one row each)."""
        target = float(self.output.get("target_file_size_mb", 256)) * 1024 * 1024
        if rows.nbytes <= target:
            return [rows]
        # Image bytes are already compressed, so their length is a fair estimate of what a row
        # costs on disk; the other columns are spread evenly.
        image_bytes = pc.fill_null(pc.binary_length(pc.struct_field(rows["image"], "bytes")), 0)
        image_bytes = image_bytes.to_numpy(zero_copy_only=False).astype("float64")
        other = max(rows.nbytes - image_bytes.sum(), 0) / rows.num_rows
        chunks, start, size = [], 0, 0.0
        for i, b in enumerate(image_bytes):
            if i > start and size + b + other > target:
                chunks.append(rows.slice(start, i - start))
                start, size = i, 0.0
            size += b + other
        chunks.append(rows.slice(start))
        return chunks

    def _write(self, shard: str, kind: str, rows: pa.Table) -> dict[str, Any]:
        schema = output_schema(rows.schema, self.file_meta)
        table = rows.select(schema.names).cast(schema)
        path = join(self.root, STAGING, shard_tag(shard), kind, f"{self.run_id}-{uuid.uuid4().hex[:12]}.parquet")
        compression = self.output.get("compression", "zstd")
        level = self.output.get("compression_level") if compression == "zstd" else None

        def write() -> int:
            if self._local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f, compression=None if compression == "none" else compression,
                               compression_level=level, row_group_size=max(1, min(table.num_rows, 1024)))
            return self.fs.size(path)

        size = retry(write, f"write {path}")
        reasons = Counter(rows["reject_reason"].to_pylist()) if kind == REJECTED else Counter()
        return {"shard": shard, "kind": kind, "path": path, "rows": table.num_rows, "bytes": size,
                "reasons": json.dumps(dict(reasons)), "shard_rows": None, "shard_damage": None,
                "shard_marker": None}


def _drop_image_bytes(rows: pa.Table) -> pa.Table:
    images = rows["image"].combine_chunks()
    if len(images) == 0:
        return rows
    paths = pc.struct_field(images, "path")
    stripped = pa.StructArray.from_arrays([pa.nulls(len(images), pa.binary()), paths],
                                          fields=list(IMAGE_TYPE), mask=pc.invert(pc.is_valid(images)))
    return rows.set_column(rows.column_names.index("image"), "image", stripped)
