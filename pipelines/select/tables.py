"""Per-block work of phase 2 on pyarrow tables: no Ray here, so each piece is unit-testable.

The narrow table of a select run holds, per input row, only what decisions need: ``key``,
``sha256``, the rule and dedup columns, the survivor-order columns ``_o<i>`` (float64, lower is
better), and the bookkeeping ``_fid`` (input file index), ``_row`` (row position in the file),
``_rid`` (``_fid << 32 | _row``, unique and stable), ``_reason``, ``_dup_of``, ``_method``.
A row is *alive* while ``_reason`` is null.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.dedup import graph
from operators.dedup.phash import band_signatures, hamming
from pipelines.select.config import PIXELS, CompareRule, SelectConfig

FID, ROW, RID, REASON, DUP_OF, METHOD = "_fid", "_row", "_rid", "_reason", "_dup_of", "_method"
INDEXED = "_indexed"
BUCKET = "_bucket"
XKEY = "_xkey"
CLUSTER = "_cluster"
BOOKKEEPING = [pa.field(FID, pa.int32()), pa.field(ROW, pa.int32()), pa.field(RID, pa.int64()),
               pa.field(REASON, pa.string()), pa.field(DUP_OF, pa.string()), pa.field(METHOD, pa.string())]
_PY_OPS = {">=": pc.greater_equal, "<=": pc.less_equal, ">": pc.greater, "<": pc.less,
           "==": pc.equal, "!=": pc.not_equal}


def cluster_column(column: str) -> str:
    """Where a row's k-means cluster for embedding ``column`` is kept after its dedup step."""
    return f"{CLUSTER}_{column}"


def order_columns(n: int) -> list[str]:
    return [f"_o{i}" for i in range(n)]


def make_rid(fid: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(fid) << np.int64(32)) | rows.astype(np.int64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread, stable uint64 from each int64 (row ids, signatures)."""
    z = np.asarray(x).astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shuffle_bucket(values: pa.Array | pa.ChunkedArray, buckets: int) -> pa.Array:
    """Bucket ``0..buckets-1`` of each value, equal for equal values on every worker and run.

    Integers are mixed with :func:`mix64`; strings hashed by pandas' ``hash_array`` (SipHash
    with a fixed key, vectorised). Nulls share one bucket.
    """
    import pandas as pd

    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_integer(arr.type):
        h = mix64(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False))
    else:
        strings = pc.fill_null(pc.cast(arr, pa.string()), "").to_numpy(zero_copy_only=False)
        h = pd.util.hash_array(np.asarray(strings, dtype=object), categorize=False)
    return pa.array((h % np.uint64(buckets)).astype(np.int32))


def alive_mask(t: pa.Table) -> np.ndarray:
    return pc.is_null(t[REASON]).to_numpy(zero_copy_only=False)


def with_reason(reasons: pa.Array | pa.ChunkedArray, mask: np.ndarray, reason: str) -> pa.Array:
    """``reasons`` with ``reason`` set where ``mask`` is true (the callers only mask alive rows)."""
    return pc.if_else(pa.array(mask), pa.scalar(reason, pa.string()), reasons)


def evaluate_rule(t: pa.Table, rule: CompareRule) -> np.ndarray:
    """Boolean pass mask of one comparison; null values fail."""
    col = t[rule.column]
    if rule.op in ("in", "not in"):
        values = pa.array(rule.value)
        if values.type != col.type:
            values = values.cast(col.type)
        mask = pc.is_in(col, value_set=values)
        if rule.op == "not in":
            mask = pc.invert(mask)
    else:
        value = pa.scalar(rule.value)
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
            col = pc.cast(col, pa.float64())
            value = pa.scalar(float(rule.value))
        mask = _PY_OPS[rule.op](col, value)
    mask = pc.and_(mask, pc.is_valid(t[rule.column]))
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def narrow(t: pa.Table, fid: int, cfg: SelectConfig, keep: list[str]) -> pa.Table:
    """The narrow table of one input file: bookkeeping, order columns, comparison-rule verdicts."""
    n = t.num_rows
    rows = np.arange(n, dtype=np.int32)
    reasons = pa.nulls(n, pa.string())
    pending = np.ones(n, dtype=bool)
    for rule in cfg.rules:
        if isinstance(rule, CompareRule):
            fail = pending & ~evaluate_rule(t, rule)
            if fail.any():
                reasons = with_reason(reasons, fail, rule.reason)
            pending &= ~fail
    out = t.select([c for c in keep if c in t.column_names])
    for i, (column, descending) in enumerate(cfg.order()):
        if column == PIXELS:
            w = pc.fill_null(pc.cast(t["width"], pa.float64()), math.nan).to_numpy(zero_copy_only=False)
            h = pc.fill_null(pc.cast(t["height"], pa.float64()), math.nan).to_numpy(zero_copy_only=False)
            values = w * h
        else:
            values = pc.fill_null(pc.cast(t[column], pa.float64()), math.nan).to_numpy(zero_copy_only=False)
        values = -values if descending else values
        out = out.append_column(f"_o{i}", pa.array(np.where(np.isnan(values), np.inf, values)))
    out = out.append_column(FID, pa.array(np.full(n, fid, dtype=np.int32)))
    out = out.append_column(ROW, pa.array(rows))
    out = out.append_column(RID, pa.array(make_rid(fid, rows)))
    out = out.append_column(REASON, reasons)
    out = out.append_column(DUP_OF, pa.nulls(n, pa.string()))
    return out.append_column(METHOD, pa.nulls(n, pa.string()))


def rank(t: pa.Table, n_order: int, indexed: np.ndarray | None = None) -> np.ndarray:
    """Survivor rank of every row of ``t`` (0 = survivor): index entries first, then the order
    columns, then ``key``, then ``_rid``."""
    cols: list[tuple[np.ndarray, bool]] = []
    if indexed is not None:
        cols.append((~indexed, False))
    for c in order_columns(n_order):
        cols.append((pc.fill_null(t[c], math.inf).to_numpy(zero_copy_only=False), False))
    cols.append((np.asarray(pc.fill_null(t["key"], "").to_pylist(), dtype=object).astype(str), False))
    cols.append((t[RID].to_numpy(zero_copy_only=False), False))
    return graph.survivor_rank(cols)


def mark_duplicates(t: pa.Table, labels: np.ndarray, members: np.ndarray, method: str, n_order: int,
                    indexed: np.ndarray) -> pa.Table:
    """Set ``_reason``/``_dup_of``/``_method`` on the non-survivors of each component.

    Args:
        t: rows (alive ones and, marked by ``indexed``, index entries).
        labels: component label per row of ``t`` (rows outside ``members`` are ignored).
        members: rows taking part (alive or indexed).
        method: dedup method name.
        n_order: number of ``_o<i>`` columns.
        indexed: rows that are index entries (already kept on an earlier run): always survivors.
    """
    reasons = t[REASON].to_pylist()
    dup_of = t[DUP_OF].to_pylist()
    methods = t[METHOD].to_pylist()
    keys = t["key"].to_pylist()
    ranks = rank(t, n_order, indexed)
    idx = np.nonzero(members)[0]
    if len(idx):
        order = idx[np.lexsort((ranks[idx], labels[idx]))]
        first_of = {}
        for i in order:
            first_of.setdefault(labels[i], i)
        for i in idx:
            s = first_of[labels[i]]
            if s != i and not indexed[i]:
                reasons[i] = f"dedup:{method}"
                dup_of[i] = keys[s]
                methods[i] = method
    out = t.set_column(t.column_names.index(REASON), REASON, pa.array(reasons, pa.string()))
    out = out.set_column(out.column_names.index(DUP_OF), DUP_OF, pa.array(dup_of, pa.string()))
    return out.set_column(out.column_names.index(METHOD), METHOD, pa.array(methods, pa.string()))


def normalised_caption(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def caption_digest(texts: list[str | None]) -> list[str]:
    return [hashlib.sha256(normalised_caption(x).encode()).hexdigest() for x in texts]


def exact_key(t: pa.Table, caption: bool, caption_column: str = "text") -> pa.Array:
    """The exact-dedup group key; "" (never null: Ray's map_groups mis-splits null keys) when sha256 is null."""
    if not caption:
        return pc.fill_null(t["sha256"].combine_chunks(), "")
    digests = caption_digest(t[caption_column].to_pylist())
    return pa.array(["" if s is None else f"{s}|{d}" for s, d in zip(t["sha256"].to_pylist(), digests)],
                    pa.string())


def exact_groups(t: pa.Table, n_order: int) -> pa.Table:
    """Many sha256 groups at once (one shuffle bucket): per group keep the best row (or the
    index entry) and mark the rest ``dedup:exact``. Vectorised over the groups, so a bucket of
    a million mostly-unique keys costs a few array passes, not a million function calls."""
    indexed = t[INDEXED].to_numpy(zero_copy_only=False) if INDEXED in t.column_names else np.zeros(t.num_rows, bool)
    if t.num_rows:
        xkey = pc.fill_null(t[XKEY], "").combine_chunks()
        labels = pc.dictionary_encode(xkey).indices.to_numpy(zero_copy_only=False).astype(np.int64)
        members = (alive_mask(t) | indexed) & pc.not_equal(xkey, "").to_numpy(zero_copy_only=False)
        counts = np.bincount(labels[members], minlength=int(labels.max()) + 1)
        members &= counts[labels] > 1
        if members.any():
            t = mark_duplicates(t, labels, members, "exact", n_order, indexed)
    return t.filter(pa.array(~indexed)).drop_columns([c for c in (XKEY, INDEXED, BUCKET) if c in t.column_names])


WINDOWS = "phash_windows"
IS_WINDOW = "_win"


def phash_bucket(t: pa.Table, max_distance: int) -> pa.Table:
    """Confirmed pairs in one LSH bucket: rows ``(u, v)`` of ``_rid``s within ``max_distance``.

    Entries are full hashes and, where the input has them, window hashes (``_win``): a full hash
    matches a full hash or another row's window, never window against window
    (:func:`operators.dedup.graph.phash_window_pairs`). Pairs between two index entries are
    dropped (they were settled on earlier runs), and so are a row's windows against itself.
    """
    if t.num_rows < 2:
        return pa.table({"u": pa.array([], pa.int64()), "v": pa.array([], pa.int64())})
    t = t.sort_by([(RID, "ascending"), (IS_WINDOW, "ascending")])
    hashes = t["phash"].to_numpy(zero_copy_only=False)
    is_window = t[IS_WINDOW].to_numpy(zero_copy_only=False)
    if is_window.any():
        a, b = graph.phash_window_pairs(hashes, is_window, max_distance)
    else:
        a, b = graph.phash_pairs(hashes, max_distance)
    rid = t[RID].to_numpy(zero_copy_only=False)
    indexed = t[INDEXED].to_numpy(zero_copy_only=False)
    keep = ~(indexed[a] & indexed[b]) & (rid[a] != rid[b])
    u, v = rid[a][keep], rid[b][keep]
    return pa.table({"u": pa.array(np.minimum(u, v)), "v": pa.array(np.maximum(u, v))})


# LSH buckets up to this size are paired all-against-all by array offsets, all buckets of a
# shuffle bucket at once; larger ones (equal placeholder images, narrow bands) go one by one
# through phash_bucket, whose equal-hash chaining keeps them linear.
SMALL_BUCKET = 64


def phash_buckets(t: pa.Table, max_distance: int) -> pa.Table:
    """Confirmed pairs of every LSH bucket (``_sig``) in ``t``; same result as :func:`phash_bucket`
    on each bucket, with the many small buckets handled in a few vectorised passes."""
    empty = pa.table({"u": pa.array([], pa.int64()), "v": pa.array([], pa.int64())})
    if t.num_rows < 2:
        return empty
    t = t.sort_by([("_sig", "ascending"), (RID, "ascending"), (IS_WINDOW, "ascending")])
    sig = t["_sig"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, sig[1:] != sig[:-1]])
    sizes = np.diff(np.r_[starts, len(sig)])
    out = []
    large = sizes > SMALL_BUCKET
    for start, n in zip(starts[large].tolist(), sizes[large].tolist()):
        out.append(phash_bucket(t.slice(start, n), max_distance))
    small = (sizes >= 2) & (sizes <= SMALL_BUCKET)
    if small.any():
        size_of = np.repeat(np.where(small, sizes, 0), sizes)
        pos = np.arange(len(sig)) - np.repeat(starts, sizes)
        hashes = t["phash"].to_numpy(zero_copy_only=False)
        is_window = t[IS_WINDOW].to_numpy(zero_copy_only=False)
        rid = t[RID].to_numpy(zero_copy_only=False)
        indexed = t[INDEXED].to_numpy(zero_copy_only=False)
        left = np.flatnonzero(size_of >= 2)
        us, vs = [], []
        for d in range(1, int(size_of.max())):
            left = left[pos[left] + d < size_of[left]]
            if not len(left):
                break
            right = left + d
            ok = ((hamming(hashes[left], hashes[right]) <= max_distance) & ~(is_window[left] & is_window[right])
                  & ~(indexed[left] & indexed[right]) & (rid[left] != rid[right]))
            us.append(rid[left[ok]])
            vs.append(rid[right[ok]])
        if us:
            u, v = np.concatenate(us), np.concatenate(vs)
            out.append(pa.table({"u": pa.array(np.minimum(u, v)), "v": pa.array(np.maximum(u, v))}))
    out = [o for o in out if o.num_rows]
    if not out:
        return empty
    pairs = pa.concat_tables(out)
    # the same pair shows up in several bands: send each once
    pairs = np.unique(np.stack([pairs["u"].to_numpy(), pairs["v"].to_numpy()], axis=1), axis=0)
    return pa.table({"u": pa.array(pairs[:, 0]), "v": pa.array(pairs[:, 1])})


def phash_signatures(t: pa.Table, max_distance: int) -> pa.Table:
    """One row per (alive row or index entry, hash, band): ``_sig``, ``_rid``, ``phash``, ``_win``, flag.

    Each row contributes its full hash and, where ``phash_windows`` is present and not null, its
    window hashes (``_win`` true), each split into the same ``max_distance + 1`` bands.
    """
    if INDEXED in t.column_names:
        take = t
    else:
        take = t.filter(pa.array(alive_mask(t) & pc.is_valid(t["phash"]).to_numpy(zero_copy_only=False)))
    n = take.num_rows
    indexed = take[INDEXED].to_numpy(zero_copy_only=False) if INDEXED in take.column_names else np.zeros(n, bool)
    rids = take[RID].to_numpy(zero_copy_only=False)
    hashes = [take["phash"].to_numpy(zero_copy_only=False).astype(np.int64)]
    owners, flags, wins = [np.arange(n)], [indexed], [np.zeros(n, bool)]
    if WINDOWS in take.column_names and n:
        col = take[WINDOWS].combine_chunks()
        valid = np.nonzero(col.is_valid().to_numpy(zero_copy_only=False))[0]
        if len(valid):
            present = col.take(pa.array(valid))
            values = present.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            lengths = pc.list_value_length(present).to_numpy(zero_copy_only=False)
            owner = np.repeat(valid, lengths)
            hashes.append(values)
            owners.append(owner)
            flags.append(indexed[owner])
            wins.append(np.ones(len(values), bool))
    h, owner = np.concatenate(hashes), np.concatenate(owners)
    sigs = band_signatures(h, max_distance) if len(h) else np.zeros((0, max_distance + 1), np.int64)
    bands = sigs.shape[1]
    return pa.table({
        "_sig": pa.array(sigs.reshape(-1)),
        RID: pa.array(np.repeat(rids[owner], bands)),
        "phash": pa.array(np.repeat(h, bands)),
        IS_WINDOW: pa.array(np.repeat(np.concatenate(wins), bands)),
        INDEXED: pa.array(np.repeat(np.concatenate(flags), bands)),
    })


def components_decisions(edges: pa.Table, nodes: pa.Table, method: str, n_order: int) -> pa.Table:
    """Connected components over ``edges`` (``u``, ``v`` rids); the non-survivors as decisions.

    ``nodes`` holds every rid taking part: ``_rid``, ``key``, ``_o<i>``, ``_indexed``.
    Returns ``_rid``, ``_dup_of``, ``_method`` for each row that is a duplicate.
    """
    empty = pa.table({RID: pa.array([], pa.int64()), DUP_OF: pa.array([], pa.string()),
                      METHOD: pa.array([], pa.string())})
    if edges.num_rows == 0:
        return empty
    rids = nodes[RID].to_numpy(zero_copy_only=False)
    _, first = np.unique(rids, return_index=True)
    nodes = nodes.take(pa.array(first))
    rids = nodes[RID].to_numpy(zero_copy_only=False)
    u = np.searchsorted(rids, edges["u"].to_numpy(zero_copy_only=False))
    v = np.searchsorted(rids, edges["v"].to_numpy(zero_copy_only=False))
    labels = graph.connected_components(len(rids), u, v)
    indexed = nodes[INDEXED].to_numpy(zero_copy_only=False)
    work = nodes.append_column(REASON, pa.nulls(nodes.num_rows, pa.string()))
    work = work.append_column(DUP_OF, pa.nulls(nodes.num_rows, pa.string()))
    work = work.append_column(METHOD, pa.nulls(nodes.num_rows, pa.string()))
    sizes = np.bincount(labels, minlength=len(labels))
    marked = mark_duplicates(work, labels, sizes[labels] > 1, method, n_order, indexed)
    dups = marked.filter(pc.is_valid(marked[DUP_OF]))
    return dups.select([RID, DUP_OF, METHOD]) if dups.num_rows else empty


def apply_decisions(t: pa.Table, decisions: pa.Table) -> pa.Table:
    """Set the duplicate verdicts of ``decisions`` (sorted by ``_rid``) on the alive rows of ``t``."""
    if decisions.num_rows == 0 or t.num_rows == 0:
        return t
    drid = decisions[RID].to_numpy(zero_copy_only=False)
    rid = t[RID].to_numpy(zero_copy_only=False)
    pos = np.clip(np.searchsorted(drid, rid), 0, len(drid) - 1)
    hit = (drid[pos] == rid) & alive_mask(t)
    if not hit.any():
        return t
    reasons, dup_of, methods = t[REASON].to_pylist(), t[DUP_OF].to_pylist(), t[METHOD].to_pylist()
    d_dup, d_method = decisions[DUP_OF].to_pylist(), decisions[METHOD].to_pylist()
    for i in np.nonzero(hit)[0]:
        j = pos[i]
        reasons[i], dup_of[i], methods[i] = f"dedup:{d_method[j]}", d_dup[j], d_method[j]
    out = t.set_column(t.column_names.index(REASON), REASON, pa.array(reasons, pa.string()))
    out = out.set_column(out.column_names.index(DUP_OF), DUP_OF, pa.array(dup_of, pa.string()))
    return out.set_column(out.column_names.index(METHOD), METHOD, pa.array(methods, pa.string()))


def embeddings(t: pa.Table, column: str) -> np.ndarray:
    """``[n, D]`` float32 from a fixed_size_list column (null rows become zeros)."""
    col = t[column].combine_chunks()
    dim = col.type.list_size
    filled = pc.fill_null(col, pa.scalar([0.0] * dim, col.type)) if col.null_count else col
    flat = filled.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(col), dim)


def semantic_group(t: pa.Table, method: str, column: str, eps: float, n_order: int) -> pa.Table:
    """One k-means cluster: cosine >= 1 - eps pairs, components, one survivor each (SemDeDup)."""
    indexed = t[INDEXED].to_numpy(zero_copy_only=False)
    valid = pc.is_valid(t[column]).to_numpy(zero_copy_only=False) & (
        pc.fill_null(t[CLUSTER], -1).to_numpy(zero_copy_only=False) >= 0)
    members = (alive_mask(t) | indexed) & valid
    idx = np.nonzero(members)[0]
    if len(idx) > 1:
        emb = graph.normalise_rows(embeddings(t.take(pa.array(idx)), column))
        a, b = graph.cosine_pairs(emb, 1.0 - eps)
        both_indexed = indexed[idx][a] & indexed[idx][b]
        labels = np.arange(t.num_rows, dtype=np.int64)
        sub = graph.connected_components(len(idx), a[~both_indexed], b[~both_indexed])
        labels[idx] = idx[sub]
        t = mark_duplicates(t, labels, members, method, n_order, indexed)
    return t.filter(pa.array(~indexed)).drop_columns([INDEXED])


def conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` with exactly ``schema``'s columns: missing ones null, others cast."""
    cols = []
    for f in schema:
        if f.name in t.column_names:
            col = t[f.name]
            cols.append(col if col.type == f.type else pc.cast(col, f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.table(cols, schema=schema)


def safe_name(column: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", column)


def decision_columns(t: pa.Table) -> dict[str, Any]:
    """The output columns of one file from its narrow rows (sorted by ``_row``)."""
    return {"reject_reason": t[REASON], "duplicate_of": t[DUP_OF], "dedup_method": t[METHOD]}


def top_fraction_counts(t: pa.Table, group_col: str) -> list[tuple[str, int]]:
    """(group, alive rows) of a sorted block, in order of first appearance."""
    alive = t.filter(pa.array(alive_mask(t)))
    counts = pc.value_counts(alive[group_col].combine_chunks())
    return list(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def top_fraction_cut(t: pa.Table, group_col: str, starts: dict[str, int], keep: dict[str, int],
                     reason: str) -> pa.Table:
    """Reject the alive rows of a sorted block whose rank in their group is ``>= keep[group]``.

    A row's rank is its group's rows in earlier blocks (``starts``) plus the alive rows of its
    group before it in this block.
    """
    alive = alive_mask(t)
    idx = np.flatnonzero(alive)
    if not len(idx):
        return t
    encoded = pc.dictionary_encode(t[group_col].combine_chunks().take(pa.array(idx)))
    names = encoded.dictionary.to_pylist()
    labels = encoded.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    within = np.empty(len(idx), np.int64)
    within[order] = np.arange(len(idx)) - first
    base = np.array([starts.get(g, 0) for g in names], np.int64)
    limit = np.array([keep[g] for g in names], np.int64)
    cut = idx[base[labels] + within >= limit[labels]]
    if not len(cut):
        return t
    mask = np.zeros(t.num_rows, bool)
    mask[cut] = True
    return t.set_column(t.column_names.index(REASON), REASON, with_reason(t[REASON], mask, reason))


def top_fraction_keep(total: int, fraction: float) -> int:
    """Rows kept of a group of ``total``: ``ceil(fraction * total)`` (a tiny epsilon absorbs float
    noise such as 0.3 * 10 = 3.0000000000000004)."""
    return min(total, math.ceil(fraction * total - 1e-9))


__all__ = ["hamming"]
