"""The row schema: core column names and types are part of the product (DESIGN.md)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# Columns every reader emits, in this order.
READER_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source_shard", pa.string()),
    ("image", IMAGE_TYPE),
    ("text", pa.string()),
    ("meta", pa.string()),
    ("sha256", pa.string()),
    ("reject_reason", pa.string()),
])

# Columns the decode operator adds.
DECODE_FIELDS = [
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("format", pa.string()),
    # 64-bit DCT perceptual hash, bits reinterpreted as signed (operators/dedup/phash.py)
    pa.field("phash", pa.int64()),
    # pHash of 9 sub-windows (96 % of each side at offsets 0/2/4 %), so crops are found as
    # duplicates (operators/dedup/phash.py: phash_with_windows)
    pa.field("phash_windows", pa.list_(pa.int64(), 9)),
]
PHASH_WINDOWS_TYPE = DECODE_FIELDS[-1].type

# Internal bookkeeping columns for the commit loop; never written to output files.
#   _shard_rows: set on the rows of a shard's last block to the shard's total row count.
#   _shard_damage: set alongside it when the reader hit damage (truncated tar, ...).
#   _shard_marker: set on a marker row that is not a sample: "end" (a shard that ended with no
#   rows to stamp, e.g. damaged before its first sample) or "failed" (the read failed; the
#   message is in _shard_damage). Writers never write marker rows; they report them.
SHARD_ROWS = "_shard_rows"
SHARD_DAMAGE = "_shard_damage"
SHARD_MARKER = "_shard_marker"
MARKER_END = "end"
MARKER_FAILED = "failed"
INTERNAL_FIELDS = [pa.field(SHARD_ROWS, pa.int64()), pa.field(SHARD_DAMAGE, pa.string()),
                   pa.field(SHARD_MARKER, pa.string())]

CORE_ORDER = [f.name for f in READER_SCHEMA] + [f.name for f in DECODE_FIELDS]

# HF datasets reads this schema-metadata key to restore features, so
# `datasets.load_dataset("parquet", ...)` decodes `image` as a PIL image.
HF_METADATA_KEY = b"huggingface"
MMCURATE_METADATA_KEY = b"mmcurate"


def _hf_feature(name: str, typ: pa.DataType) -> dict[str, Any] | None:
    if name == "image" and typ.equals(IMAGE_TYPE):
        return {"_type": "Image"}
    if pa.types.is_fixed_size_list(typ):
        inner = _hf_feature(name, typ.value_type)
        return {"_type": "List", "feature": inner, "length": typ.list_size} if inner else None
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return {"dtype": "string", "_type": "Value"}
    if pa.types.is_binary(typ):
        return {"dtype": "binary", "_type": "Value"}
    for check, dtype in ((pa.types.is_int32, "int32"), (pa.types.is_int64, "int64"),
                         (pa.types.is_float16, "float16"), (pa.types.is_float32, "float32"),
                         (pa.types.is_float64, "float64"), (pa.types.is_boolean, "bool")):
        if check(typ):
            return {"dtype": dtype, "_type": "Value"}
    return None


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The HF datasets ``Features`` dict for ``schema`` (columns it cannot express are left out)."""
    feats = {}
    for f in schema:
        feat = _hf_feature(f.name, f.type)
        if feat is not None:
            feats[f.name] = feat
    return feats


def output_schema(schema: pa.Schema, file_meta: dict[str, Any]) -> pa.Schema:
    """Order core columns first and attach the HF and mmcurate key-value metadata."""
    names = [n for n in CORE_ORDER if n in schema.names] + sorted(
        n for n in schema.names if n not in CORE_ORDER and not n.startswith("_"))
    fields = [schema.field(n) for n in names]
    out = pa.schema(fields)
    feats = hf_features(out)
    if len(feats) == len(fields):
        hf = {"info": {"features": feats}}
    else:  # a column HF cannot describe: give it no features rather than wrong ones
        hf = None
    meta = {MMCURATE_METADATA_KEY: json.dumps(file_meta, sort_keys=True).encode()}
    if hf:
        meta[HF_METADATA_KEY] = json.dumps(hf).encode()
    return out.with_metadata(meta)
