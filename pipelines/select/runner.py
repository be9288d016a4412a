"""Phase 2 on Ray Data: rules, top fractions and dedup over an annotated output, committed exactly once.

The unit of commit is one input file of ``OUT/data`` (as the source ledger names it). A run:

1. lists the committed input files and the curated ledger; a *plan* is the set of input files
   whose decisions are computed together (recorded in ``CURATED/_mmcurate/select/plan.json``
   before any work, so a killed run is redone over exactly the same set);
2. reads a narrow table per file (one task each): key, digests, rule/dedup/order columns,
   comparison-rule verdicts;
3. global steps, each a Ray Data shuffle keyed by data, never by arrival order: top fractions
   (distributed sort, exact rank per group), exact dedup (groupby digest), pHash (LSH band
   groupby, then connected components over the confirmed pairs), SemDeDup (k-means fit on a
   deterministic sample, assign per block, groupby cluster);
4. ``groupby(_fid)``: each input file's task re-reads the file, attaches the verdicts, writes
   staged data/rejected files and index entries, and returns small file records;
5. the driver publishes a file's index entries then commits it through :class:`Ledger` (ledger
   record last).

Only file records, per-block group counts and k-means centroids reach the driver.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ground import SCHEMA_VERSION, __version__
from ground.errors import AccountingError, ConfigError, LockHeldError
from ground.layout import DATA, LEDGER, META_DIR, REJECTED, RUNS, STAGING, shard_tag
from ground.schema import MMCURATE_METADATA_KEY, PHASH_WINDOWS_TYPE as WINDOWS_TYPE
from ground.storage import filesystem, is_local, join, retry, to_url
from operators.dedup import graph
from pipelines.config import OutputConfig, RayConfig
from pipelines.ledger import Ledger, ShardProgress
from pipelines.lock import RunLock
from pipelines.select import tables as T
from pipelines.select.config import SORT_SHUFFLE_MAX_ROWS, SelectConfig, TopFraction
from pipelines.select.index import EXACT, PHASH, DedupIndex, semantic_kind

logger = logging.getLogger(__name__)

PLAN_FILE = f"{META_DIR}/select/plan.json"
# Ray's default of 200 hash-shuffle partitions is sized for clusters; one partition per input
# file (at most 200) keeps small selects from paying for 200 aggregators.
MAX_DEFAULT_PARTITIONS = 200
# Sample rows are picked by a hash of their row id: deterministic, spread over every file.
_SAMPLE_MODULUS = 1 << 20
SELECT_NUM_CPUS = 0.5
# Entries per shuffle bucket of a dedup step (a narrow row is ~100 bytes: ~200 MB a bucket).
ROWS_PER_BUCKET = 2_000_000
# Columns read when a file has them: outputs annotated before decode added window hashes lack them.
_OPTIONAL_COLUMNS = (T.WINDOWS,)


@dataclass
class SelectSummary:
    run_id: str
    decision_hash: str
    files_found: int = 0
    files_skipped: int = 0
    files_committed: int = 0
    rows_in: int = 0
    kept: int = 0
    rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    plans: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "phase": "select", "decision_hash": self.decision_hash,
                "mmcurate_version": __version__, "schema_version": SCHEMA_VERSION,
                "files": {"found": self.files_found, "skipped_committed": self.files_skipped,
                          "committed": self.files_committed},
                "rows_in": self.rows_in, "kept": self.kept, "rejected": self.rejected,
                "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
                "plans": self.plans, "elapsed_s": round(self.elapsed_s, 3),
                "rows_per_s": round(self.rows_in / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0}


def input_files(source: str, storage_options: dict[str, Any]) -> list[str]:
    """URLs of the kept-row files of every committed shard of ``source``, sorted.

    Raises:
        ConfigError: ``source`` has no ledger (it is not a phase-1 output).
    """
    return _scan_input(source, storage_options)[0]


def _scan_input(source: str, storage_options: dict[str, Any]) -> tuple[list[str], int]:
    """(:func:`input_files`, kept rows over those files as the phase-1 ledger records them)."""
    ledger = Ledger(source, storage_options)
    records = ledger.records()
    fs, root = filesystem(source, storage_options)
    if not records and not fs.exists(join(root, LEDGER)):
        raise ConfigError(f"--from {source}: no {LEDGER} there (not an mmcurate run output)")
    files = [to_url(fs, join(root, DATA, name)) for rec in records for name in rec["files"].get(DATA, [])]
    return sorted(files), sum(int(rec.get("kept") or 0) for rec in records)


def read_schema(url: str, storage_options: dict[str, Any]) -> pa.Schema:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def narrow_columns(cfg: SelectConfig) -> list[str]:
    cols = ["key", "sha256"]
    for name, method in cfg.methods():
        if name == "phash":
            cols.append("phash")
            if method.windows:
                cols.append(T.WINDOWS)
        elif name == "exact" and method.caption:
            cols.append("text")
        elif name in ("semantic", "caption"):
            cols.append(method.column)
    for rule in cfg.rules:
        if isinstance(rule, TopFraction):
            cols += rule.columns
    return list(dict.fromkeys(cols))


def _read_cols(cfg: SelectConfig) -> list[str]:
    cols = set(narrow_columns(cfg)) | set(cfg.needed_columns())
    return sorted(cols)


class _Context:
    """What the Ray stages of one plan share (picklable)."""

    def __init__(self, cfg: SelectConfig, files: list[str], pending: set[int], source_options: dict[str, Any],
                 target: str, target_options: dict[str, Any], run_id: str, plan_id: str, partitions: int,
                 input_rows: int = 0):
        self.cfg = cfg
        self.files = files
        self.pending = pending
        self.source_options = source_options
        self.target = target
        self.target_options = target_options
        self.run_id = run_id
        self.plan_id = plan_id
        self.partitions = partitions
        self.input_rows = input_rows
        self.n_order = len(cfg.order())

    def buckets(self, entries_per_row: int = 1) -> int:
        """Shuffle buckets for a step that shuffles ``entries_per_row`` entries per input row:
        at least one per partition, and few enough entries in each that one fits a worker."""
        return max(self.partitions, math.ceil(self.input_rows * entries_per_row / ROWS_PER_BUCKET))


def _read_file_fn(ctx: _Context):
    cols = _read_cols(ctx.cfg)
    keep = narrow_columns(ctx.cfg)

    def read(batch: pa.Table) -> pa.Table:
        out = []
        for fid in batch["fid"].to_pylist():
            fs, path = filesystem(ctx.files[fid], ctx.source_options)
            t = retry(lambda: _read_parquet(fs, path, cols), f"read {ctx.files[fid]}")
            if T.WINDOWS in cols and T.WINDOWS not in t.column_names:
                # annotated before decode added window hashes: full-hash matching only for these rows
                t = t.append_column(pa.field(T.WINDOWS, WINDOWS_TYPE), pa.nulls(t.num_rows, WINDOWS_TYPE))
            out.append(T.narrow(t, fid, ctx.cfg, keep))
        return pa.concat_tables(out)

    return read


def _read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """The file's ``columns``; optional columns (window hashes) the file lacks are left out."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if columns is not None:
            names = set(pf.schema_arrow.names)
            columns = [c for c in columns if c in names or c not in _OPTIONAL_COLUMNS]
        return pf.read(columns=columns)


def _map(ds, fn, **kw):
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None, num_cpus=SELECT_NUM_CPUS,
                          zero_copy_batch=True, **kw)


def _groups(ds, key: str, fn, ctx: _Context):
    return ds.groupby(key, num_partitions=ctx.partitions).map_groups(
        fn, batch_format="pyarrow", num_cpus=SELECT_NUM_CPUS)


def _bucketed(ds, key: str, fn, ctx: _Context, entries_per_row: int = 1):
    """Bring all rows of each ``key`` together for ``fn``, which handles many keys at once.

    Ray's map_groups calls its function once per key, and dedup keys are nearly all distinct
    (a sha256, an LSH band value): a million keys would be a million Python calls building
    tiny tables. Grouping on a hash bucket of the key instead calls ``fn`` once per bucket, and
    ``fn`` finds the keys' groups inside it with array operations.
    """
    n = ctx.buckets(entries_per_row)

    def add_bucket(t: pa.Table) -> pa.Table:
        return t.append_column(T.BUCKET, T.shuffle_bucket(t[key], n))

    return _groups(_map(ds, add_bucket), T.BUCKET, fn, ctx)


def _block_refs(ds) -> list[tuple[Any, int]]:
    """(block ref, rows) of a materialized dataset, in its order."""
    out = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            out.append((entry.ref, entry.metadata.num_rows))
    return out


def _top_fraction(ds, rule: TopFraction, ctx: _Context):
    """Exact global top fraction: distributed sort, per-block counts, cut at rank ceil(f * n)."""
    import ray
    import ray.data

    group_col, value_col, dead_col = "_tf_group", "_tf_value", "_tf_dead"

    def prepare(t: pa.Table) -> pa.Table:
        values = pc.cast(t[rule.column], pa.float64())
        null_value = pc.is_null(values).to_numpy(zero_copy_only=False) & T.alive_mask(t)
        if null_value.any():  # a row without the value cannot be ranked: the rule rejects it
            t = t.set_column(t.column_names.index(T.REASON), T.REASON, T.with_reason(t[T.REASON], null_value, rule.reason))
        groups = pc.fill_null(pc.cast(t[rule.by], pa.string()), "") if rule.by else pa.array([""] * t.num_rows)
        t = t.append_column(group_col, groups)
        t = t.append_column(value_col, pc.fill_null(values, -math.inf))
        return t.append_column(dead_col, pa.array((~T.alive_mask(t)).astype(np.int8)))

    ranked = _map(ds, prepare).sort([dead_col, group_col, value_col, "key", T.RID],
                                    descending=[False, False, True, False, False]).materialize()
    blocks = _block_refs(ranked)

    @ray.remote(num_cpus=SELECT_NUM_CPUS)
    def counts(block: pa.Table) -> list[tuple[str, int]]:
        return T.top_fraction_counts(block, group_col)

    per_block = ray.get([counts.remote(ref) for ref, _ in blocks])
    totals: Counter = Counter()
    starts: list[dict[str, int]] = []
    for block_counts in per_block:
        starts.append({g: totals[g] for g, _ in block_counts})
        for g, n in block_counts:
            totals[g] += n
    keep = {g: T.top_fraction_keep(n, rule.fraction) for g, n in totals.items()}
    logger.info("%s: keeping %s of %s alive rows", rule.reason, sum(keep.values()), sum(totals.values()))

    @ray.remote(num_cpus=SELECT_NUM_CPUS)
    def cut(block: pa.Table, block_starts: dict[str, int]) -> pa.Table:
        out = T.top_fraction_cut(block, group_col, block_starts, keep, rule.reason)
        return out.drop_columns([group_col, value_col, dead_col])

    refs = [cut.remote(ref, s) for (ref, _), s in zip(blocks, starts)]
    return ray.data.from_arrow_refs(refs)


def _exact(ds, proto: pa.Table, method, index: DedupIndex | None, exclude: set[str], ctx: _Context):
    import ray.data

    def add_key(t: pa.Table) -> pa.Table:
        t = t.append_column(T.XKEY, T.exact_key(t, method.caption))
        return t.append_column(T.INDEXED, pa.array(np.zeros(t.num_rows, bool)))

    keyed = _map(ds, add_key)
    parts = [keyed]
    entries = index.read(EXACT, exclude) if index else None
    if entries is not None and entries.num_rows:
        xkey = entries["sha256"] if not method.caption else pa.array(
            [f"{s}|{c}" for s, c in zip(entries["sha256"].to_pylist(), entries["caption_digest"].to_pylist())])
        idx = pa.table({T.XKEY: xkey, "key": entries["key"],
                        T.RID: pa.array(-np.arange(1, entries.num_rows + 1, dtype=np.int64)),
                        T.INDEXED: pa.array(np.ones(entries.num_rows, bool))})
        parts.append(ray.data.from_arrow(T.conform(idx, add_key(proto).schema)))
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    n_order = ctx.n_order
    return _bucketed(union, T.XKEY, lambda g: T.exact_groups(g, n_order), ctx)


def _phash(ds, proto: pa.Table, method, index: DedupIndex | None, exclude: set[str], ctx: _Context):
    import ray
    import ray.data

    k = method.max_distance
    order_cols = T.order_columns(ctx.n_order)
    node_cols = [T.RID, "key", *order_cols]

    def nodes(t: pa.Table) -> pa.Table:
        alive = t.filter(pa.array(T.alive_mask(t) & pc.is_valid(t["phash"]).to_numpy(zero_copy_only=False)))
        out = alive.select(node_cols + ["phash"] + ([T.WINDOWS] if method.windows else []))
        return out.append_column(T.INDEXED, pa.array(np.zeros(out.num_rows, bool)))

    ds = ds.materialize()  # read twice: for the graph, then to apply its verdicts
    node_ds = _map(ds, nodes)
    parts = [node_ds]
    entries = index.read(PHASH, exclude) if index else None
    if entries is not None and entries.num_rows:
        cols = {T.RID: pa.array(-np.arange(1, entries.num_rows + 1, dtype=np.int64)), "key": entries["key"],
                "phash": entries["phash"], T.INDEXED: pa.array(np.ones(entries.num_rows, bool))}
        if method.windows:
            cols[T.WINDOWS] = (entries[T.WINDOWS] if T.WINDOWS in entries.column_names
                               else pa.nulls(entries.num_rows, WINDOWS_TYPE))
        idx = pa.table(cols)
        parts.append(ray.data.from_arrow(T.conform(idx, nodes(proto).schema)))
    all_nodes = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
    sigs = _map(all_nodes, lambda t: T.phash_signatures(t, k))
    fanout = (k + 1) * (1 + (WINDOWS_TYPE.list_size if method.windows else 0))
    edges = _bucketed(sigs, "_sig", lambda g: T.phash_buckets(g, k), ctx, fanout).materialize()
    n_order = ctx.n_order

    @ray.remote(num_cpus=SELECT_NUM_CPUS)
    def components(n_edge_blocks: int, *blocks: pa.Table) -> pa.Table:
        # All confirmed pairs in one task (not the driver): near-duplicate pairs are a small
        # fraction of the rows; see README "At 1 billion rows" for the memory this needs at scale.
        edge_blocks = [b for b in blocks[:n_edge_blocks] if b.num_rows]
        node_blocks = [b for b in blocks[n_edge_blocks:] if b.num_rows]
        if not edge_blocks or not node_blocks:
            return T.components_decisions(pa.table({"u": pa.array([], pa.int64()), "v": pa.array([], pa.int64())}),
                                          pa.table({}), "phash", n_order)
        edge_t = pa.concat_tables(edge_blocks)
        node_t = pa.concat_tables(node_blocks)
        involved = np.union1d(edge_t["u"].to_numpy(), edge_t["v"].to_numpy()) if edge_t.num_rows else np.empty(0)
        node_t = node_t.filter(pa.array(np.isin(node_t[T.RID].to_numpy(), involved)))
        dec = T.components_decisions(edge_t, node_t, "phash", n_order)
        return dec.sort_by([(T.RID, "ascending")])

    edge_refs = [r for r, _ in _block_refs(edges)]
    node_refs = [r for r, _ in _block_refs(all_nodes)]
    decisions_ref = components.remote(len(edge_refs), *edge_refs, *node_refs)
    logger.info("phash (k=%d): %d duplicate row(s)", k, _run_remote(_num_rows, decisions_ref))

    def apply(t: pa.Table) -> pa.Table:
        return T.apply_decisions(t, _cached_get(decisions_ref))

    return _map(ds, apply)


_GET_CACHE: dict[Any, Any] = {}


def _cached_get(ref):
    """Fetch a broadcast object once per worker process."""
    import ray

    key = ref.hex()
    if key not in _GET_CACHE:
        _GET_CACHE.clear()
        _GET_CACHE[key] = ray.get(ref)
    return _GET_CACHE[key]


def _run_remote(fn, *args):
    """Run ``fn(*args)`` as one Ray task (object refs in ``args`` are resolved) and return its result."""
    import ray

    return ray.get(ray.remote(num_cpus=SELECT_NUM_CPUS)(fn).remote(*args))


def _num_rows(t: pa.Table) -> int:
    return t.num_rows


def _count_alive(t: pa.Table) -> int:
    return int(T.alive_mask(t).sum())


def _sample_mask(rid: np.ndarray, rate: float) -> np.ndarray:
    """A deterministic pseudo-random subset of row ids (splitmix64 finaliser)."""
    return (T.mix64(rid) % np.uint64(_SAMPLE_MODULUS)) < np.uint64(int(rate * _SAMPLE_MODULUS))


def _semantic(ds, proto: pa.Table, name: str, method, index: DedupIndex | None, exclude: set[str],
              ctx: _Context):
    import ray
    import ray.data

    column = method.column
    ds = ds.materialize()  # read twice: for the k-means sample, then to assign clusters
    centroids = index.centroids(column) if index else None
    if centroids is None:
        # Rows of the input (dead ones included) from block metadata: no extra pass.
        alive_n = sum(n or 0 for _, n in _block_refs(ds))
        rate = min(1.0, method.sample_rows / max(alive_n, 1))

        def sample(t: pa.Table) -> pa.Table:
            mask = T.alive_mask(t) & pc.is_valid(t[column]).to_numpy(zero_copy_only=False)
            mask &= _sample_mask(t[T.RID].to_numpy(zero_copy_only=False), rate)
            return t.filter(pa.array(mask)).select([T.RID, column])

        sample_refs = [r for r, _ in _block_refs(_map(ds, sample).materialize())]

        @ray.remote(num_cpus=SELECT_NUM_CPUS)
        def fit(*blocks: pa.Table) -> np.ndarray:
            t = pa.concat_tables(blocks).sort_by([(T.RID, "ascending")])
            if t.num_rows == 0:
                return np.zeros((0, 0), np.float32)
            return graph.kmeans_fit(T.embeddings(t, column), method.clusters, method.seed, method.iterations)

        centroids = ray.get(fit.remote(*sample_refs))
        if centroids.size == 0:
            return ds
        if index:
            index.write_centroids(column, centroids)
        logger.info("%s: fitted %d centroid(s) on a sample of %.1f%% of %d rows", name, len(centroids),
                    100 * rate, alive_n)
    cent_ref = ray.put(centroids)

    def assign(t: pa.Table) -> pa.Table:
        mask = T.alive_mask(t) & pc.is_valid(t[column]).to_numpy(zero_copy_only=False)
        cluster = np.full(t.num_rows, -1, np.int32)
        if mask.any():
            cluster[mask] = graph.kmeans_assign(T.embeddings(t.filter(pa.array(mask)), column), _cached_get(cent_ref))
        # -1, not null, for rows outside the step: Ray's map_groups mis-splits groups on null keys.
        t = t.append_column(T.CLUSTER, pa.array(cluster))
        return t.append_column(T.INDEXED, pa.array(np.zeros(t.num_rows, bool)))

    assigned = _map(ds, assign)
    parts = [assigned]
    entries = index.read(semantic_kind(column), exclude) if index else None
    if entries is not None and entries.num_rows:
        idx = pa.table({T.CLUSTER: entries[T.CLUSTER], column: entries[column], "key": entries["key"],
                        T.RID: pa.array(-np.arange(1, entries.num_rows + 1, dtype=np.int64)),
                        T.INDEXED: pa.array(np.ones(entries.num_rows, bool))})
        parts.append(ray.data.from_arrow(T.conform(idx, assign(proto).schema)))
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    eps, n_order = method.eps, ctx.n_order
    cluster_col = T.cluster_column(column)

    def per_cluster(g: pa.Table) -> pa.Table:
        out = T.semantic_group(g, name, column, eps, n_order)
        # The cluster travels on as _cluster_<column>: the file's index entries need it.
        return out.rename_columns([cluster_col if c == T.CLUSTER else c for c in out.column_names])

    return _groups(union, T.CLUSTER, per_cluster, ctx)


def _write_fn(ctx: _Context, file_meta: dict[str, Any]):
    """map_groups over ``_fid``: write one input file's outputs and index entries to staging."""
    from operators.writers.parquet import StagingParquetWriter, drop_image_bytes

    methods = dict(ctx.cfg.methods())
    empty = pa.Table.from_pylist([], schema=_record_schema())

    def write(group: pa.Table) -> pa.Table:
        fid = group[T.FID][0].as_py()
        if fid not in ctx.pending:
            return empty
        url = ctx.files[fid]
        tag = shard_tag(url)
        writer = StagingParquetWriter({"path": ctx.target, "storage_options": ctx.target_options,
                                       **_output_opts(ctx)}, ctx.run_id, file_meta)
        fs, path = filesystem(url, ctx.source_options)
        full = retry(lambda: _read_parquet(fs, path), f"read {url}")
        dec = group.sort_by([(T.ROW, "ascending")])
        if dec.num_rows != full.num_rows or not np.array_equal(dec[T.ROW].to_numpy(), np.arange(full.num_rows)):
            raise AccountingError(f"{url}: {dec.num_rows} verdicts for {full.num_rows} rows")
        for name, col in T.decision_columns(dec).items():
            if name in full.column_names:
                full = full.drop_columns([name])
            full = full.append_column(name, col)
        rejected_mask = pc.is_valid(full["reject_reason"])
        records = []
        for kind, mask in ((DATA, pc.invert(rejected_mask)), (REJECTED, rejected_mask)):
            rows = full.filter(mask)
            if rows.num_rows == 0:
                continue
            if kind == REJECTED and "image" in rows.column_names:
                rows = drop_image_bytes(rows)
            for chunk in writer.chunks(rows):
                records.append(writer.write_staged(url, kind, chunk))
        records[0]["shard_rows"] = full.num_rows
        _stage_index(ctx, methods, tag, dec, full)
        return pa.Table.from_pylist(records, schema=_record_schema())

    return write


# The file settings select writes with: the pipeline's defaults (``pipelines.config.OutputConfig``).
_FILE_SETTINGS = ("target_file_size_mb", "compression", "compression_level", "image_compression")


def _output_opts(ctx: _Context) -> dict[str, Any]:
    return {key: OutputConfig.model_fields[key].default for key in _FILE_SETTINGS}


def _record_schema() -> pa.Schema:
    from operators.writers.parquet import RECORD_SCHEMA

    return RECORD_SCHEMA


def _stage_index(ctx: _Context, methods: dict[str, Any], tag: str, dec: pa.Table, full: pa.Table) -> None:
    """Write the survivors' index entries of one file to ``STAGING/<tag>/index/<kind>.parquet``."""
    if not ctx.cfg.index:
        return
    keep = pc.is_null(dec[T.REASON])
    kept = full.filter(keep)
    kept_dec = dec.filter(keep)
    base = {"key": kept["key"], "source_file": pa.array([ctx.files[int(kept_dec[T.FID][0].as_py())]] * kept.num_rows
                                                        if kept.num_rows else [], pa.string()),
            "run_id": pa.array([ctx.run_id] * kept.num_rows, pa.string())}
    tables = {EXACT: pa.table({"sha256": kept["sha256"],
                               "caption_digest": pa.array(T.caption_digest(kept["text"].to_pylist())
                                                          if "text" in kept.column_names else [None] * kept.num_rows,
                                                          pa.string()), **base})}
    if "phash" in methods and "phash" in kept.column_names:
        tables[PHASH] = pa.table({"phash": kept["phash"], **base})
        if T.WINDOWS in kept.column_names:
            tables[PHASH] = tables[PHASH].append_column(T.WINDOWS, kept[T.WINDOWS])
    for name in ("semantic", "caption"):
        if name in methods:
            column = methods[name].column
            if T.cluster_column(column) in kept_dec.column_names:
                tables[semantic_kind(column)] = pa.table({T.CLUSTER: kept_dec[T.cluster_column(column)],
                                                          column: kept[column], **base})
    fs, root = filesystem(ctx.target, ctx.target_options)
    for kind, table in tables.items():
        p = join(root, STAGING, tag, "index", f"{kind}.parquet")
        if is_local(fs):
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)

        def put(p=p, table=table) -> None:
            with fs.open(p, "wb") as f:
                pq.write_table(table, f)

        retry(put, f"write {p}")


def _select_plan(ctx: _Context, index: DedupIndex | None, file_meta: dict[str, Any]):
    """The Ray Data plan of one select plan, ending in file records for the driver."""
    import ray.data

    cfg = ctx.cfg
    exclude = {shard_tag(f) for f in ctx.files}
    ds = ray.data.from_items([{"fid": i} for i in range(len(ctx.files))], override_num_blocks=len(ctx.files))
    rows = _map(ds, _read_file_fn(ctx))
    # An empty narrow table with the run's columns: each stage derives the schema it hands to
    # index entries from it, without executing anything.
    schema = read_schema(ctx.files[0], ctx.source_options)
    types = {c: schema.field(c).type for c in schema.names}
    types.setdefault(T.WINDOWS, WINDOWS_TYPE)
    proto = T.narrow(pa.table({c: pa.array([], types[c]) for c in _read_cols(cfg) if c in types}),
                     0, cfg, narrow_columns(cfg))
    for rule in cfg.rules:
        if isinstance(rule, TopFraction):
            rows = _top_fraction(rows, rule, ctx)
    for name, method in cfg.methods():
        if name == "exact":
            rows = _exact(rows, proto, method, index, exclude, ctx)
        elif name == "phash":
            rows = _phash(rows, proto, method, index, exclude, ctx)
        else:
            rows = _semantic(rows, proto, name, method, index, exclude, ctx)
            proto = proto.append_column(T.cluster_column(method.column), pa.array([], pa.int32()))
    return _groups(rows, T.FID, _write_fn(ctx, file_meta), ctx)


@dataclass
class _Plan:
    plan_id: str
    files: list[str]
    pending: list[str]


def _committed(dst: Ledger, dhash: str) -> set[str]:
    """Tags of curated files committed under decision hash ``dhash``."""
    out = set()
    for rec in dst.records():
        if rec.get("decision_hash") == dhash:
            out.add(rec["tag"])
    return out


def _next_plan(dst: Ledger, files: list[str], dhash: str, done_plans: set[str]) -> _Plan | None:
    committed = _committed(dst, dhash)
    manifest = None
    try:
        with dst.fs.open(join(dst.root, PLAN_FILE), "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        pass
    available = set(files)
    if (manifest and manifest.get("decision_hash") == dhash and manifest["plan_id"] not in done_plans
            and set(manifest["files"]) <= available):
        pending = [f for f in manifest["files"] if shard_tag(f) not in committed]
        if pending:
            logger.info("resuming select plan %s: %d of %d file(s) still to commit", manifest["plan_id"],
                        len(pending), len(manifest["files"]))
            return _Plan(manifest["plan_id"], manifest["files"], pending)
    pending = [f for f in files if shard_tag(f) not in committed]
    if not pending:
        return None
    plan = _Plan(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6], pending, pending)
    dst.write_json(PLAN_FILE, {"plan_id": plan.plan_id, "decision_hash": dhash, "files": plan.files})
    return plan


def select(cfg: SelectConfig, source: str, target: str, source_options: dict[str, Any] | None = None,
           target_options: dict[str, Any] | None = None, ray_config: RayConfig | None = None,
           run_id: str | None = None, break_lock: bool = False, lock_ttl_s: float = 600.0) -> SelectSummary:
    """Run phase 2 from the annotated output ``source`` into the curated output ``target``.

    The curated output has the same run lock as an annotated one (``CURATED/_mmcurate/lock``,
    see ``pipelines.lock``): two selects into one target never overlap.

    Raises:
        ConfigError: a rule or method names a column the input lacks (checked on one file's
            schema before any work), or ``source`` is not an mmcurate output.
        LockHeldError: another select holds the target's lock (or took it over mid-run).
    """
    started = time.time()
    source_options, target_options = source_options or {}, target_options or {}
    run_id = run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    dhash = cfg.decision_hash()
    summary = SelectSummary(run_id=run_id, decision_hash=dhash)
    files, input_rows = _scan_input(source, source_options)
    summary.files_found = len(files)
    if files:
        cfg.check_schema(read_schema(files[0], source_options), files[0])
    lock = RunLock(target, target_options, run_id, lock_ttl_s)
    lock.acquire(break_lock=break_lock)
    try:
        return _select_locked(cfg, source_options, target, target_options, ray_config, run_id, lock, summary,
                              files, input_rows, started)
    finally:
        lock.release()


def _select_locked(cfg: SelectConfig, source_options, target: str, target_options, ray_config: RayConfig | None,
                   run_id: str, lock: RunLock, summary: SelectSummary, files: list[str], input_rows: int,
                   started: float) -> SelectSummary:
    dhash = summary.decision_hash
    dst = Ledger(target, target_options)
    index = DedupIndex(target, target_options) if cfg.index else None
    dst.write_text(f"{RUNS}/{run_id}/select.yaml", yaml.safe_dump(
        cfg.model_dump(mode="json", exclude={"input", "output"}), sort_keys=False))
    summary.files_skipped = len(_committed(dst, dhash) & {shard_tag(f) for f in files})
    done_plans: set[str] = set()
    while True:
        plan = _next_plan(dst, files, dhash, done_plans)
        if plan is None:
            break
        done_plans.add(plan.plan_id)
        summary.plans += 1
        _run_plan(cfg, plan, dst, index, source_options, target, target_options, run_id, dhash, summary, ray_config,
                  input_rows, lock)
    # A run killed between a file's record and its staging delete left parts (or, locally, an
    # emptied folder) that no later plan looks at: that file is never pending again.
    swept = dst.sweep_staging(dst.committed_tags())
    if swept:
        logger.info("deleted %d staged leftover(s) of committed files", swept)
    summary.elapsed_s = time.time() - started
    dst.write_json(f"{RUNS}/{run_id}/stats.json", summary.to_dict())
    return summary


def _run_plan(cfg: SelectConfig, plan: _Plan, dst: Ledger, index: DedupIndex | None, source_options, target,
              target_options, run_id: str, dhash: str, summary: SelectSummary, ray_config: RayConfig | None,
              input_rows: int, lock: RunLock) -> None:
    from ray.data import DataContext

    from pipelines.runner import init_ray

    tags = {shard_tag(f) for f in plan.pending}
    # Forget earlier verdicts of files being redone (other rules): record first, then files.
    for tag in tags:
        p = join(dst.root, LEDGER, f"{tag}.json")
        if dst.fs.exists(p):
            retry(lambda p=p: dst.fs.rm(p), f"delete {p}")
    dst.prepare(plan.pending)
    if index:
        index.remove(tags)
    init_ray(SimpleNamespace(ray=ray_config or RayConfig()))
    pending_ids = {i for i, f in enumerate(plan.files) if shard_tag(f) in tags}
    partitions = cfg.shuffle_partitions or max(1, min(MAX_DEFAULT_PARTITIONS, len(plan.files)))
    ctx = _Context(cfg, plan.files, pending_ids, source_options, target, target_options, run_id, plan.plan_id,
                   partitions, input_rows)
    file_meta = {"schema_version": SCHEMA_VERSION, "mmcurate_version": __version__, "phase": "select",
                 "run_id": run_id, "plan_id": plan.plan_id, "decision_hash": dhash,
                 "select": cfg.model_dump(mode="json", exclude={"input", "output"})}
    try:
        src_meta = read_schema(plan.files[0], source_options).metadata or {}
        file_meta["annotate"] = json.loads(src_meta.get(MMCURATE_METADATA_KEY, b"{}"))
    except Exception:  # noqa: BLE001 - provenance of the input is informative
        pass
    strategy = shuffle_strategy(cfg.shuffle, input_rows)
    logger.info("select plan %s: %d input file(s), %d to commit, %d shuffle partition(s), %s shuffle", plan.plan_id,
                len(plan.files), len(plan.pending), partitions, strategy.value)
    data_ctx = DataContext.get_current()
    previous, data_ctx.shuffle_strategy = data_ctx.shuffle_strategy, strategy
    try:
        _execute_plan(ctx, plan, dst, index, file_meta, run_id, dhash, summary, lock)
    finally:
        data_ctx.shuffle_strategy = previous


def shuffle_strategy(choice: str, input_rows: int):
    """The Ray Data ``ShuffleStrategy`` for ``select.shuffle`` (see SORT_SHUFFLE_MAX_ROWS).

    ``hash`` is Ray's own default when that is a hash shuffle (``shuffle_v2`` in Ray 2.60), else
    ``hash_shuffle``.
    """
    from ray.data.context import DataContext, ShuffleStrategy

    sort = (ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, ShuffleStrategy.SORT_SHUFFLE_PUSH_BASED)
    if choice == "sort" or (choice == "auto" and input_rows < SORT_SHUFFLE_MAX_ROWS):
        return ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    default = DataContext.get_current().shuffle_strategy
    return default if default not in sort else ShuffleStrategy.HASH_SHUFFLE


def _execute_plan(ctx: _Context, plan: _Plan, dst: Ledger, index: DedupIndex | None, file_meta: dict[str, Any],
                  run_id: str, dhash: str, summary: SelectSummary, lock: RunLock) -> None:
    ds = _select_plan(ctx, index, file_meta)
    info = {"run_id": run_id, "plan_id": plan.plan_id, "decision_hash": dhash, "phase": "select"}
    progress: dict[str, ShardProgress] = {}

    def commit(p: ShardProgress) -> None:
        if lock.lost:
            raise LockHeldError(f"run lock {lock.path} was taken over by another run; stopping before "
                                f"committing {p.shard}")
        tag = shard_tag(p.shard)
        if index:
            staged = [x for x in _ls(dst, join(dst.root, STAGING, tag, "index")) if x.endswith(".parquet")]
            index.publish(staged, tag)
        rec = dst.commit(p, info)
        summary.files_committed += 1
        summary.rows_in += rec["rows_in"]
        summary.kept += rec["kept"]
        summary.rejected += rec["rejected"]
        summary.rejected_by_reason.update(rec["rejected_by_reason"])
        logger.info("[%d/%d] committed %s: %d in, %d kept, %d rejected", summary.files_committed,
                    len(plan.pending), p.shard, rec["rows_in"], rec["kept"], rec["rejected"])

    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for rec in batch.to_pylist():
            p = progress.setdefault(rec["shard"], ShardProgress(rec["shard"]))
            p.add(rec)
            if p.complete:
                commit(progress.pop(rec["shard"]))
    if progress:
        p = next(iter(progress.values()))
        raise AccountingError(f"{p.shard}: select stream ended with {p.rows} of {p.rows_in} rows written")
    done = dst.committed_tags()
    for f in plan.pending:
        if shard_tag(f) not in done:  # a file without rows
            commit(ShardProgress(f, rows_in=0))


def _ls(dst: Ledger, path: str) -> list[str]:
    try:
        return sorted(dst.fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
