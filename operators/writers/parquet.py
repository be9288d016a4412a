"""Writes rows to staging Parquet, one set of files per input shard, and merges a shard's parts.

Two steps make "few, large files" without ever holding a shard's rows in one place:

1. ``StagingParquetWriter`` (the last map_batches of every plan) writes each writer batch's rows
   of a shard as a small *part* under ``staging/<tag>/<kind>/`` and reports it to the driver.
2. When the driver has heard every row of a shard, ``merge_shard_parts`` (run as a Ray task by
   ``pipelines.commit``) streams the parts, row group by row group, into at most
   ``ceil(bytes / target_file_size_mb) + 1`` final files per kind.

Why not one open ``ParquetWriter`` per shard in a writer actor (append row groups as blocks
arrive)? Ray Data routes blocks to whichever actor of a pool is free; there is no shard affinity
short of an all-to-all shuffle, which would stop the stream. Rows of one shard would still reach
several actors and need a merge, and the actors would need a side channel to learn that a shard
is complete. Staging parts plus one merge per shard keeps each step stateless and retryable,
costs one extra read and write of a shard's bytes (in parallel, on the cluster, not on the
driver), and is skipped when the parts are already large (see ``parts_need_merge``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ground.layout import DATA, REJECTED, STAGING, published_name, shard_tag
from ground.schema import IMAGE_TYPE, SHARD_DAMAGE, SHARD_MARKER, SHARD_ROWS, output_schema
from ground.storage import filesystem, is_local, join, retry

logger = logging.getLogger(__name__)

# Row groups: at most ~128 MiB of Arrow data (image bytes are already compressed, so about as
# much on disk). Parquet's own guidance is large row groups (hundreds of MB) for scans; Spark and
# DuckDB write ~128 MB / ~122,880 rows; pyarrow, polars and duckdb read row group by row group,
# so this also bounds a reader's memory per column chunk.
ROW_GROUP_TARGET_BYTES = 128 * 1024 * 1024
# ...and at most a quarter of the target file size, so a file (closed at the first row group that
# takes it past the target) overshoots the target by at most a quarter: 64 MiB groups and files
# of 256-320 MiB with the default target_file_size_mb of 256. Groups are cut on each row's own
# size (``row_bytes``), so only a single row larger than a group makes a larger one.
ROW_GROUP_FILE_FRACTION = 0.25
# A cap for narrow rows (rejected/ without image bytes): DuckDB's default row group size.
ROW_GROUP_MAX_ROWS = 122_880

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

# The Parquet leaf holding each row's encoded image file (``image`` is struct<bytes, path>).
IMAGE_BYTES_LEAF = "image.bytes"


@functools.lru_cache(maxsize=64)
def _leaf_paths(schema: pa.Schema) -> tuple[str, ...]:
    """Parquet's column paths for ``schema`` (``image.bytes``, ``emb.list.element``, ...).

    pyarrow takes per-column codecs only by these leaf paths and gives any leaf it is not told
    about no compression at all, so every leaf must be named. The names depend on pyarrow's
    nested-type conventions; rather than re-deriving them, ask pyarrow: write the schema's
    empty table and read back its Parquet schema (~2 ms, once per schema: cached).
    """
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return tuple(parquet_schema.column(i).path for i in range(len(parquet_schema)))


def parquet_options(output: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """Codec, level and dictionary settings for writing ``schema`` under the ``output`` config.

    Every column gets ``output.compression`` (level ``compression_level`` for zstd) and
    dictionary encoding, except the image bytes: encoded JPEG/PNG/WebP files are compressed
    already: zstd made the benchmark shards' files 0.33 % smaller while doubling the CPU of
    staging + merging (``benchmarks/bench_write_codecs.py``), paid again by every reader; and
    dictionary encoding of unique blobs only costs hashing until pyarrow gives up on it. So the
    image bytes get ``output.image_compression`` (default none) and no dictionary.
    """
    codec = output.get("compression", "zstd")
    image_codec = output.get("image_compression", "none")
    level = output.get("compression_level")
    leaves = _leaf_paths(schema)
    codecs = {leaf: image_codec if leaf == IMAGE_BYTES_LEAF else codec for leaf in leaves}
    levels = {leaf: level for leaf, c in codecs.items() if c == "zstd" and level is not None}
    return {"compression": codecs, "compression_level": levels or None,
            "use_dictionary": [leaf for leaf in leaves if leaf != IMAGE_BYTES_LEAF] or False}


class StagingParquetWriter:
    """Terminal operator of every plan: routes rows to ``data`` or ``rejected`` staging files.

    Input: all columns; ``source_shard`` and ``reject_reason`` decide where a row goes.
    Output: one record per file written (``RECORD_SCHEMA``), consumed by the driver's
    commit loop; rows themselves never travel to the driver.
    Parts never span two shards and stay under ``target_file_size_mb``; the commit step merges
    a shard's parts into few large files (``merge_shard_parts``). Marker rows (a shard that
    ended with no row to stamp, or whose read failed) are never written: each becomes a record
    of kind ``marker`` with 0 rows.
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
                    rows = drop_image_bytes(rows)
                for chunk in self.chunks(rows):
                    records.append(self.write_staged(shard, kind, chunk))
            # The row total travels on one record of the shard even if every row went one way.
            if records and (shard_rows is not None or damage):
                for rec in records:
                    if rec["shard"] == shard and rec["kind"] != MARKER_KIND:
                        rec["shard_rows"], rec["shard_damage"] = shard_rows, damage
                        break
        return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)

    def chunks(self, rows: pa.Table) -> list[pa.Table]:
        """Consecutive slices whose estimated size stays under the target (at least one row each)."""
        target = float(self.output.get("target_file_size_mb", 256)) * 1024 * 1024
        if rows.nbytes <= target:
            return [rows]
        chunks, start, size = [], 0, 0.0
        for i, b in enumerate(row_bytes(rows)):
            if i > start and size + b > target:
                chunks.append(rows.slice(start, i - start))
                start, size = i, 0.0
            size += b
        chunks.append(rows.slice(start))
        return chunks

    def write_staged(self, shard: str, kind: str, rows: pa.Table) -> dict[str, Any]:
        """Write ``rows`` as one staged file of ``shard``'s ``kind``; returns its writer record."""
        schema = output_schema(rows.schema, self.file_meta)
        table = rows.select(schema.names).cast(schema)
        path = join(self.root, STAGING, shard_tag(shard), kind, f"{self.run_id}-{uuid.uuid4().hex[:12]}.parquet")
        options = parquet_options(self.output, schema)

        def write() -> int:
            if self._local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f, row_group_size=row_group_rows(table), **options)
                # Bytes written so far = the file's size: no HEAD request after the upload.
                return f.tell()

        size = retry(write, f"write {path}")
        reasons = Counter(rows["reject_reason"].to_pylist()) if kind == REJECTED else Counter()
        return {"shard": shard, "kind": kind, "path": path, "rows": table.num_rows, "bytes": size,
                "reasons": json.dumps(dict(reasons)), "shard_rows": None, "shard_damage": None,
                "shard_marker": None}


def row_bytes(rows: pa.Table | pa.RecordBatch) -> np.ndarray:
    """Each row's estimated size on disk: its image bytes plus an even share of the other columns.

    Image bytes are already compressed, so their length is a fair estimate of what they cost in
    the file, and they dominate a row; one photo can be larger than a whole row group of the
    rest, so sizing by the batch average would put it in a group the size of many.
    """
    n = rows.num_rows
    if n == 0:
        return np.zeros(0)
    if "image" in rows.schema.names and pa.types.is_struct(rows.schema.field("image").type):
        image = pc.fill_null(pc.binary_length(pc.struct_field(rows["image"], "bytes")), 0)
        image = image.to_numpy(zero_copy_only=False).astype("float64")
    else:
        image = np.zeros(n)
    other = max(rows.nbytes - image.sum(), 0.0) / n
    return image + other


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_TARGET_BYTES,
                   max_rows: int = ROW_GROUP_MAX_ROWS) -> int:
    """Rows per row group so a group holds about ``target_bytes`` of ``table``'s rows (>= 1)."""
    if table.num_rows == 0:
        return 1
    per_row = max(table.nbytes / table.num_rows, 1.0)
    return max(1, min(max_rows, int(target_bytes // per_row)))


def parts_need_merge(sizes: list[int], target_bytes: int) -> bool:
    """True when a shard's parts of one kind should be merged rather than published as they are.

    Publishing as-is is allowed when it already meets the bound, ``len(parts) <= ceil(bytes /
    target) + 1``, and every part but one holds at least a quarter of the target (so no kind ends
    as a pile of small files that happens to be within the bound for a tiny shard). A merge
    rewrites every byte of the shard, so skipping it when the parts are already large is what
    keeps big shards on busy clusters cheap (see README "Few, large files per shard" for settings that
    produce large parts).
    """
    if len(sizes) <= 1:
        return False
    bound = math.ceil(sum(sizes) / target_bytes) + 1
    small = sum(1 for size in sizes if size < target_bytes * ROW_GROUP_FILE_FRACTION)
    return len(sizes) > bound or small > 1


def merge_shard_parts(output: dict[str, Any], tag: str, kind: str, parts: list[str],
                      part_bytes: list[int] | None = None, row_group_bytes: int | None = None,
                      max_group_rows: int = ROW_GROUP_MAX_ROWS, generation: int = 0) -> list[dict[str, Any]]:
    """Stream one shard's staged parts of one kind into few final files under ``OUT/<kind>/``.

    Reads the parts in the given order, one record batch at a time, gathers rows into row groups
    of about ``row_group_bytes`` (default: ``ROW_GROUP_TARGET_BYTES`` or a quarter of the target
    file size, whichever is smaller; at most ``max_group_rows`` rows) and appends them to the current
    file, which is closed once it reaches ``output["target_file_size_mb"]``. Every file but the
    last is therefore at least the target, so a kind ends with at most
    ``ceil(bytes / target) + 1`` files; a file exceeds the target by less than one row group,
    which is at most ``row_group_bytes`` or a single row larger than that.
    Memory: one staged part (at most one writer batch) plus one row group, never the shard.

    Files are written straight to their final names ``<tag>-<seq>.parquet``: the ledger record
    written after this is what makes them part of the output. The result is deterministic for
    the same parts (names, rows and file count), so a retried merge overwrites the same names.

    Args:
        output: the run's ``output`` config (path, storage_options, target_file_size_mb,
            compression, compression_level, image_compression).
        tag: the shard's tag (``ground.layout.shard_tag``).
        kind: ``data`` or ``rejected``.
        parts: staged part paths, in the order their rows should appear.
        part_bytes: their sizes as the writer reported them (saves a HEAD per part on S3).
        generation: > 0 when the shard is redone (``ground.layout.published_name``).

    Returns:
        One ``{"name", "rows", "bytes"}`` per file written, in order.

    Raises:
        StorageError: a read or write still failed after retries (nothing is committed then).
    """
    fs, root = filesystem(output["path"], output.get("storage_options") or {})
    logger.debug("merging %d %s part(s) of %s (%d bytes staged)", len(parts), kind, tag, sum(part_bytes or []))
    target = float(output.get("target_file_size_mb", 256)) * 1024 * 1024
    if row_group_bytes is None:
        row_group_bytes = int(min(ROW_GROUP_TARGET_BYTES, target * ROW_GROUP_FILE_FRACTION))
    if is_local(fs):
        fs.makedirs(join(root, kind), exist_ok=True)

    def write_all() -> list[dict[str, Any]]:
        written: list[dict[str, Any]] = []
        state: dict[str, Any] = {"file": None, "writer": None, "rows": 0}
        schema: pa.Schema | None = None
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        pending_bytes = 0

        def close_file() -> None:
            if state["writer"] is None:
                return
            state["writer"].close()
            size = state["file"].tell()
            state["file"].close()
            written[-1].update(rows=state["rows"], bytes=size)
            state.update(file=None, writer=None, rows=0)

        def flush_group() -> None:
            nonlocal pending, pending_rows, pending_bytes
            if not pending_rows:
                return
            if state["writer"] is None:
                name = published_name(tag, len(written), generation)
                state["file"] = fs.open(join(root, kind, name), "wb")
                state["writer"] = pq.ParquetWriter(state["file"], schema, **parquet_options(output, schema))
                written.append({"name": name, "rows": 0, "bytes": 0})
            group = pa.Table.from_batches(pending, schema=schema)
            state["writer"].write_table(group, row_group_size=group.num_rows)
            state["rows"] += group.num_rows
            pending, pending_rows, pending_bytes = [], 0, 0
            # ParquetWriter writes a row group's pages as it gets them, so the stream's position
            # is the file's size so far (less the footer).
            if state["file"].tell() >= target:
                close_file()

        sizes = part_bytes if part_bytes and len(part_bytes) == len(parts) else [0] * len(parts)
        for part, size in zip(parts, sizes):
            # One GET per part: a part is at most one writer batch (and under the target size).
            # With its size known, no HEAD either (s3fs asks for the size of a whole-object read).
            data = fs.cat_file(part, start=0, end=size) if size else fs.cat_file(part)
            source = pq.ParquetFile(pa.BufferReader(data))
            if schema is None:
                schema = source.schema_arrow
            for batch in source.iter_batches(batch_size=8192):
                if batch.schema != schema:
                    batch = pa.Table.from_batches([batch]).cast(schema).to_batches()[0]
                # A group ends before the row that would take it past row_group_bytes (it
                # holds at least one row), so a group exceeds that only by being one large row.
                ends = np.cumsum(row_bytes(batch))
                offset = 0
                while offset < batch.num_rows:
                    base = ends[offset - 1] if offset else 0.0
                    fits = int(np.searchsorted(ends, base + row_group_bytes - pending_bytes, side="right")) - offset
                    room_rows = min(max_group_rows - pending_rows, max(1, fits) if not pending_rows else fits)
                    if room_rows <= 0:
                        flush_group()
                        continue
                    piece = batch.slice(offset, room_rows)
                    pending.append(piece)
                    pending_rows += piece.num_rows
                    pending_bytes += int(ends[offset + room_rows - 1] - base)
                    offset += piece.num_rows
                    if pending_rows >= max_group_rows or pending_bytes >= row_group_bytes:
                        flush_group()
        flush_group()
        close_file()
        return written

    return retry(write_all, f"merge {kind} parts of {tag}")


def drop_image_bytes(rows: pa.Table) -> pa.Table:
    """``rows`` with every image's bytes nulled and its path kept (rejected rows by default)."""
    images = rows["image"].combine_chunks()
    if len(images) == 0:
        return rows
    paths = pc.struct_field(images, "path")
    stripped = pa.StructArray.from_arrays([pa.nulls(len(images), pa.binary()), paths],
                                          fields=list(IMAGE_TYPE), mask=pc.invert(pc.is_valid(images)))
    return rows.set_column(rows.column_names.index("image"), "image", stripped)
