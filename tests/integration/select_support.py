"""Annotated phase-1 outputs built directly, for select tests and benchmarks.

Phase 1 is the expensive boundary of these tests: instead of decoding and running models we
write what ``mmcurate run`` commits (Parquet under ``OUT/data`` in the output schema, one ledger
record per shard through the real :class:`Ledger`). Everything select does is then real.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ground.layout import DATA, LEDGER, shard_tag
from ground.schema import IMAGE_TYPE, PHASH_WINDOWS_TYPE, output_schema
from ground.storage import filesystem, is_local, join
from pipelines.ledger import Ledger

EMBED_DIM = 8


def row(key: str, image: bytes | None = None, *, text: str = "a photo of a thing", clip_score: float = 0.3,
        width: int = 64, height: int = 64, phash: int | None = None, embedding: list[float] | None = None,
        sha256: str | None = None, **extra: Any) -> dict[str, Any]:
    """One annotated row; ``sha256`` defaults to the digest of ``image`` (or of the key)."""
    data = image if image is not None else key.encode()
    return {"key": key, "image": {"bytes": image, "path": f"{key}.jpg"}, "text": text, "meta": "{}",
            "sha256": sha256 or hashlib.sha256(data).hexdigest(), "reject_reason": None, "width": width,
            "height": height, "format": "jpeg", "phash": phash if phash is not None else _fake_phash(key),
            "clip_score": clip_score,
            "clip_image_embedding": embedding if embedding is not None else _fake_embedding(key), **extra}


def _fake_phash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


def _fake_embedding(key: str) -> list[float]:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big"))
    v = rng.normal(size=EMBED_DIM)
    return list((v / np.linalg.norm(v)).astype(np.float32))


def table(rows: list[dict[str, Any]], shard: str) -> pa.Table:
    extra_fields = []
    for name in sorted({k for r in rows for k in r} - {
            "key", "image", "text", "meta", "sha256", "reject_reason", "width", "height", "format", "phash",
            "clip_score", "clip_image_embedding"}):
        sample = next(r[name] for r in rows if name in r)
        typ = pa.string() if isinstance(sample, str) else pa.float32() if isinstance(sample, float) else None
        if name == "phash_windows":
            typ = PHASH_WINDOWS_TYPE
        elif isinstance(sample, list):
            typ = pa.list_(pa.float16(), len(sample))
        extra_fields.append(pa.field(name, typ or pa.int64()))
    dim = len(rows[0]["clip_image_embedding"]) if rows else EMBED_DIM
    schema = pa.schema([
        ("key", pa.string()), ("source_shard", pa.string()), ("image", IMAGE_TYPE), ("text", pa.string()),
        ("meta", pa.string()), ("sha256", pa.string()), ("reject_reason", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("format", pa.string()), ("phash", pa.int64()), ("clip_score", pa.float32()),
        ("clip_image_embedding", pa.list_(pa.float16(), dim)), *extra_fields])
    lists = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type)]
    full = [{**r, "source_shard": shard, **{c: [np.float16(x) for x in r[c]] for c in lists if r.get(c) is not None}}
            for r in rows]
    return pa.Table.from_pylist(full, schema=schema)


def write_annotated_output(out: str, shards: dict[str, list[dict[str, Any]]],
                           storage_options: dict[str, Any] | None = None, files_per_shard: int = 1) -> list[str]:
    """Write ``OUT/data`` files and ledger records as phase 1 commits them. Returns the data file names."""
    storage_options = storage_options or {}
    fs, root = filesystem(out, storage_options)
    ledger = Ledger(out, storage_options)
    names = []
    for shard, rows in shards.items():
        t = table(rows, shard)
        tag = shard_tag(shard)
        schema = output_schema(t.schema, {"pipeline": "test", "config_hash": "synthetic"})
        t = t.select(schema.names).cast(schema)
        files = []
        bounds = np.linspace(0, t.num_rows, files_per_shard + 1).astype(int)
        for seq in range(files_per_shard):
            part = t.slice(bounds[seq], bounds[seq + 1] - bounds[seq])
            name = f"{tag}-{seq:05d}.parquet"
            path = join(root, DATA, name)
            if is_local(fs):
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            buf = io.BytesIO()
            pq.write_table(part, buf)
            fs.pipe_file(path, buf.getvalue())
            files.append(name)
            names.append(name)
        ledger.write_json(f"{LEDGER}/{tag}.json", {
            "shard": shard, "tag": tag, "rows_in": t.num_rows, "kept": t.num_rows, "rejected": 0,
            "rejected_by_reason": {}, "damage": None, "files": {"data": files, "rejected": []},
            "run_id": "synthetic", "config_hash": "synthetic", "pipeline": "test"})
    return names
