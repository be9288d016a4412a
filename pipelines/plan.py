"""Turns a validated config into a Ray Data plan. The one place resources become map_batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from operators.base import Operator, OperatorConfig, Resources, registry
from operators.readers import make_reader
from pipelines.config import PipelineConfig
from ground.errors import ConfigError
from ground.layout import shard_tag
from pipelines.ledger import Ledger
from pipelines.stats import WRITER_STAGE, InstrumentedStage, stage_names, start_collector

logger = logging.getLogger(__name__)

# Read tasks are I/O bound; a quarter CPU each lets reads overlap decode on a 2-core box
# instead of starving it (seen: two 1-CPU actors on 2 cores hang the read stage).
READ_NUM_CPUS = 0.25
WRITE_NUM_CPUS = 0.25


@dataclass
class OperatorStep:
    name: str
    cls: type[Operator]
    config: OperatorConfig
    resources: Resources


@dataclass
class Plan:
    """What a run will do, computed without Ray."""

    shards: list[str]
    committed: list[str]
    pending: list[str]
    steps: list[OperatorStep]

    def describe(self) -> dict[str, Any]:
        return {
            "shards_found": len(self.shards),
            "shards_committed": len(self.committed),
            "shards_pending": len(self.pending),
            "pending": self.pending,
            "operators": [
                {"name": s.name, "class": s.cls.__name__, **s.resources.model_dump()} for s in self.steps
            ],
        }


def operator_steps(cfg: PipelineConfig) -> list[OperatorStep]:
    steps = []
    available: set[str] = {"key", "source_shard", "image", "text", "meta", "sha256", "reject_reason"}
    for name, op_cfg in cfg.operator_specs():
        cls = registry.get(name)
        missing = [c for c in cls.inputs(op_cfg) if c not in available]
        if missing:
            raise ConfigError(f"operator {name!r} needs column(s) {missing} that no earlier operator produces "
                              "(order matters: decode before filters on width/height/format, clip before heads)")
        available |= set(cls.outputs(op_cfg))
        steps.append(OperatorStep(name, cls, op_cfg, cls.resources(op_cfg)))
    return steps


def make_plan(cfg: PipelineConfig) -> Plan:
    """List shards and the ledger to decide what is pending. Raises StorageError if unreachable."""
    reader = make_reader(cfg.input.model_dump())
    steps = operator_steps(cfg)
    shards = reader.list_shards()
    ledger = Ledger(cfg.output.path, cfg.output.storage_options)
    done = ledger.committed_tags()
    committed = [s for s in shards if shard_tag(s) in done]
    pending = [s for s in shards if shard_tag(s) not in done]
    return Plan(shards, committed, pending, steps)


_OPERATOR_CACHE: dict[str, InstrumentedStage] = {}


def _task_fn(cls: type[Operator], config: OperatorConfig, stage: str | None = None, collector: Any = None):
    """A map_batches function that builds the (counted) operator once per worker process."""
    stage = stage or cls.name
    key = f"{cls.__module__}.{cls.__name__}:{stage}:{config.model_dump_json()}"

    def apply(batch: pa.Table) -> pa.Table:
        op = _OPERATOR_CACHE.get(key)
        if op is None:
            op = _OPERATOR_CACHE[key] = InstrumentedStage(lambda: cls(config), stage, collector)
        return op(batch)

    apply.__name__ = cls.__name__
    return apply


def _counted_actor_class(cls: type[Operator]) -> type:
    """An actor class named like the operator (Ray's stats and logs show the name) that counts."""

    def __init__(self, config: OperatorConfig, stage: str, collector: Any) -> None:
        InstrumentedStage.__init__(self, lambda: cls(config), stage, collector)

    return type(cls.__name__, (InstrumentedStage,), {"__init__": __init__})


def lower(ds, step: OperatorStep, stage: str | None = None, collector: Any = None):
    """Apply one operator to a Ray Dataset according to its declared resources.

    Every call is counted and timed (``pipelines.stats``) under ``stage`` (default: the
    operator's name) and reported to ``collector`` when one is given.
    """
    from ray.data import ActorPoolStrategy

    stage = stage or step.name
    res = step.resources
    common: dict[str, Any] = dict(batch_format="pyarrow", batch_size=res.batch_size, num_cpus=res.num_cpus,
                                  zero_copy_batch=True)
    if res.num_gpus:
        common["num_gpus"] = res.num_gpus
    if res.uses_actors:
        return ds.map_batches(_counted_actor_class(step.cls), fn_constructor_args=(step.config, stage, collector),
                              compute=ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
                              **common)
    return ds.map_batches(_task_fn(step.cls, step.config, stage, collector), **common)


def build_dataset(cfg: PipelineConfig, plan: Plan, run_id: str, file_meta: dict[str, Any]):
    """The full Ray Data plan: read pending shards -> operators -> staging writer records."""
    import ray.data

    from pipelines.datasource import ShardDatasource
    from operators.writers.parquet import StagingParquetWriter

    reader = make_reader(cfg.input.model_dump())
    from ray.data import TaskPoolStrategy

    read_compute = TaskPoolStrategy(size=cfg.input.read_concurrency) if cfg.input.read_concurrency else None
    ds = ray.data.read_datasource(ShardDatasource(reader, plan.pending), override_num_blocks=len(plan.pending),
                                  num_cpus=READ_NUM_CPUS, compute=read_compute)
    collector = start_collector(run_id)
    for step, stage in zip(plan.steps, stage_names(plan.steps)):
        ds = lower(ds, step, stage, collector)
    output = cfg.output.model_dump()
    writers: list[InstrumentedStage] = []

    def write(batch: pa.Table) -> pa.Table:
        if not writers:  # once per worker process
            writers.append(InstrumentedStage(lambda: StagingParquetWriter(output, run_id, file_meta),
                                             WRITER_STAGE, collector, counts_rows=False))
        return writers[0](batch)

    return ds.map_batches(write, batch_format="pyarrow", batch_size=cfg.output.write_batch_rows,
                          num_cpus=WRITE_NUM_CPUS, zero_copy_batch=True)
