"""Runs a plan on Ray and drives the exactly-once commit loop on the driver."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml

from ground import SCHEMA_VERSION, __version__
from pipelines.config import PipelineConfig, config_hash, public_dict
from ground.errors import (AccountingError, ConfigError, LockHeldError, MmcurateError, RayConnectError,
                          StalledError)
from ground.layout import RUNS, shard_tag
from operators.models import loading
from operators.readers import make_reader
from pipelines.commit import Committer
from pipelines.ledger import Ledger, ShardProgress
from pipelines.lock import RunLock
from pipelines.plan import (OperatorStep, Plan, build_dataset, cluster_node_shape, light_share, make_plan,
                            resolve_resources)
from pipelines.report import write_run_artifacts

logger = logging.getLogger(__name__)

# Fingerprint checks of committed shards are HEAD requests: 16 in flight keeps a listing of
# thousands of shards to seconds without tripping S3's per-prefix request limits.
FINGERPRINT_THREADS = 16


class ResourceError(MmcurateError):
    """The plan asks for resources (GPUs, or CPUs for its actors) the Ray cluster does not have."""


@dataclass
class RunSummary:
    """What a run did; ``to_dict()`` is its ``stats.json``.

    Shard outcomes: every pending shard ends committed (``shards_committed``, damaged ones
    included and also listed in ``damaged_shards``), failed (``failed_shards``: not committed,
    retried next run) or quarantined (``quarantined_shards``: failed too often, skipped until
    ``--retry-quarantined``).
    """

    run_id: str
    pipeline: str
    config_hash: str
    shards_found: int = 0
    shards_skipped: int = 0
    shards_pending: int = 0
    shards_committed: int = 0
    rows_in: int = 0
    kept: int = 0
    rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    damaged_shards: dict[str, str] = field(default_factory=dict)
    failed_shards: dict[str, str] = field(default_factory=dict)
    quarantined_shards: dict[str, str] = field(default_factory=dict)
    changed_shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows_lost: int = 0
    shard_retries: int = 0
    elapsed_s: float = 0.0
    started_at: float = 0.0
    ended_at: float | None = None
    status: str = "running"  # running -> complete | partial (failed/quarantined shards) | error
    error: str | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every pending shard committed; 3 when some failed or are quarantined."""
        return 3 if (self.failed_shards or self.quarantined_shards) else 0

    def to_dict(self) -> dict[str, Any]:
        by_op: Counter = Counter()
        for reason, n in self.rejected_by_reason.items():
            by_op[reason.split(":", 1)[0]] += n
        return {
            "run_id": self.run_id, "pipeline": self.pipeline, "config_hash": self.config_hash,
            "mmcurate_version": __version__, "schema_version": SCHEMA_VERSION,
            "status": self.status, "error": self.error,
            "started_at": _iso(self.started_at), "ended_at": _iso(self.ended_at) if self.ended_at else None,
            "shards": {"found": self.shards_found, "skipped_committed": self.shards_skipped,
                       "pending": self.shards_pending, "committed": self.shards_committed,
                       "damaged": len(self.damaged_shards), "failed": len(self.failed_shards),
                       "quarantined": len(self.quarantined_shards), "changed": len(self.changed_shards)},
            "rows_in": self.rows_in, "kept": self.kept, "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "rejected_by_operator": dict(sorted(by_op.items())),
            "damaged_shards": self.damaged_shards,
            "failed_shards": self.failed_shards,
            "quarantined_shards": self.quarantined_shards,
            "changed_shards": self.changed_shards,
            "rows_lost": self.rows_lost,
            "shard_retries": self.shard_retries,
            "elapsed_s": round(self.elapsed_s, 3), "rows_per_s": round(self.rows_per_s, 1),
        }


def _iso(epoch: float) -> str:
    """UTC with milliseconds, so runs started within one second still sort in order."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


# Settings of the Ray a run starts for itself (the embedded default; a cluster keeps its own).
# Ray kills a worker process that idles for 1 s once more idle workers than CPUs exist. Read and
# write tasks arrive in bursts as back-pressure allows, so a 2-core node killed and restarted
# their workers all run long, at ~1.5 CPU-s a start (16 shards x 256 rows through [clip]: 78.1 s
# with Ray's 1 s, 62.9 s with 10 s, 13 against 10 worker processes; sampled per process from
# /proc). An idle worker holds ~100 MB for those 10 s.
LOCAL_RAY_SYSTEM_CONFIG: dict[str, Any] = {"idle_worker_killing_time_threshold_ms": 10_000}


def runs_on_local_ray(cfg: PipelineConfig) -> bool:
    """True when this run's Ray is a private one on this machine (no ``ray.address``, no
    ``RAY_ADDRESS`` other than "local"), so its workers see the driver's files."""
    return (cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local") == "local"


def check_local_sources(steps: list[OperatorStep]) -> None:
    """Refuse a model or weights path that does not exist, before Ray starts and actors load.

    Only for a local Ray: on a cluster the driver need not see the paths its workers load from,
    and each actor refuses a missing path itself (``operators.models.loading.resolve_local``).

    Raises:
        ConfigError: names the operator, the key and the path.
    """
    for step in steps:
        for key, ref in step.cls.sources(step.config).items():
            path = loading.missing_local(ref)
            if path:
                raise ConfigError(f"operator {step.name!r}: {key} {ref!r}: no such file or folder")


def preflight(cfg: PipelineConfig, plan: Plan, pending: list[str], reader=None) -> None:
    """The config checks a run makes before Ray starts (and ``mmcurate plan`` makes too).

    Config faults that would otherwise surface only in every read task or model actor, after
    Ray has started (or, for a wrong format, never: every shard damaged, exit 0): the format of
    the first pending shard and of the first of each other file extension (their first bytes;
    one ranged GET each on object storage) and, on a local Ray, the model and weights paths.
    Nothing is checked when nothing is pending.

    Raises:
        ConfigError: names the shard or the operator, the key and the path.
    """
    if not pending:
        return
    (reader or make_reader(cfg.input.model_dump())).check_formats(pending)
    if runs_on_local_ray(cfg):
        check_local_sources(plan.steps)


def init_ray(cfg: PipelineConfig) -> None:
    """Start or join Ray as configured; bounded in time, never silently joining a stray cluster.

    ``ray.address: null`` starts a private local Ray (``address="local"``) unless ``RAY_ADDRESS``
    is set (as inside a Ray job). Any address is given ``ray.connect_timeout_s`` to answer.
    When Ray is already initialised in this process, it is reused and the local-Ray sizing keys
    are ignored with a warning.

    Raises:
        RayConnectError: nothing answered at the address in time (names the address).
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        ignored = [k for k in ("num_cpus", "object_store_memory_mb") if getattr(cfg.ray, k)]
        if ignored:
            logger.warning("Ray is already initialised in this process: ray.%s ignored", ", ray.".join(ignored))
    else:
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
        if address == "local":  # Ray's own spelling of "start a private local Ray here"
            address = None
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address:
            import ground
            import operators
            import pipelines
            kwargs["address"] = address
            if cfg.ray.address:
                # A driver outside the cluster ships the code workers run (operators, the
                # datasource, the writer; the CLI stays here). Inside a submitted Ray job
                # (RAY_ADDRESS set by Ray) the job's runtime_env already carries it, and Ray
                # refuses a second py_modules on top of the job's.
                kwargs["runtime_env"] = {"py_modules": [ground, operators, pipelines]}
            _connect(address, kwargs, cfg.ray.connect_timeout_s)
        else:
            kwargs["address"] = "local"  # never the cluster named in Ray's address file
            # Ray announces at every local start that token auth is on (its default) and how to
            # opt out; for the private Ray a run starts and stops that is noise a new user cannot
            # act on. Auth stays on; Ray's warning when it is *off* still shows.
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_hide_auth_on_notice)
            if cfg.ray.num_cpus:
                kwargs["num_cpus"] = cfg.ray.num_cpus
            if cfg.ray.object_store_memory_mb:
                kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
            kwargs["_system_config"] = dict(LOCAL_RAY_SYSTEM_CONFIG)
            ray.init(**kwargs)
    for name in RAY_DATA_TRACEBACK_LOGGERS:
        logger_ = logging.getLogger(name)
        if _traceback_only_at_debug not in logger_.filters:
            logger_.addFilter(_traceback_only_at_debug)
    ctx = DataContext.get_current()
    # Our fused stages have long names; Ray Data shortens them in its progress lines and warns
    # that it did. Full names, no warning.
    ctx.enable_progress_bar_name_truncation = False
    ctx.execution_options.preserve_order = False
    ctx.execution_no_progress_timeout_s = cfg.ray.no_progress_timeout_s


# Ray Data's driver-side loggers that print a failed task's whole remote traceback (and call
# our own errors "internal code" of Ray's); the run ends with that error as one line instead.
RAY_DATA_TRACEBACK_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


def _traceback_only_at_debug(record: logging.LogRecord) -> bool:
    """Below DEBUG, drop the traceback Ray Data attaches to a failed task's log record (and its
    separate "Full stack trace" records); the message line stays."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return True
    record.exc_info, record.exc_text = None, None
    message = record.getMessage()
    return not (message.startswith("Full stack trace") or "please open an issue on the Ray" in message)


def _hide_auth_on_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _connect(address: str, kwargs: dict[str, Any], timeout_s: float) -> None:
    """``ray.init(**kwargs)`` that gives up after ``timeout_s`` with one line naming ``address``."""
    import ray

    hostport = address.split("://", 1)[-1]
    if ":" in hostport and address not in ("auto", "local"):
        host, _, port = hostport.rpartition(":")
        try:  # a dead head refuses at once: say so without waiting for Ray's own retries
            socket.create_connection((host, int(port)), timeout=min(timeout_s, 10)).close()
        except (OSError, ValueError) as exc:
            raise RayConnectError(f"cannot reach Ray at {address} ({exc.__class__.__name__}: {exc}); "
                                  "is the head running? (ray.address)") from None
    outcome: dict[str, BaseException] = {}

    def connect() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="mmcurate-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RayConnectError(f"Ray at {address} did not answer within {timeout_s:g}s "
                              "(ray.connect_timeout_s); is the head alive?")
    if "error" in outcome:
        exc = outcome["error"]
        raise RayConnectError(f"cannot connect to Ray at {address}: {exc.__class__.__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def gpu_demand(plan: Plan) -> float:
    """GPUs the plan holds at once at minimum: ``min_actors x num_gpus`` summed over operators
    (a GPU task pool needs at least one task's ``num_gpus``)."""
    total = 0.0
    for step in plan.steps:
        res = step.resources
        if res.num_gpus:
            total += res.num_gpus * (res.min_actors if res.uses_actors else 1)
    return total


def check_resources(plan: Plan, cluster_gpus: float, autoscaling: bool = False) -> None:
    """Fail before any work when the operators' GPU minimum exceeds the cluster (instead of hanging).

    Args:
        plan: the plan; each operator holds ``min_actors x num_gpus`` GPUs from the start.
        cluster_gpus: GPUs in the Ray cluster now (``ray.cluster_resources()``).
        autoscaling: the cluster can add GPU nodes (``ray.autoscaling: true``): warn instead.

    Raises:
        ResourceError: one line with the demand per operator and the cluster total.
    """
    need = gpu_demand(plan)
    if need <= cluster_gpus + 1e-9:
        return
    parts = ", ".join(f"{s.name} {s.resources.num_gpus:g}x{s.resources.min_actors if s.resources.uses_actors else 1}"
                      for s in plan.steps if s.resources.num_gpus)
    msg = (f"operators need {need:g} GPU(s) at once (num_gpus x min_actors: {parts}) but the Ray cluster "
           f"has {cluster_gpus:g}")
    _short_of(msg, autoscaling, "GPU nodes", "; lower min_actors or num_gpus, set device: cpu and num_gpus: 0, add GPU "
              "nodes, or set ray.autoscaling: true on an autoscaling cluster")


def _short_of(msg: str, autoscaling: bool, nodes: str, advice: str) -> None:
    """The cluster lacks what the plan holds: warn on an autoscaling cluster, else one-line error."""
    if autoscaling:
        logger.warning("%s; waiting for the autoscaler to add %s (ray.autoscaling: true)", msg, nodes)
        return
    raise ResourceError(msg + advice)


def _cpu_holders(steps: list[OperatorStep]) -> list[OperatorStep]:
    """Operators whose actors hold CPUs for the whole run."""
    return [s for s in steps if s.resources.uses_actors and s.resources.num_cpus]


def cpu_demand(steps: list[OperatorStep]) -> float:
    """CPUs the actor pools hold from the start: ``min_actors x num_cpus`` summed over operators
    that run on actors (``steps`` with their CPUs resolved, :func:`pipelines.plan.resolve_resources`)."""
    return sum(s.resources.num_cpus * s.resources.min_actors for s in _cpu_holders(steps))


def check_cpus(steps: list[OperatorStep], cluster_cpus: float, task_cpus: float, autoscaling: bool = False) -> None:
    """Fail before any work when the actor pools hold so many CPUs that no read or write task
    can run beside them (Ray Data would wait until ``no_progress_timeout_s``, seen: 10 minutes
    for ``num_cpus: 2`` on a 2-core machine).

    Args:
        steps: operators with resolved resources.
        cluster_cpus: CPUs in the Ray cluster now.
        task_cpus: what one read/write task reserves (:func:`pipelines.plan.light_share`).
        autoscaling: the cluster can add nodes: warn instead.

    Raises:
        ResourceError: one line with the actors' CPUs per operator and the cluster total.
    """
    held = cpu_demand(steps)
    if held + task_cpus <= cluster_cpus + 1e-9:
        return
    parts = ", ".join(f"{s.name} {s.resources.num_cpus:g}x{s.resources.min_actors}" for s in _cpu_holders(steps))
    msg = (f"model actors hold {held:g} CPU(s) from the start (num_cpus x min_actors: {parts}) and each read or "
           f"write task needs {task_cpus:g} more, but the Ray cluster has {cluster_cpus:g}")
    _short_of(msg, autoscaling, "nodes", ": the run could never read; lower num_cpus or min_actors (or leave num_cpus "
              "unset to derive it from the node), or add nodes")


def file_metadata(cfg: PipelineConfig, plan: Plan, run_id: str, chash: str) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for step in plan.steps:
        models.update(step.cls.provenance(step.config))
    return {"schema_version": SCHEMA_VERSION, "mmcurate_version": __version__, "pipeline": cfg.name,
            "config_hash": chash, "run_id": run_id, "models": models}


def run(cfg: PipelineConfig, run_id: str | None = None, break_lock: bool = False,
        retry_quarantined: bool = False) -> RunSummary:
    """Process every pending shard under the output's run lock; commit each one when complete.

    Args:
        cfg: the validated pipeline config.
        run_id: defaults to ``<UTC time>-<6 hex>``.
        break_lock: take the run lock even if another run holds it (``--break-lock``).
        retry_quarantined: release every quarantined shard and try it again.

    Returns:
        The summary (``stats.json``). Failed and quarantined shards do not raise: check
        ``summary.exit_code``.

    Raises:
        LockHeldError: another run holds the lock. Other ``MmcurateError``: config or systemic faults.
    """
    started = time.time()
    run_id = run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    chash = config_hash(cfg)
    summary = RunSummary(run_id=run_id, pipeline=cfg.name, config_hash=chash, started_at=started)
    ledger = Ledger(cfg.output.path, cfg.output.storage_options)
    lock = RunLock(cfg.output.path, cfg.output.storage_options, run_id, cfg.output.lock_ttl_s)
    lock.acquire(break_lock=break_lock)
    try:
        ledger.write_text(f"{RUNS}/{run_id}/config.yaml", yaml.safe_dump(public_dict(cfg), sort_keys=False))
        ledger.write_json(f"{RUNS}/{run_id}/stats.json", summary.to_dict())  # "running" until it ends
        _run_locked(cfg, summary, ledger, lock, retry_quarantined)
        summary.status = "partial" if summary.exit_code else "complete"
    except BaseException as exc:
        summary.status = "error"
        summary.error = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        raise
    finally:
        summary.ended_at = time.time()
        summary.elapsed_s = summary.ended_at - started
        try:
            write_run_artifacts(cfg, run_id, summary.to_dict())  # stats.json (+ operator counters), report.html
        finally:
            lock.release()
    return summary


def _detect_changes(cfg: PipelineConfig, reader, ledger: Ledger, committed: list[str],
                    summary: RunSummary) -> dict[str, dict[str, Any]]:
    """Committed shards whose size/ETag differs from their ledger record: {shard: old record}.

    Reported (warning + ``changed_shards``) always; returned for redo only under
    ``input.on_change: redo``. Costs one HEAD and one ledger GET per committed shard, in
    parallel; ``on_change: ignore`` skips it on very large inputs.
    """
    if cfg.input.on_change == "ignore" or not committed:
        return {}

    def compare(shard: str) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
        return shard, ledger.record(shard), reader.fingerprint(shard)

    redo: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=FINGERPRINT_THREADS) as pool:
        for shard, record, now in pool.map(compare, committed):
            if record is None or now["source_size"] is None:
                continue
            was = {"source_size": record.get("source_size"), "source_etag": record.get("source_etag")}
            if was["source_size"] is None or was == now:
                continue
            action = "redone" if cfg.input.on_change == "redo" else "reported"
            summary.changed_shards[shard] = {"was": was, "now": now, "action": action}
            logger.warning("shard %s changed since it was committed (size %s -> %s, etag %s -> %s): %s%s", shard,
                           was["source_size"], now["source_size"], was["source_etag"], now["source_etag"], action,
                           "" if action == "redone" else " (set input.on_change: redo to redo it)")
            if action == "redone":
                redo[shard] = record
    return redo


def _run_locked(cfg: PipelineConfig, summary: RunSummary, ledger: Ledger, lock: RunLock,
                retry_quarantined: bool) -> None:
    plan = make_plan(cfg)
    reader = make_reader(cfg.input.model_dump())
    summary.shards_found = len(plan.shards)
    summary.shards_skipped = len(plan.committed)

    quarantined = ledger.quarantined()
    if retry_quarantined and quarantined:
        logger.info("--retry-quarantined: releasing %d quarantined shard(s)", len(quarantined))
        for shard in quarantined:
            ledger.release(shard)
        quarantined = {}
    pending = []
    for shard in plan.pending:
        if shard in quarantined:
            why = quarantined[shard].get("last_error") or "failed repeatedly"
            summary.quarantined_shards[shard] = why
            logger.warning("skipping quarantined shard %s (%s); rerun with --retry-quarantined to try it", shard, why)
        else:
            pending.append(shard)
    redo = _detect_changes(cfg, reader, ledger, plan.committed, summary)
    pending += list(redo)
    summary.shards_skipped -= len(redo)
    summary.shards_pending = len(pending)
    # Files of committed shards being redone stay visible until their new record replaces them.
    keep = {name for rec in redo.values() for names in (rec.get("files") or {}).values() for name in names}
    logger.info("run %s: %d shard(s) found, %d already committed, %d pending", summary.run_id,
                len(plan.shards), summary.shards_skipped, len(pending))
    if plan.committed:
        first = ledger.record(plan.committed[0]) or {}
        if first.get("config_hash") not in (None, summary.config_hash):
            logger.warning("committed shards were made with config %s, this run is %s: they are skipped, not "
                           "redone (delete OUT/_mmcurate/ledger records to redo them)", first["config_hash"],
                           summary.config_hash)
    preflight(cfg, plan, pending, reader)
    if ledger.finish_replacements():
        logger.info("finished deleting the old files of shards redone by an interrupted run")
    ledger.prepare(pending, committed=len(plan.committed), keep=keep)
    if not pending:
        return

    init_ray(cfg)
    import ray

    cluster = ray.cluster_resources()
    check_resources(plan, cluster.get("GPU", 0.0), cfg.ray.autoscaling)
    node = cluster_node_shape()
    check_cpus(resolve_resources(plan.steps, node), cluster.get("CPU", 0.0), light_share(node), cfg.ray.autoscaling)
    meta = file_metadata(cfg, plan, summary.run_id, summary.config_hash)
    info = {"run_id": summary.run_id, "config_hash": summary.config_hash, "pipeline": cfg.name}

    def record_info(p: ShardProgress) -> dict[str, Any]:  # runs on a commit thread
        return {**info, **reader.fingerprint(p.shard)}

    def on_commit(p: ShardProgress, rec: dict[str, Any]) -> None:  # the committer serialises these calls
        ledger.clear_failure(p.shard)
        summary.shards_committed += 1
        summary.rows_in += rec["rows_in"]
        summary.kept += rec["kept"]
        summary.rejected += rec["rejected"]
        summary.rejected_by_reason.update(rec["rejected_by_reason"])
        if rec["damage"]:
            summary.damaged_shards[p.shard] = rec["damage"]
            summary.rows_lost += rec.get("rows_lost") or 0
        logger.info("[%d/%d] committed %s: %d in, %d kept, %d rejected%s", summary.shards_committed,
                    len(pending), p.shard, rec["rows_in"], rec["kept"], rec["rejected"],
                    f" (damaged: {rec['damage']})" if rec["damage"] else "")

    # Complete shards are committed on the committer's threads while the stream goes on.
    committer = Committer(ledger, cfg.output.model_dump(), record_info, on_commit)

    def commit(p: ShardProgress) -> None:
        if lock.lost:
            raise LockHeldError(f"run lock {lock.path} was taken over by another run; stopping before "
                                f"committing {p.shard} (rerun to finish)")
        committer.submit(p, replaces=redo.get(p.shard))

    to_do, failed, attempt = list(pending), {}, 0
    while True:
        try:
            failed = _run_plan(cfg, plan, to_do, summary.run_id, meta, commit)
        finally:
            committer.wait()  # every shard handed over is committed before retries look at the ledger
        if not failed or attempt >= cfg.input.shard_retries:
            break
        attempt += 1
        summary.shard_retries += 1
        delay = cfg.input.shard_retry_backoff_s * 2 ** (attempt - 1)
        logger.warning("%d shard(s) failed; retry %d/%d in %.0fs: %s", len(failed), attempt,
                       cfg.input.shard_retries, delay, ", ".join(sorted(failed)))
        time.sleep(delay)
        to_do = sorted(failed)
        ledger.prepare(to_do, keep=keep)  # their staged files were never published: start clean
    committer.close(committed_before={shard_tag(s) for s in plan.committed})
    if failed:
        ledger.prepare(sorted(failed), keep=keep)  # never leave a failed shard's staged files behind
    for shard, why in sorted(failed.items()):
        count = ledger.record_failure(shard, why, summary.run_id)
        if count >= cfg.input.quarantine_after:
            ledger.quarantine(shard, ledger.failure_record(shard) or {"shard": shard, "last_error": why})
            summary.quarantined_shards[shard] = why
            logger.error("shard %s failed in %d consecutive runs: quarantined (%s)", shard, count, why)
        else:
            summary.failed_shards[shard] = why
            logger.error("shard %s failed (run %d of %d before quarantine): %s", shard, count,
                         cfg.input.quarantine_after, why)


def _stall_message(cfg: PipelineConfig, plan: Plan, error: str) -> str | None:
    """Our one line for Ray Data's two ways of giving up on a plan that cannot go on, else None."""
    if "made no progress" in error:
        return (f"the Ray plan made no progress for {cfg.ray.no_progress_timeout_s:g}s (ray.no_progress_timeout_s): "
                "an operator is waiting for resources the cluster cannot give, or a task hangs")
    if "Timed out while starting actors" in error:  # Ray Data's wait for a pool's first actors
        steps = resolve_resources(plan.steps, cluster_node_shape())
        pools = ", ".join(f"{s.name} x{s.resources.min_actors}" for s in steps if s.resources.uses_actors)
        return (f"the model actors ({pools}) were not all ready after {cfg.ray.no_progress_timeout_s:g}s "
                "(ray.no_progress_timeout_s): the cluster cannot give them the resources they ask for, or loading "
                "the model takes longer")
    return None


def _run_plan(cfg: PipelineConfig, plan: Plan, shards: list[str], run_id: str, meta: dict[str, Any],
              commit) -> dict[str, str]:
    """Run one Ray plan over ``shards``, committing each as it completes; returns {failed shard: why}."""
    ds = build_dataset(cfg, dataclasses.replace(plan, pending=list(shards)), run_id, meta)
    progress: dict[str, ShardProgress] = {}
    failed: dict[str, str] = {}
    done: set[str] = set()
    stalled = None
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for rec in batch.to_pylist():
                shard = rec["shard"]
                if shard in failed or shard in done:
                    continue  # late records of a failed shard: its staged files are dropped later
                p = progress.setdefault(shard, ShardProgress(shard))
                p.add(rec)
                try:
                    complete = p.complete
                except AccountingError as exc:  # a read task retried after emitting rows
                    failed[shard] = str(exc)
                    progress.pop(shard)
                    continue
                if p.failed:
                    failed[shard] = p.failed
                    progress.pop(shard)
                elif complete:
                    commit(progress.pop(shard))
                    done.add(shard)
    except Exception as exc:
        stalled = _stall_message(cfg, plan, str(exc))
        if stalled is None:
            raise
        logger.debug("Ray's own error behind the stall", exc_info=True)  # --log-level DEBUG shows it
    if stalled:
        # Raised outside the handler, so Ray's exception (whose traceback holds the plan's actor
        # handles, keeping a half-started pool alive in a long-lived process) is not its context.
        raise StalledError(stalled)
    # The stream ended without error, so every read task finished and reported an outcome.
    for shard, p in progress.items():
        failed[shard] = (f"stream ended with {p.rows} rows written of "
                         f"{p.rows_in if p.rows_in is not None else 'an unknown number'}")
    for shard in shards:
        if shard not in done and shard not in failed:
            failed[shard] = "its read task reported no outcome"
    try:
        Ledger(cfg.output.path, cfg.output.storage_options).write_text(f"{RUNS}/{run_id}/ray_stats.txt", ds.stats())
    except Exception:  # noqa: BLE001 - stats are a nicety
        pass
    return failed
