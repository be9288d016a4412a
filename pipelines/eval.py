"""Retrieval evaluation over the stored embeddings of an output: image<->text recall@k.

Each kept row is one (image, caption) pair. For every image we rank all captions of the evaluated
rows by cosine similarity and ask whether its own caption is among the top k (image->text); and the
other way round (text->image). This is the zero-shot retrieval yardstick of CLIP-style training,
computed from columns phase 1 already stored, so no model runs.

Exact and blockwise: a query block of ``block_rows`` rows is scored against a candidate block of
``block_rows`` rows at a time and only counts are kept, so memory is ``block_rows**2`` floats whatever
the number of rows; one matrix product per block pair serves both directions. The cost is still
``N**2 * D`` multiply-adds (N = 20k, D = 512 is 2e11: seconds on a free core, minutes on a busy
one); for larger outputs evaluate a ``sample``.

Ties are pessimistic and therefore independent of row order, block size and sampling order: a
candidate whose score is within ``TIE_EPS`` of the true partner's counts as ranked ahead of it. Duplicate
captions or images (or a degenerate model that maps everything to one vector) therefore lower recall
instead of winning by luck.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ground.errors import ConfigError, StorageError
from ground.layout import DATA, META_DIR, RUNS
from ground.storage import describe_error, filesystem, join
from operators.models.base import l2_normalize, read_embeddings
from pipelines.ledger import Ledger

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
# 4096 x 4096 float32 scores = 64 MiB per block pair: large enough for BLAS to run at full speed,
# small enough for any worker or laptop.
DEFAULT_BLOCK_ROWS = 4096
# Scores this close to the true pair's count as ties (ranked ahead). Identical vectors can score
# differently in float32 by rounding in different BLAS code paths: about sqrt(D) * 6e-8, 2e-6 at
# D = 1024. Distinct float16-stored vectors rarely come this close, and when they do their order
# would be decided by rounding anyway.
TIE_EPS = 1e-5
EVAL_DIR = f"{META_DIR}/eval"
RUN_FILE = "eval_retrieval.json"


@dataclass
class RetrievalResult:
    """Recall figures of one evaluation; ``to_dict`` is what is written as JSON."""

    rows: int
    image_to_text: dict[str, float]
    text_to_image: dict[str, float]
    median_rank: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows_evaluated": self.rows, "image_to_text": self.image_to_text,
                "text_to_image": self.text_to_image, "median_rank": self.median_rank, **self.info}


def retrieval_ranks(image: np.ndarray, text: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of each row's true partner, image->text and text->image.

    Args:
        image: ``[n, d]`` image embeddings; row ``i`` pairs with ``text[i]``. Normalised here.
        text: ``[n, d]`` caption embeddings.
        block_rows: rows per query block and per candidate block (memory ``block_rows**2`` floats).

    Returns:
        ``(i2t, t2i)`` int64 arrays of shape ``[n]``: how many other candidates score at least the
        true partner's score minus :data:`TIE_EPS` (0 = retrieved first).
    """
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and text {text.shape} must both be [n, d]")
    if block_rows < 1:
        raise ValueError("block_rows must be >= 1")
    img = l2_normalize(np.asarray(image, dtype=np.float32))
    txt = l2_normalize(np.asarray(text, dtype=np.float32))
    n = img.shape[0]
    true = np.einsum("ij,ij->i", img, txt)
    i2t = np.zeros(n, dtype=np.int64)
    t2i = np.zeros(n, dtype=np.int64)
    for q0 in range(0, n, block_rows):
        q1 = min(n, q0 + block_rows)
        for c0 in range(0, n, block_rows):
            c1 = min(n, c0 + block_rows)
            scores = img[q0:q1] @ txt[c0:c1].T  # [images q0:q1, captions c0:c1]
            ahead_i2t = scores >= (true[q0:q1, None] - TIE_EPS)
            ahead_t2i = scores >= (true[None, c0:c1] - TIE_EPS)
            lo, hi = max(q0, c0), min(q1, c1)
            if lo < hi:  # the block holds true pairs: a row is never ahead of itself
                diag = np.arange(lo, hi)
                ahead_i2t[diag - q0, diag - c0] = False
                ahead_t2i[diag - q0, diag - c0] = False
            i2t[q0:q1] += np.count_nonzero(ahead_i2t, axis=1)
            t2i[c0:c1] += np.count_nonzero(ahead_t2i, axis=0)
    return i2t, t2i


def recall_at(ranks: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """``{"recall@k": fraction of queries whose partner ranks below k}``."""
    if ranks.size == 0:
        return {f"recall@{k}": float("nan") for k in ks}
    return {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}


def retrieval_recall(image: np.ndarray, text: np.ndarray, ks: Sequence[int] = RECALL_AT,
                     block_rows: int = DEFAULT_BLOCK_ROWS) -> RetrievalResult:
    """Image->text and text->image recall@k for paired embeddings (see :func:`retrieval_ranks`)."""
    i2t, t2i = retrieval_ranks(image, text, block_rows)
    return RetrievalResult(
        rows=int(image.shape[0]), image_to_text=recall_at(i2t, ks), text_to_image=recall_at(t2i, ks),
        median_rank={"image_to_text": float(np.median(i2t) + 1) if i2t.size else float("nan"),
                     "text_to_image": float(np.median(t2i) + 1) if t2i.size else float("nan")})


def key_hashes(keys: Sequence[str], seed: int) -> np.ndarray:
    """Stable uint64 per key (blake2b of ``"<seed>:<key>"``): the sample is the smallest hashes."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big")
                        for k in keys), dtype=np.uint64, count=len(keys))


def data_files(output: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """(filesystem, sorted Parquet paths under ``OUT/data/``)."""
    fs, root = filesystem(output, storage_options)
    try:
        found = fs.find(join(root, DATA))
    except FileNotFoundError:
        found = []
    except Exception as exc:  # noqa: BLE001 - any backend fault here is systemic
        raise StorageError(f"{output}: cannot list {DATA}/: {describe_error(exc)}") from None
    files = sorted(p for p in found if p.endswith(".parquet"))
    if not files:
        raise StorageError(f"{output}: no Parquet files under {DATA}/ (is this an mmcurate output?)")
    return fs, files


@dataclass
class PairedEmbeddings:
    """Rows with both embeddings, ordered by key hash (sampled when asked)."""

    keys: list[str]
    image: np.ndarray
    text: np.ndarray
    rows_read: int
    rows_without_pair: int


def _file_pairs(fs, path: str, image_col: str, text_col: str) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, int]]:
    """(keys, image, text, rows in batch) of the rows of one file that have both embeddings."""
    try:
        with fs.open(path, "rb") as f:  # closed here, not whenever the collector gets to it
            pf = pq.ParquetFile(f)
            missing = [c for c in ("key", image_col, text_col) if c not in pf.schema_arrow.names]
            if missing:
                raise ConfigError(f"{path}: no column(s) {missing}; evaluate a prefix whose model operator "
                                  "stored both embeddings (--column-prefix)")
            table = pf.read(columns=["key", image_col, text_col])
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{path}: cannot read: {describe_error(exc)}") from None
    for batch in table.to_batches():
        img, img_ok = read_embeddings(batch.column(image_col))
        txt, txt_ok = read_embeddings(batch.column(text_col))
        ok = img_ok & txt_ok
        keys = [k for k, keep in zip(batch.column("key").to_pylist(), ok) if keep]
        yield keys, img[ok], txt[ok], batch.num_rows


def _smallest(keys: list[str], hashes: np.ndarray, image: np.ndarray, text: np.ndarray, limit: int | None
              ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The ``limit`` rows with the smallest hashes (all rows when None), ordered by hash then key."""
    # hash first, key second: a (vanishingly rare) 64-bit collision still orders deterministically
    order = np.lexsort((np.asarray(keys, dtype=str), hashes)) if keys else np.zeros(0, dtype=np.int64)
    if limit is not None:
        order = order[:limit]
    return [keys[i] for i in order], hashes[order], image[order], text[order]


def load_pairs(output: str, prefix: str = "clip", sample: int | None = None, seed: int = 0,
               storage_options: dict[str, Any] | None = None) -> PairedEmbeddings:
    """Read the kept rows' ``<prefix>_image_embedding`` and ``<prefix>_text_embedding``.

    Rows missing either embedding (no caption) are skipped and counted. With ``sample``, keeps the
    ``sample`` rows whose key hash (:func:`key_hashes`) is smallest, holding at most about twice
    ``sample`` rows plus one record batch in memory; the same output, sample and seed always give
    the same rows. Rows come back ordered by key hash, whatever the file listing order.
    """
    image_col, text_col = f"{prefix}_image_embedding", f"{prefix}_text_embedding"
    fs, files = data_files(output, storage_options)
    keys: list[str] = []
    hash_parts: list[np.ndarray] = []
    image_parts: list[np.ndarray] = []
    text_parts: list[np.ndarray] = []
    rows_read = paired = 0

    def gathered() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        dim = image_parts[0].shape[1] if image_parts else 0
        return (keys, np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint64),
                np.concatenate(image_parts) if image_parts else np.zeros((0, dim), np.float16),
                np.concatenate(text_parts) if text_parts else np.zeros((0, dim), np.float16))

    for path in files:
        for k, img, txt, n in _file_pairs(fs, path, image_col, text_col):
            if image_parts and img.shape[1] != image_parts[0].shape[1]:
                raise ConfigError(f"{path}: {image_col} has {img.shape[1]} dimensions, earlier files "
                                  f"{image_parts[0].shape[1]} (outputs of two models under one prefix?)")
            rows_read += n
            paired += len(k)
            keys.extend(k)
            hash_parts.append(key_hashes(k, seed))
            # float16 is how they are stored: holding them so halves the memory of a large sample
            image_parts.append(img.astype(np.float16))
            text_parts.append(txt.astype(np.float16))
            if sample is not None and len(keys) > 2 * sample:
                keys, h, i, t = _smallest(*gathered(), sample)
                hash_parts, image_parts, text_parts = [h], [i], [t]
    keys, _, image, text = _smallest(*gathered(), sample)
    return PairedEmbeddings(keys, image, text, rows_read, rows_read - paired)


def latest_run(output: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest ``runs/<id>`` folder name (ids start with a UTC timestamp), or None."""
    fs, root = filesystem(output, storage_options)
    try:
        entries = fs.ls(join(root, RUNS), detail=True)
    except FileNotFoundError:
        return None
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
    return max(names) if names else None


def evaluate_retrieval(output: str, prefix: str = "clip", sample: int | None = None, seed: int = 0,
                       block_rows: int = DEFAULT_BLOCK_ROWS, storage_options: dict[str, Any] | None = None
                       ) -> tuple[RetrievalResult, list[str]]:
    """Evaluate an output's stored embeddings and write the figures next to its run stats.

    Writes ``OUT/_mmcurate/eval/retrieval-<UTC timestamp>.json`` and, when the output has runs,
    ``OUT/_mmcurate/runs/<latest id>/eval_retrieval.json``.

    Returns:
        (the result, the URLs written).

    Raises:
        StorageError: no data files, or they cannot be read.
        ConfigError: the files lack the prefix's embedding columns, or no row has both.
    """
    if sample is not None and sample < 1:
        raise ConfigError(f"--sample must be at least 1, got {sample}")
    started = time.perf_counter()
    pairs = load_pairs(output, prefix, sample, seed, storage_options)
    if not pairs.keys:
        raise ConfigError(f"{output}: no kept row has both {prefix}_image_embedding and {prefix}_text_embedding")
    result = retrieval_recall(pairs.image, pairs.text, block_rows=block_rows)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_id = latest_run(output, storage_options)
    result.info = {
        "kind": "retrieval", "output": output, "column_prefix": prefix,
        "embedding_dim": int(pairs.image.shape[1]), "rows_read": pairs.rows_read,
        "rows_without_both_embeddings": pairs.rows_without_pair, "sample": sample, "seed": seed,
        "block_rows": block_rows,
        "ties": f"pessimistic: candidates within {TIE_EPS} of the true score rank ahead of it",
        "run_id": run_id, "created": stamp, "seconds": round(time.perf_counter() - started, 3),
    }
    ledger = Ledger(output, storage_options)
    written = [f"{EVAL_DIR}/retrieval-{stamp}.json"]
    ledger.write_json(written[0], result.to_dict())
    if run_id is not None:
        written.append(f"{RUNS}/{run_id}/{RUN_FILE}")
        ledger.write_json(written[1], result.to_dict())
    else:
        logger.warning("%s has no %s/ folder; figures written under %s/ only", output, RUNS, EVAL_DIR)
    return result, [join(output, w) for w in written]
