"""Per-operator counters and timers, counted inside Ray workers and merged into ``stats.json``.

Every operator call (and the writer) goes through :class:`InstrumentedStage`, which counts rows
and reasons and times the call in the worker process. Workers are separate processes, so the
counts travel to the driver through one small Ray actor, :class:`StatsCollector`, that a driver
process starts for its first run and reuses for later ones (each run's snapshots are kept apart
by run id and dropped when the run collects them): every actor is a Ray worker process, which
costs seconds of CPU to start, and a process that runs many pipelines (a notebook, a scheduler's
Python task, the test suite) would otherwise pay that per run.

Why an actor and not the writer's record stream: operator stats are made in processes *before*
the writer, and the only thing that flows from them to the writer is rows; stats would have to
ride inside row blocks (schema metadata is lost when Ray Data re-batches). An actor is the one
path that reaches every worker.

Why nothing breaks if the collector is slow or gone:

* a push is fire-and-forget (``.remote()`` whose result nobody waits for); a worker never
  blocks on the collector, and a failing push is logged once and pushing stops;
* each push carries the worker's *cumulative* snapshot with a sequence number, and the
  collector keeps the newest per worker: a late, repeated or reordered push cannot double-count;
* the driver waits a bounded time (:data:`SETTLE_TIMEOUT_S`) for the counts to reach the rows the
  run committed, then writes what it has and marks ``stats_complete: false``.

Counting, with ``pending`` meaning "no ``reject_reason`` yet" (rows earlier stages rejected
travel on but get no work):

* ``rows_seen``: every row through the stage (equals the run's rows in, rejected or not);
* ``rows_in``: pending rows entering the stage; ``rows_out``: pending rows leaving it, so
  ``rows_in`` of operator k equals ``rows_out`` of operator k-1;
* ``rejected`` and ``rejected_by_reason``: rows this stage newly rejected (``rows_in - rows_out``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ground.layout import shard_tag
from operators.base import REJECT_REASON, Resources, pending_mask

logger = logging.getLogger(__name__)

#: The writer's key in ``stats.json``; operators are under ``operators``.
WRITER_STAGE = "writer"
# How long the driver waits, after the stream ends, for the last fire-and-forget pushes to
# land in the collector. A push is one small actor call (well under a second even on a busy
# 2-core box); ten seconds covers a loaded cluster without holding a finished run for long.
SETTLE_TIMEOUT_S = 10.0
SETTLE_POLL_S = 0.2
# Shards whose committed files the report samples for score histograms and thumbnails. The
# bottom-k shard tags by hash are a uniform sample that merges across workers; 16 shards of
# a few thousand rows each give histograms with tens of thousands of points.
SAMPLE_SHARDS = 16

_TIMER_KEYS = ("seconds", "cpu_seconds", "model_seconds", "init_seconds", "actor_seconds")
_COUNT_KEYS = ("batches", "rows_seen", "rows_in", "rows_out", "rejected")
# Model operators with text: real tokens given to their forwards, and positions computed (padding
# included); reported only by operators that count them.
_TOKEN_KEYS = ("input_tokens", "padded_tokens")


def collector_name() -> str:
    """The Ray actor name of this driver's stats collector (one per Ray job)."""
    import ray

    return f"mmcurate-stats-{ray.get_runtime_context().get_job_id()}"


def stage_names(steps: list) -> list[str]:
    """Unique ``stats.json`` keys of the plan's operators: the name, ``name_2`` for a second one."""
    seen: Counter = Counter()
    names = []
    for step in steps:
        seen[step.name] += 1
        names.append(step.name if seen[step.name] == 1 else f"{step.name}_{seen[step.name]}")
    return names


def _tag_hash(tag: str) -> str:
    return hashlib.sha1(tag.encode()).hexdigest()


def bottom_k_shards(tags: list[str], k: int = SAMPLE_SHARDS) -> list[str]:
    """The ``k`` tags with the smallest hash: a uniform sample that merges (bottom-k of a union)."""
    return sorted(set(tags), key=_tag_hash)[:k]


class StageCounters:
    """Cumulative counters of one stage in one worker process (no Ray; unit-testable).

    Args:
        stage: the stage's key in ``stats.json`` (operator name, or ``writer``).
        counts_rows: False for the writer, whose output is file records, not rows.
    """

    def __init__(self, stage: str, counts_rows: bool = True):
        self.stage = stage
        self.counts_rows = counts_rows
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started_at = time.time()
        self.last_at = self.started_at
        self.seq = 0
        self.counts: Counter = Counter()
        self.timers: dict[str, float] = dict.fromkeys(_TIMER_KEYS, 0.0)
        self.reasons: Counter = Counter()
        self.shards: list[str] = []

    def observe(self, batch_in: pa.Table, batch_out: pa.Table, seconds: float, cpu_seconds: float,
                model_seconds: float = 0.0, tokens: tuple[int, int] = (0, 0)) -> None:
        """Count one call: rows in and out, reasons newly set, and its wall/CPU/model seconds."""
        self.seq += 1
        self.last_at = time.time()
        self.counts["batches"] += 1
        self.counts["rows_seen"] += batch_in.num_rows
        self.timers["seconds"] += seconds
        self.timers["cpu_seconds"] += cpu_seconds
        self.timers["model_seconds"] += model_seconds
        self.counts["input_tokens"] += tokens[0]
        self.counts["padded_tokens"] += tokens[1]
        self.timers["actor_seconds"] = self.last_at - self.started_at
        if not self.counts_rows:
            if "shard" in batch_out.column_names:
                tags = [shard_tag(s) for s in pc.unique(batch_out["shard"]).to_pylist() if s]
                self.shards = bottom_k_shards(self.shards + tags)
            return
        before = pending_mask(batch_in)
        after = pending_mask(batch_out)
        newly = before & ~after
        self.counts["rows_in"] += int(before.sum())
        self.counts["rows_out"] += int((before & after).sum())
        self.counts["rejected"] += int(newly.sum())
        if newly.any():
            reasons = batch_out[REJECT_REASON].filter(pa.array(newly))
            self.reasons.update(reasons.to_pylist())

    def snapshot(self) -> dict[str, Any]:
        """Everything counted so far in this worker (cumulative, JSON-able)."""
        return {"stage": self.stage, "worker": self.worker, "seq": self.seq,
                **{k: self.counts[k] for k in _COUNT_KEYS + _TOKEN_KEYS}, **self.timers,
                "rejected_by_reason": dict(self.reasons), "sample_shards": list(self.shards)}


class InstrumentedStage:
    """Wraps one operator (or the writer) in a worker: builds it once, counts and times each call.

    Lowered by ``pipelines.plan`` as the ``map_batches`` callable for actor pools (the class) and
    inside the task function for task pools (one instance per worker process).

    Args:
        factory: builds the wrapped callable (``cls(config)``); timed as ``init_seconds``.
        stage: key in ``stats.json``.
        collector: a ``StatsCollector`` actor handle, or None to count without reporting.
        counts_rows: see :class:`StageCounters`.
    """

    def __init__(self, factory, stage: str, collector: Any = None, counts_rows: bool = True):
        started = time.perf_counter()
        # An operator that cannot be built (a processor it cannot use, weights that do not load)
        # fails its first batch instead of its actor: Ray reports an actor that dies in its
        # constructor as an ActorDiedError whose message is empty once Ray Data wraps it, and
        # forwards the worker's traceback to the driver's terminal. A failed batch stops the run
        # the same way, and its error reaches the user as one line (jobs.cli.one_line).
        self.op, self.init_error = None, None
        try:
            self.op = factory()
        except Exception as exc:  # noqa: BLE001 - re-raised, unchanged, by every call
            self.init_error = exc
        self.counters = StageCounters(stage, counts_rows)
        self.counters.timers["init_seconds"] = time.perf_counter() - started
        self.collector = collector

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.init_error is not None:
            raise self.init_error
        model_before = getattr(self.op, "model_seconds", 0.0)
        tokens_before = [getattr(self.op, k, 0) for k in _TOKEN_KEYS]
        wall, cpu = time.perf_counter(), time.process_time()
        out = self.op(batch)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        model = getattr(self.op, "model_seconds", 0.0) - model_before
        real, padded = (getattr(self.op, k, 0) - b for k, b in zip(_TOKEN_KEYS, tokens_before))
        self.counters.observe(batch, out, wall, cpu, model, (real, padded))
        self._push()
        return out

    def _push(self) -> None:
        if self.collector is None:
            return
        try:
            self.collector.push(self.counters.snapshot())
        except Exception as exc:  # noqa: BLE001 - stats must never fail a batch
            logger.warning("stage %s: cannot report stats (%s); counting continues without reporting",
                           self.counters.stage, exc)
            self.collector = None


class StatsCollector:
    """The Ray actor that keeps, per run, the newest snapshot of every (stage, worker)."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._closed: set[str] = set()

    # async methods make this an asyncio actor: each push runs on the actor's event loop with no
    # thread hand-off, and the bodies never await, so no two interleave. The rate it absorbs is
    # printed by benchmarks/bench_stats_overhead.py --ray (one push per batch per worker).
    async def push(self, run_id: str, snap: dict[str, Any]) -> None:
        self.take(snap, run_id)

    async def snapshots(self, run_id: str) -> list[dict[str, Any]]:
        return self.current(run_id)

    async def forget(self, run_id: str) -> None:
        """Drop a collected run; pushes for it that arrive later are ignored."""
        self._runs.pop(run_id, None)
        self._closed.add(run_id)

    def current(self, run_id: str = "") -> list[dict[str, Any]]:
        """The newest snapshot of every (stage, worker) of ``run_id``."""
        return list(self._runs.get(run_id, {}).values())

    def take(self, snap: dict[str, Any], run_id: str = "") -> None:
        """Keep ``snap`` unless a newer one from the same (stage, worker) is already here."""
        if run_id in self._closed:
            return
        snaps = self._runs.setdefault(run_id, {})
        key = (snap["stage"], snap["worker"])
        old = snaps.get(key)
        if old is None or snap["seq"] > old["seq"]:
            snaps[key] = snap


@dataclass(frozen=True)
class RunCollector:
    """What workers get: the collector actor's handle and the run its pushes belong to."""

    actor: Any
    run_id: str

    def push(self, snap: dict[str, Any]) -> None:
        # Fire-and-forget: the ObjectRef is dropped, the worker never waits on the collector.
        self.actor.push.remote(self.run_id, snap)


def start_collector(run_id: str) -> RunCollector | None:
    """This driver's collector (started by its first run) for ``run_id``; None if Ray is off."""
    import ray

    if not ray.is_initialized():
        return None
    job = ray.get_runtime_context().get_job_id()
    actor = _ACTORS.get(job)
    if actor is None:
        # num_cpus=0: the collector must never take a slot a reader or operator needs.
        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(StatsCollector)
        actor = _ACTORS[job] = actor_cls.options(name=collector_name(), get_if_exists=True).remote()
    _STARTED.add(run_id)
    return RunCollector(actor, run_id)


# This driver's collector handle per Ray job, held here: Ray collects an actor, named or not,
# once no handle to it is left, which would otherwise happen between two runs.
_ACTORS: dict[str, Any] = {}
# Runs of this driver process that started counting (collect() answers {} for any other run).
_STARTED: set[str] = set()


def _find_collector():
    import ray

    if not ray.is_initialized():
        return None
    return _ACTORS.get(ray.get_runtime_context().get_job_id())


def _drop_collector() -> None:
    """Forget a collector that stopped answering, so that the next run starts a new one (killed
    first: an unresponsive actor still holds the name that ``get_if_exists`` would find again)."""
    import ray

    if not ray.is_initialized():
        return
    actor = _ACTORS.pop(ray.get_runtime_context().get_job_id(), None)
    if actor is not None:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


def merge_snapshots(snaps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sum worker snapshots per stage (no derived figures)."""
    merged: dict[str, dict[str, Any]] = {}
    for snap in snaps:
        m = merged.setdefault(snap["stage"], {**{k: 0 for k in _COUNT_KEYS + _TOKEN_KEYS},
                                               **dict.fromkeys(_TIMER_KEYS, 0.0),
                                               "workers": 0, "rejected_by_reason": Counter(), "sample_shards": []})
        m["workers"] += 1
        for k in _COUNT_KEYS + _TOKEN_KEYS + _TIMER_KEYS:
            m[k] += snap.get(k, 0)
        m["rejected_by_reason"].update(snap.get("rejected_by_reason") or {})
        m["sample_shards"] = bottom_k_shards(m["sample_shards"] + list(snap.get("sample_shards") or []))
    return merged


def _per_1k(seconds: float, rows: int) -> float | None:
    return round(seconds * 1000.0 / rows, 4) if rows else None


def stage_figures(m: dict[str, Any], resources: Resources | None, uses_actors: bool) -> dict[str, Any]:
    """One stage's ``stats.json`` entry: counters, timers, and derived throughput and costs.

    GPU-seconds are what the stage *reserved*: ``num_gpus`` x each actor's life from load to its
    last batch (actor pools hold their GPU all along), or x seconds in ``__call__`` for tasks.
    Per-1,000-row figures divide by ``rows_seen`` (every row that passed through the stage).
    """
    num_gpus = resources.num_gpus if resources else 0.0
    gpu_wall = m["actor_seconds"] + m["init_seconds"] if uses_actors else m["seconds"]
    gpu_seconds = num_gpus * gpu_wall
    rows = m["rows_seen"]
    out = {k: m[k] for k in _COUNT_KEYS}
    out["rejected_by_reason"] = dict(sorted(m["rejected_by_reason"].items()))
    out.update({k: round(m[k], 4) for k in ("seconds", "cpu_seconds", "model_seconds", "init_seconds")})
    out.update({
        "workers": m["workers"],
        "num_cpus": resources.num_cpus if resources else None,
        "num_gpus": num_gpus,
        "gpu_seconds": round(gpu_seconds, 4),
        # Rows one worker gets through per second of work (sum of call seconds over workers).
        "rows_per_s": round(rows / m["seconds"], 1) if m["seconds"] > 0 else None,
        "cpu_seconds_per_1k_rows": _per_1k(m["cpu_seconds"], rows),
        "gpu_seconds_per_1k_rows": _per_1k(gpu_seconds, rows),
        "model_seconds_per_1k_rows": _per_1k(m["model_seconds"], rows),
    })
    if m.get("input_tokens"):
        # positions computed per real token: 1.0 when no forward padded anything
        out.update({k: m[k] for k in _TOKEN_KEYS})
        out["token_padding"] = round(m["padded_tokens"] / m["input_tokens"], 3)
    return out


def collect(run_id: str, steps: list, expected_rows: int, writer_resources: Resources | None = None,
            wait: bool = True) -> dict[str, Any]:
    """Fetch and merge the run's counters into ``stats.json`` keys; the collector then forgets the run.

    Waits up to :data:`SETTLE_TIMEOUT_S` (if ``wait``) until every stage has seen ``expected_rows``
    (the rows the run committed). Returns ``{}`` when the run had no collector (nothing was pending,
    or Ray is not initialised in this process).

    Args:
        steps: the plan's ``OperatorStep`` list (names, classes, resources), in order.
    """
    import ray

    actor = _find_collector() if run_id in _STARTED else None
    if actor is None:
        return {}
    names = stage_names(steps)
    stages = names + [WRITER_STAGE]
    deadline = time.monotonic() + (SETTLE_TIMEOUT_S if wait else 0.0)
    merged: dict[str, dict[str, Any]] = {}
    complete = False
    while True:
        try:
            merged = merge_snapshots(ray.get(actor.snapshots.remote(run_id), timeout=SETTLE_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - a lost collector costs the counters, not the run
            logger.warning("run %s: operator counters unavailable (%s)", run_id, exc)
            _drop_collector()
            break
        complete = all(merged.get(s, {}).get("rows_seen", 0) >= expected_rows for s in stages)
        if complete or time.monotonic() > deadline:
            break
        time.sleep(SETTLE_POLL_S)
    if not complete and wait:
        logger.warning("run %s: operator counters are incomplete after %.0fs (stats.json says "
                       "stats_complete: false)", run_id, SETTLE_TIMEOUT_S)
    _STARTED.discard(run_id)
    try:
        actor.forget.remote(run_id)
    except Exception:  # noqa: BLE001 - already gone
        pass
    operators: dict[str, Any] = {}
    for position, (name, step) in enumerate(zip(names, steps)):
        m = merged.get(name)
        if m is None:
            continue
        entry = {"position": position, "operator": step.name, "class": step.cls.__name__}
        entry.update(stage_figures(m, step.resources, step.resources.uses_actors))
        operators[name] = entry
    out: dict[str, Any] = {"operators": operators, "stats_complete": complete}
    if WRITER_STAGE in merged:
        writer = stage_figures(merged[WRITER_STAGE], writer_resources, uses_actors=False)
        for k in ("rows_in", "rows_out", "rejected", "rejected_by_reason"):
            writer.pop(k, None)
        out[WRITER_STAGE] = writer
        out["sample_shards"] = merged[WRITER_STAGE]["sample_shards"]
    return out
