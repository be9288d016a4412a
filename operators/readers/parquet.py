"""Parquet shards with image bytes (HF ``{bytes, path}`` struct or a plain binary column)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.readers.base import Sample, ShardDamage, ShardReader
from ground.errors import ConfigError
from ground.storage import describe_error


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return None  # binary extras are not copied into meta
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or \
        pa.types.is_binary_view(t)


def holds_image_bytes(t: pa.DataType) -> bool:
    """True for an image column the reader can take: binary, a struct with a binary ``bytes``
    field (HF datasets' Image), or all-null (every row a missing image)."""
    if pa.types.is_null(t) or _is_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


class ParquetReader(ShardReader):
    """Reads one Parquet file per task, row group by row group.

    Config: ``image_column`` (struct{bytes,path} or binary), ``text_column`` and
    ``id_column`` (optional; without it the key is ``<file stem>/<row number>``).
    Every other column goes into ``meta`` as a JSON object (binary values become null).
    Failure behaviour: a null or empty image -> ``parquet:missing_image``; a missing
    configured column is a config error naming the file; bytes that are not Parquet (or a
    corrupt row group) damage the shard: the rows before it are kept and the damage recorded.
    """

    name = "parquet"

    def samples(self, shard: str, damage: ShardDamage) -> Iterator[Sample]:
        image_col = self.options.get("image_column", "image")
        text_col = self.options.get("text_column")
        id_col = self.options.get("id_column")
        stem = posixpath.basename(shard).rsplit(".", 1)[0]
        with self.open(shard) as f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise
                damage.message = f"not a readable Parquet file: {describe_error(exc)}"
                return
            names = pf.schema_arrow.names
            for col in (image_col, text_col, id_col):
                if col is not None and col not in names:
                    raise ConfigError(f"{shard}: column {col!r} not found (columns: {', '.join(names)})")
            image_type = pf.schema_arrow.field(image_col).type
            if not holds_image_bytes(image_type):
                raise ConfigError(f"{shard}: column {image_col!r} holds {image_type}, not image bytes (binary, or a "
                                  "struct with a binary 'bytes' field like HF datasets' Image); URLs must be "
                                  "downloaded first")
            extra = [n for n in names if n not in (image_col, text_col, id_col)]
            row = 0
            batches = pf.iter_batches(batch_size=int(self.options.get("block_rows", 256)))
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as exc:
                    if isinstance(exc, (FileNotFoundError, PermissionError)):
                        raise
                    damage.message = f"Parquet damaged after {row} rows: {describe_error(exc)}"
                    damage.rows_lost = max(pf.metadata.num_rows - row, 0)
                    return
                if batch is None:
                    break
                table = pa.Table.from_batches([batch])
                images = table[image_col].to_pylist()
                texts = table[text_col].to_pylist() if text_col else [None] * table.num_rows
                ids = table[id_col].to_pylist() if id_col else None
                extras = table.select(extra).to_pylist() if extra else [None] * table.num_rows
                for i in range(table.num_rows):
                    img = images[i]
                    data, path = (img.get("bytes"), img.get("path")) if isinstance(img, dict) else (img, None)
                    key = str(ids[i]) if ids is not None else f"{stem}/{row:09d}"
                    yield Sample(
                        key=key, image=data or None, image_path=path,
                        text=None if texts[i] is None else str(texts[i]),
                        meta=json.dumps(_jsonable(extras[i]), sort_keys=True) if extras[i] else None,
                        reject=None if data else "missing_image",
                    )
                    row += 1
