"""Turns a validated config into a Ray Data plan. The one place resources become map_batches."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from operators.base import Operator, OperatorConfig, Resources, registry
from operators.readers import make_reader
from pipelines.config import PipelineConfig
from ground.errors import ConfigError
from ground.layout import shard_tag
from ground.storage import filesystem, is_local
from ground.schema import INTERNAL_FIELDS, READER_SCHEMA
from pipelines.ledger import Ledger
from pipelines.stats import WRITER_STAGE, InstrumentedStage, stage_names, start_collector

logger = logging.getLogger(__name__)

# Columns a reader emits and the commit loop reads: no operator may produce them again.
PROTECTED_COLUMNS = frozenset(READER_SCHEMA.names) | {f.name for f in INTERNAL_FIELDS}

# How CPUs are split when resources.num_cpus is left unset (resolve_resources). A node of C
# CPUs keeps HEADROOM(C) = max(HEADROOM_MIN, C * HEADROOM_FRACTION) for the light stages (read,
# decode + filters, write, heads), each of which reserves a quarter of it (clamped to
# LIGHT_SHARE_MIN..1 CPU); the CPU model actors share the rest. On 2 cores: model 1.5 CPUs
# (2 torch threads), light stages 1/8 each. Light stages must never be starved by the model
# actors (seen: two 1-CPU actors on 2 cores hang the read stage), hence the headroom.
HEADROOM_MIN = 0.5
HEADROOM_FRACTION = 0.25
LIGHT_SHARE_MIN = 0.125
# CPU model actors: the model CPUs of a node go to several actors of few torch threads each,
# not to one actor of many. Measured on 2 cores (CLIP ViT-B/32 geometry, 512 rows): one actor of
# 2 threads spent 161 ms of model time a row, two actors of 1 thread 125 ms a row between them.
# A multi-threaded forward stalls whenever one of its threads is preempted (by decode tasks, the
# driver, Ray's own processes, all of which outrank Ray's nice-15 workers); single-threaded
# actors do not wait on each other. One actor per CPU up to CPU_ACTORS_MAX actors (each holds a
# copy of the model); on larger nodes each of them gets more threads.
CPU_ACTORS_MAX = 8
# A GPU model actor decodes and preprocesses on its own threads (operators/models/prefetch.py):
# it reserves this fraction of the CPUs that come with its GPU share; the rest feeds the light stages.
GPU_ACTOR_CPU_FRACTION = 0.75
# A GPU model actor whose images a CPU task stage prepares (clip's prepare_in, default with a GPU)
# only unpacks, normalises and launches kernels: one CPU; the node's other CPUs run the stage's
# tasks, each a process of its own, so decoding scales past what one process's GIL allows.
GPU_ACTOR_CPUS_WITH_PREPARE_STAGE = 1.0


@dataclass(frozen=True)
class NodeShape:
    """What one node of the connected cluster offers (the largest node; GPU nodes for GPU work)."""

    cpus: float
    #: CPUs per GPU on the GPU nodes (the smallest ratio among them), None without GPUs
    cpus_per_gpu: float | None = None
    #: alive nodes with CPUs
    nodes: int = 1


def cluster_node_shape() -> NodeShape:
    """The node shape of the Ray cluster this driver is connected to (call after ``ray.init``)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0) or 1.0
    ratios = [r.get("CPU", 0.0) / r["GPU"] for r in nodes if r.get("GPU")]
    return NodeShape(cpus=cpus, cpus_per_gpu=min(ratios) if ratios else None,
                     nodes=max(1, sum(1 for r in nodes if r.get("CPU"))))


def headroom(node: NodeShape) -> float:
    return max(HEADROOM_MIN, node.cpus * HEADROOM_FRACTION)


def light_share(node: NodeShape) -> float:
    """CPUs one read/decode/filter/write task reserves on ``node``."""
    return min(1.0, max(LIGHT_SHARE_MIN, headroom(node) / 4))


def resolve_resources(steps: list[OperatorStep], node: NodeShape) -> list[OperatorStep]:
    """Fill every unset ``num_cpus`` from ``node``; explicit values are kept as they are.

    * CPU model operators (heavy, no GPU) share ``node.cpus - headroom`` in proportion to
      their ``max_actors``, so together they use most of a node and never all of it; an unset
      ``max_actors`` is derived first (:func:`cpu_actors`: several actors of few threads);
    * a GPU model actor gets ``GPU_ACTOR_CPU_FRACTION`` of the CPUs that come with its GPU
      share (at least 1, at most what the CPU model operators could get), or one CPU when a
      prepare stage decodes its images (``GPU_ACTOR_CPUS_WITH_PREPARE_STAGE``);
    * a CPU-bound task stage (``Operator.cpu_bound``: clip's decode + resize stage) one CPU
      per task where the node's headroom holds one (4 CPUs and up), else a light share: on a
      4-CPU GPU node, three decode processes rather than twelve at a quarter CPU, each holding
      torch and transformers in memory; a whole CPU never exceeds what CPU model actors leave;
    * everything else (decode, filters, heads) a light share;
    * a light operator on actors (``heads``: a small MLP on an embedding) whose ``max_actors``
      is unset starts ``min_actors`` and grows on demand to one per node: one actor scores far
      more rows a second than a node's model actors produce, and Ray's own default, no bound,
      lets the pool grow to as many actors as the node's CPUs hold at a light share (sixteen
      at 0.125 CPU on 2 cores, each holding torch).

    The resolved value travels in the step's config too (``config.resources``): it is what
    Ray reserves for each actor, from which the actor sizes its torch and decode threads.
    """
    spare = max(node.cpus - headroom(node), LIGHT_SHARE_MIN)
    auto_cpu_heavy = [s for s in steps if s.cls.heavy and s.resources.num_cpus is None and not s.resources.num_gpus]
    per_op = cpu_actors(spare / max(1, len(auto_cpu_heavy)))

    def pool(res: Resources) -> Resources:
        """Unset max_actors of a model operator: derived on CPU (cpu_actors), one with a GPU
        or with num_cpus set (min_actors, when set, is the floor)."""
        if res.max_actors is not None:
            return res
        n = max(res.min_actors, 1 if res.num_gpus or res.num_cpus is not None else per_op)
        return res.model_copy(update={"max_actors": n, "min_actors": n})

    def light_pool(res: Resources) -> Resources:
        if not res.uses_actors or res.max_actors is not None:
            return res
        return res.model_copy(update={"max_actors": max(res.min_actors, node.nodes)})

    actors = sum(pool(s.resources).max_actors for s in auto_cpu_heavy)
    out = []
    for s in steps:
        res = pool(s.resources) if s.cls.heavy else light_pool(s.resources)
        if res.num_cpus is None:
            if s.cls.heavy and res.num_gpus and getattr(s.config, "prepares_in_tasks", False):
                cpus = GPU_ACTOR_CPUS_WITH_PREPARE_STAGE  # its images arrive decoded and resized
            elif s.cls.heavy and res.num_gpus:
                per_gpu = node.cpus_per_gpu or node.cpus
                cpus = min(spare, max(1.0, GPU_ACTOR_CPU_FRACTION * per_gpu * res.num_gpus))
            elif s.cls.heavy:
                cpus = max(LIGHT_SHARE_MIN, spare / actors)
            elif s.cls.cpu_bound and headroom(node) >= 1:
                cpus = 1.0  # one process per core, however many would fit at a light share
            else:
                cpus = light_share(node)
            res = res.model_copy(update={"num_cpus": round(cpus, 3)})
        config = s.config
        if isinstance(getattr(config, "resources", None), type(res)):
            config = config.model_copy(update={"resources": res})
        out.append(replace(s, config=config, resources=res))
    return out


def cpu_actors(cpus: float) -> int:
    """Actors one CPU model operator runs on ``cpus`` CPUs (see CPU_ACTORS_MAX): 1.5 CPUs -> 2
    actors of 1 thread, 6 -> 6, 12 -> 6 of 2 threads, 72 -> 8 of 9."""
    threads = max(1, math.ceil(cpus / CPU_ACTORS_MAX))
    return max(1, min(CPU_ACTORS_MAX, round(cpus / threads)))


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
                {"name": s.name, "class": s.cls.__name__, **s.resources.model_dump(),
                 "uses_actors": s.resources.uses_actors} for s in self.steps
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
        clash = sorted(set(cls.outputs(op_cfg)) & PROTECTED_COLUMNS)
        if clash:
            raise ConfigError(f"operator {name!r} would overwrite core column(s) {clash}; give its output another name")
        available |= set(cls.outputs(op_cfg))
        pre = cls.prepare_stage(op_cfg)
        if pre is not None:  # decode + resize for this model in CPU tasks, ahead of its actors
            steps.append(OperatorStep(f"{name}_prepare", pre, op_cfg, pre.resources(op_cfg)))
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


def _counted_actor_class(cls: type[Operator], split_rows: int | None = None) -> type:
    """An actor class named like the operator (Ray's stats and logs show the name) that counts.

    ``split_rows``: each block it is handed goes through the operator ``split_rows`` rows at a
    time, one output block each (a pool that runs the read takes blocks as the read merged them,
    up to Ray's target block size: a 1,000-row shard came as one block of 1,000 rows).
    """

    def __init__(self, config: OperatorConfig, stage: str, collector: Any) -> None:
        InstrumentedStage.__init__(self, lambda: cls(config), stage, collector)

    def in_batches(self, batch: pa.Table) -> Iterator[pa.Table]:
        for start in range(0, max(batch.num_rows, 1), split_rows):
            yield InstrumentedStage.__call__(self, batch.slice(start, split_rows))

    body: dict[str, Any] = {"__init__": __init__}
    if split_rows:
        body["__call__"] = in_batches
    return type(cls.__name__, (InstrumentedStage,), body)


# Batches queued on each actor of a pool of several CPU actors: the next batch is already in the
# actor when it returns the current one. With one, each actor idled between batches while the
# driver saw the result and sent the next (2 cores, 48 shards x 256 rows through a one-layer
# `clip`: the two actors kept 1.55 cores busy with one in flight, 1.68 with two).
CPU_ACTOR_BATCHES_IN_FLIGHT = 2


def batches_in_flight(res: Resources) -> int | None:
    """``max_tasks_in_flight_per_actor`` for an actor pool (None: Ray's default of 4).

    Several CPU actors get :data:`CPU_ACTOR_BATCHES_IN_FLIGHT`, and the run waits for all of them
    to be ready before dispatching (:func:`waits_for_actors`): otherwise the first actor ready
    takes batches while the others still load the model, and a short run ends on one
    single-threaded actor (seen: 2 batches, 1 worker). A GPU actor, or a single actor, keeps
    Ray's default: its next batches' transfer overlaps the current forward.
    """
    return CPU_ACTOR_BATCHES_IN_FLIGHT if (res.max_actors or 1) > 1 and not res.num_gpus else None


def waits_for_actors(steps: list[OperatorStep]) -> bool:
    """Whether the run waits for its pools' first actors before dispatching any batch (see
    :func:`batches_in_flight`): when a pool of several CPU actors queues batches per actor."""
    return any(s.resources.uses_actors and batches_in_flight(s.resources) for s in steps)


def reads_in_actors(cfg: PipelineConfig, steps: list[OperatorStep]) -> int | None:
    """Where in ``steps`` (as configured, before :func:`resolve_resources`) the CPU model pool
    is that runs the plan's reads itself, or None (reads run as tasks).

    When the plan's first pool of actors is one of CPU model actors, every step before it is a
    light task with derived CPUs (decode, filters), and the shards are local files, the read and
    those steps run inside the pool's actors: Ray Data fuses tasks into the actor pool right
    after them when all reserve the same CPUs and none asks for a batch size
    (:func:`fuse_into_actors`). On a node whose model actors hold most cores, separate read
    tasks cost more than the read itself: processes of their own (Ray worker start, imports),
    each block copied between them, and their CPU taken from the actors (2 cores, 48 local
    shards x 256 rows through a one-layer ``clip``: rows/s after the first two shards 215-223
    with read tasks, 247-248 with the read in the actors, runs alternated). Not on object
    storage, where a read waits on the network and read tasks ahead of the actors hide that
    wait; not with a GPU (its actors must never wait on a read); not with
    ``input.read_concurrency`` set, nor a ``num_cpus`` set on a step before the pool (Ray fuses
    only equal CPU requests, and an explicit setting wins).
    """
    if cfg.input.read_concurrency:
        return None
    if not all(is_local(filesystem(p, cfg.input.storage_options)[0]) for p in cfg.input.paths):
        return None
    for at, step in enumerate(steps):
        res = step.resources
        if res.uses_actors:
            return at if step.cls.heavy and not res.num_gpus else None
        if res.num_cpus is not None or res.num_gpus or step.cls.heavy or step.cls.cpu_bound:
            return None
    return None


def fuse_into_actors(cfg: PipelineConfig, steps: list[OperatorStep],
                     resolved: list[OperatorStep]) -> tuple[list[OperatorStep], OperatorStep | None]:
    """``resolved`` (``steps`` after :func:`resolve_resources`) with the light steps before
    :func:`reads_in_actors`' pool given its CPUs and no batch size, so Ray fuses them into it,
    and that pool; ``resolved`` unchanged and None when the reads run as tasks."""
    at = reads_in_actors(cfg, steps)
    if at is None:
        return resolved, None
    pool = resolved[at]
    lead = [replace(s, resources=s.resources.model_copy(update={"num_cpus": pool.resources.num_cpus,
                                                                "batch_size": None}))
            for s in resolved[:at]]
    return lead + resolved[at:], pool


def lower(ds, step: OperatorStep, stage: str | None = None, collector: Any = None, reads: bool = False):
    """Apply one operator to a Ray Dataset according to its declared resources.

    Every call is counted and timed (``pipelines.stats``) under ``stage`` (default: the
    operator's name) and reported to ``collector`` when one is given. ``reads``: the read right
    before it runs in this step's actors (:func:`reads_in_actors`): Ray fuses a read only into a
    pool that asks for no batch size, so the actors take each block whole and cut it into
    ``batch_size`` rows themselves.
    """
    from ray.data import ActorPoolStrategy

    stage = stage or step.name
    res = step.resources
    common: dict[str, Any] = dict(batch_format="pyarrow", batch_size=None if reads else res.batch_size,
                                  num_cpus=res.num_cpus, zero_copy_batch=True)
    if res.num_gpus:
        common["num_gpus"] = res.num_gpus
    if res.uses_actors:
        actor = _counted_actor_class(step.cls, res.batch_size if reads else None)
        return ds.map_batches(actor, fn_constructor_args=(step.config, stage, collector),
                              compute=ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors,
                                                        max_tasks_in_flight_per_actor=batches_in_flight(res)),
                              **common)
    return ds.map_batches(_task_fn(step.cls, step.config, stage, collector), **common)


def _pool_size(res: Resources) -> str:
    return f"{res.max_actors}" if res.min_actors == res.max_actors else f"{res.min_actors}..{res.max_actors}"


def build_dataset(cfg: PipelineConfig, plan: Plan, run_id: str, file_meta: dict[str, Any]):
    """The full Ray Data plan: read pending shards -> operators -> staging writer records."""
    import ray.data
    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S

    from pipelines.datasource import ShardDatasource
    from operators.writers.parquet import StagingParquetWriter

    reader = make_reader(cfg.input.model_dump())
    from ray.data import TaskPoolStrategy

    node = cluster_node_shape()
    steps = resolve_resources(plan.steps, node)
    logger.info("node %g CPUs: %s", node.cpus, ", ".join(
        f"{s.name} {s.resources.num_cpus:g} CPU"
        + (f" x{_pool_size(s.resources)} actors" if s.resources.uses_actors else "")
        for s in steps) or "no operators")
    # Ray Data warns when a pool starts more actors (min_actors) than it has received blocks: a
    # small run with the derived CPU actors; harmless there, and noise a user could not act on.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    read_compute = TaskPoolStrategy(size=cfg.input.read_concurrency) if cfg.input.read_concurrency else None
    # Ray Data starts the actor pools with the plan and, when asked, blocks until their first
    # actors are ready (bounded like any stall; pipelines.runner names a timeout). The setting
    # is global to this process's DataContext, so it is set either way; Ray's own default is
    # restored when no pool queues batches.
    ray.data.DataContext.get_current().wait_for_min_actors_s = (
        math.ceil(cfg.ray.no_progress_timeout_s) if waits_for_actors(steps) else DEFAULT_WAIT_FOR_MIN_ACTORS_S)
    steps, fused = fuse_into_actors(cfg, plan.steps, steps)
    if fused is not None:
        logger.info("reads%s run inside the %s actors (local shards, CPU model actors)",
                    "".join(f", {s.name}" for s in steps[:steps.index(fused)]), fused.name)
    ds = ray.data.read_datasource(ShardDatasource(reader, plan.pending), override_num_blocks=len(plan.pending),
                                  num_cpus=fused.resources.num_cpus if fused else light_share(node),
                                  compute=read_compute)
    collector = start_collector(run_id)
    for step, stage in zip(steps, stage_names(steps)):
        ds = lower(ds, step, stage, collector, reads=step is fused)
    output = cfg.output.model_dump()
    writers: list[InstrumentedStage] = []

    def write(batch: pa.Table) -> pa.Table:
        if not writers:  # once per worker process
            writers.append(InstrumentedStage(lambda: StagingParquetWriter(output, run_id, file_meta),
                                             WRITER_STAGE, collector, counts_rows=False))
        return writers[0](batch)

    return ds.map_batches(write, batch_format="pyarrow", batch_size=cfg.output.write_batch_rows,
                          num_cpus=light_share(node), zero_copy_batch=True)
