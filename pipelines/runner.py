"""Runs a plan on Ray and drives the exactly-once commit loop on the driver."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import yaml

from ground import SCHEMA_VERSION, __version__
from pipelines.config import PipelineConfig, config_hash, public_dict
from ground.errors import AccountingError, MmcurateError
from ground.layout import RUNS, shard_tag
from pipelines.ledger import Ledger, ShardProgress
from pipelines.plan import Plan, build_dataset, make_plan
from pipelines.report import write_run_artifacts

logger = logging.getLogger(__name__)


class ResourceError(MmcurateError):
    """The plan asks for resources (GPUs) the Ray cluster does not have."""


@dataclass
class RunSummary:
    run_id: str
    pipeline: str
    config_hash: str
    shards_found: int = 0
    shards_skipped: int = 0
    shards_committed: int = 0
    rows_in: int = 0
    kept: int = 0
    rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    damaged_shards: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        by_op: Counter = Counter()
        for reason, n in self.rejected_by_reason.items():
            by_op[reason.split(":", 1)[0]] += n
        return {
            "run_id": self.run_id, "pipeline": self.pipeline, "config_hash": self.config_hash,
            "mmcurate_version": __version__, "schema_version": SCHEMA_VERSION,
            "shards": {"found": self.shards_found, "skipped_committed": self.shards_skipped,
                       "committed": self.shards_committed},
            "rows_in": self.rows_in, "kept": self.kept, "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "rejected_by_operator": dict(sorted(by_op.items())),
            "damaged_shards": self.damaged_shards,
            "elapsed_s": round(self.elapsed_s, 3), "rows_per_s": round(self.rows_per_s, 1),
        }


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` or start a local Ray; reuse one already initialised."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if cfg.ray.address:
            import ground
            import operators
            import pipelines
            # Workers run operators, the datasource and the writer; the CLI (jobs) stays here.
            kwargs["address"] = cfg.ray.address
            kwargs["runtime_env"] = {"py_modules": [ground, operators, pipelines]}
        else:
            if cfg.ray.num_cpus:
                kwargs["num_cpus"] = cfg.ray.num_cpus
            if cfg.ray.object_store_memory_mb:
                kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
        ray.init(**kwargs)
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = False
    if hasattr(ctx, "execution_no_progress_timeout_s"):
        ctx.execution_no_progress_timeout_s = cfg.ray.no_progress_timeout_s


def check_resources(plan: Plan) -> None:
    """Fail before any work when an operator needs GPUs the cluster lacks (instead of hanging)."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    for step in plan.steps:
        need = step.resources.num_gpus
        if need > 0 and need > have:
            raise ResourceError(f"operator {step.name!r} asks for num_gpus={need} but the Ray cluster has "
                                f"{have:g} GPU(s); set device: cpu and num_gpus: 0, or add GPU nodes")


def file_metadata(cfg: PipelineConfig, plan: Plan, run_id: str, chash: str) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for step in plan.steps:
        models.update(step.cls.provenance(step.config))
    return {"schema_version": SCHEMA_VERSION, "mmcurate_version": __version__, "pipeline": cfg.name,
            "config_hash": chash, "run_id": run_id, "models": models}


def shard_fingerprint(shard: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Size and etag/mtime of the shard's object, recorded in its ledger record."""
    from ground.storage import filesystem

    url = shard.split("#", 1)[0]
    try:
        fs, path = filesystem(url, storage_options)
        info = fs.info(path)
    except Exception as exc:  # noqa: BLE001 - a fingerprint is informative, not required
        logger.debug("no fingerprint for %s: %s", shard, exc)
        return {"source_size": None, "source_etag": None}
    etag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"source_size": info.get("size"), "source_etag": None if etag is None else str(etag).strip('"')}


def run(cfg: PipelineConfig, run_id: str | None = None) -> RunSummary:
    """Process every pending shard; commit each one as soon as all its rows are written."""
    started = time.time()
    run_id = run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    chash = config_hash(cfg)
    summary = RunSummary(run_id=run_id, pipeline=cfg.name, config_hash=chash)

    plan = make_plan(cfg)
    summary.shards_found = len(plan.shards)
    summary.shards_skipped = len(plan.committed)
    ledger = Ledger(cfg.output.path, cfg.output.storage_options)
    ledger.write_text(f"{RUNS}/{run_id}/config.yaml", yaml.safe_dump(public_dict(cfg), sort_keys=False))
    logger.info("run %s: %d shard(s) found, %d already committed, %d pending",
                run_id, len(plan.shards), len(plan.committed), len(plan.pending))
    if plan.committed:
        first = ledger.record(plan.committed[0]) or {}
        if first.get("config_hash") not in (None, chash):
            logger.warning("committed shards were made with config %s, this run is %s: they are skipped, not "
                           "redone (delete OUT/_mmcurate/ledger records to redo them)", first["config_hash"], chash)
    ledger.prepare(plan.pending)

    if plan.pending:
        init_ray(cfg)
        check_resources(plan)
        meta = file_metadata(cfg, plan, run_id, chash)
        ds = build_dataset(cfg, plan, run_id, meta)
        info = {"run_id": run_id, "config_hash": chash, "pipeline": cfg.name}
        progress: dict[str, ShardProgress] = {}

        def commit(p: ShardProgress) -> None:
            rec = ledger.commit(p, {**info, **shard_fingerprint(p.shard, cfg.input.storage_options)})
            summary.shards_committed += 1
            summary.rows_in += rec["rows_in"]
            summary.kept += rec["kept"]
            summary.rejected += rec["rejected"]
            summary.rejected_by_reason.update(rec["rejected_by_reason"])
            if rec["damage"]:
                summary.damaged_shards[p.shard] = rec["damage"]
            logger.info("[%d/%d] committed %s: %d in, %d kept, %d rejected", summary.shards_committed,
                        len(plan.pending), p.shard, rec["rows_in"], rec["kept"], rec["rejected"])

        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for rec in batch.to_pylist():
                p = progress.setdefault(rec["shard"], ShardProgress(rec["shard"]))
                p.add(rec)
                if p.complete:
                    commit(progress.pop(rec["shard"]))
        # The stream ended without error, so every read task finished: shards never heard
        # from had no rows at all (an empty tar), and anything half-heard is a bug.
        if progress:
            p = next(iter(progress.values()))
            raise AccountingError(f"shard {p.shard}: stream ended with {p.rows} rows written of "
                                  f"{p.rows_in if p.rows_in is not None else 'an unknown number'}")
        done = ledger.committed_tags()
        for shard in plan.pending:
            if shard_tag(shard) not in done:
                commit(ShardProgress(shard, rows_in=0))
        try:
            ledger.write_text(f"{RUNS}/{run_id}/ray_stats.txt", ds.stats())
        except Exception:  # noqa: BLE001 - stats are a nicety
            pass

    summary.elapsed_s = time.time() - started
    write_run_artifacts(cfg, plan, run_id, summary.to_dict())  # stats.json (+ operator counters), report.html
    return summary
