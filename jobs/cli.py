"""``mmcurate``: run, plan and demo pipelines.

Config and systemic errors exit non-zero with one line on stderr, never a traceback.
Exit codes of ``run``: 0 every pending shard committed; 3 finished, but shards failed or are
quarantined (one line each); 4 another run holds the output's lock; 2 config or storage
error; 1 anything else (a stalled plan, a bug).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from ground import errors
from ground.errors import MmcurateError
from jobs.clikit import echo_counts
from jobs.clikit import setup_logging as _setup_logging
from jobs.models import models_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Curate image-text data for pretraining, on Ray Data.")
app.add_typer(models_app, name="models")
logger = logging.getLogger("mmcurate")

# Command groups that live in their own modules: each module defines ``register(app)`` that
# adds its commands. Listed here so ``mmcurate --help`` shows them all; a module that is not
# there yet is skipped (the list is the CLI's table of contents).
COMMAND_MODULES = (
    "jobs.cluster",    # submit, status, logs, stop, jobs
    "jobs.schedule",   # schedule
    "jobs.history",    # runs
    "jobs.report",     # report
    "jobs.curate",     # select, dedup
    "jobs.evaluate",   # eval
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def print_summary(summary, output: str | None = None) -> None:
    d = summary.to_dict()
    typer.echo("")
    typer.echo(f"run {d['run_id']}  pipeline={d['pipeline']}  config={d['config_hash']}")
    s = d["shards"]
    echo_counts("shards", s, d)
    typer.echo(f"outcome: {s['committed']} committed ({s['damaged']} damaged), {s['failed']} failed, "
               f"{s['quarantined']} quarantined; {d['rows_lost']} row(s) known lost")
    # One line per shard that needs a person's eye, so a scheduler's mail names every one.
    for shard, damage in d["damaged_shards"].items():
        typer.echo(f"damaged shard {shard}: {damage}")
    for shard, change in d["changed_shards"].items():
        typer.echo(f"changed shard {shard}: {change['action']} (size {change['was']['source_size']} -> "
                   f"{change['now']['source_size']})")
    for shard, why in d["failed_shards"].items():
        typer.echo(f"failed shard {shard}: {why}")
    for shard, why in d["quarantined_shards"].items():
        typer.echo(f"quarantined shard {shard}: {why}")
    if output:
        from ground.layout import RUNS
        from ground.storage import join

        typer.echo(f"report: {join(output, RUNS, d['run_id'], 'report.html')}")


@app.command()
def run(config: Path = typer.Argument(..., help="pipeline YAML"),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="override: dotted.key=YAML value"),
        break_lock: bool = typer.Option(False, "--break-lock",
                                        help="take the output's run lock even if another run holds it"),
        retry_quarantined: bool = typer.Option(False, "--retry-quarantined",
                                               help="release quarantined shards and try them again"),
        log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING")) -> None:
    """Run a pipeline (local Ray unless ray.address is set); committed shards are skipped.

    Exit 0: all committed; 3: some shards failed or are quarantined; 4: locked by another run;
    2: config/storage error; 1: other.
    """
    _setup_logging(log_level)
    from pipelines import config as config_mod
    from pipelines.runner import run as run_pipeline

    cfg = config_mod.load(config, set_ or [])
    summary = run_pipeline(cfg, break_lock=break_lock, retry_quarantined=retry_quarantined)
    print_summary(summary, cfg.output.path)
    if cfg.select is not None:  # phase 2 named in the same config: select over what is committed
        from jobs.curate import run_after_annotate

        run_after_annotate(cfg)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


@app.command()
def plan(config: Path = typer.Argument(..., help="pipeline YAML"),
         set_: Optional[list[str]] = typer.Option(None, "--set", help="override: dotted.key=YAML value"),
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")) -> None:
    """Dry run without Ray: shards found, committed and pending; operators and resources.

    Makes the checks a run makes before Ray starts (``pipelines.runner.preflight``: shard
    formats, local model paths), so a config that ``run`` would refuse is refused here with the
    same line."""
    _setup_logging("WARNING")
    from pipelines import config as config_mod
    from pipelines.plan import make_plan
    from pipelines.runner import preflight

    cfg = config_mod.load(config, set_ or [])
    made = make_plan(cfg)
    preflight(cfg, made, made.pending)
    desc = made.describe()
    if as_json:
        typer.echo(json.dumps(desc, indent=1))
        return
    typer.echo(f"pipeline {cfg.name}: input {cfg.input.format} -> output {cfg.output.path}")
    typer.echo(f"shards: {desc['shards_found']} found, {desc['shards_committed']} committed, "
               f"{desc['shards_pending']} pending")
    for shard in desc["pending"][:10]:
        typer.echo(f"  pending {shard}")
    if len(desc["pending"]) > 10:
        typer.echo(f"  ... and {len(desc['pending']) - 10} more")
    typer.echo("operators:")
    for op in desc["operators"]:
        if not op["uses_actors"]:
            pool = "tasks"
        else:  # auto: a model operator's actor count is derived at run time too
            pool = f"actors {op['min_actors']}..{op['max_actors']}" if op["max_actors"] else "actors auto"
        cpus = "auto" if op["num_cpus"] is None else format(op["num_cpus"], "g")  # auto: derived at run time
        typer.echo(f"  {op['name']:<18} {op['class']:<24} cpus={cpus} gpus={op['num_gpus']:g} "
                   f"batch={op['batch_size']} {pool}")


@app.command()
def demo(output: Path = typer.Option(Path("mmcurate-demo"), "--output", help="folder for shards and results"),
         shards: int = typer.Option(4, help="number of sample shards to generate"),
         samples: int = typer.Option(32, help="good samples per shard"),
         log_level: str = typer.Option("INFO")) -> None:
    """Generate sample shards (with some deliberately bad samples) and run conf/pipelines/demo.yaml."""
    _setup_logging(log_level)
    from jobs.demo import run_demo

    summary, out = run_demo(output, shards=shards, samples=samples)
    print_summary(summary, str(out))
    typer.echo(f"\nenriched Parquet: {out}/data   rejects: {out}/rejected   ledger: {out}/_mmcurate/ledger")


def root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of an exception chain (Ray wraps worker errors several times)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or getattr(exc, "cause", None)
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


# Exceptions Ray (Data) raises around a failing UDF or actor; the user's own error is the one
# they wrap (an actor that died arrives as a SystemException with an empty message).
RAY_WRAPPERS = ("UserCodeException", "RayTaskError", "SystemException", "ActorDiedError", "RayActorError")
_ERROR_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def _wrapped_error(exc: BaseException) -> str | None:
    """``Type: message`` of the first user error named in a remote traceback, or None.

    A worker's exception chain does not survive pickling back to the driver: Ray Data's
    ``UserCodeException`` arrives alone, and the original error survives only as text in
    the ``RayTaskError`` traceback around it (causes are printed first).
    """
    seen, node = set(), exc
    while isinstance(node, BaseException) and id(node) not in seen:
        seen.add(id(node))
        for line in str(node).splitlines():
            m = _ERROR_LINE.match(line)
            if m and not m.group(1).startswith(RAY_WRAPPERS):
                return f"{m.group(1)}: {m.group(2).strip()}"
        node = node.__cause__ or getattr(node, "cause", None) or node.__context__
    return None


def our_error(exc: BaseException) -> MmcurateError | None:
    """Our own error behind ``exc``, if it is one: the root cause, or, when only Ray's wrapper
    came back (an actor's constructor failed), rebuilt from the remote traceback's text so it
    keeps its one line and its exit code (a worker's ``ConfigError`` exits 2, not 1)."""
    cause = root_cause(exc)
    if isinstance(cause, MmcurateError):
        if "\n" not in str(cause):
            return cause
        # Ray's copy of a task's error (a RayTaskError subclassing ours): its text is the whole
        # remote traceback, whose last line of our class carries the message.
        ours = next(c for c in type(cause).__mro__ if issubclass(c, MmcurateError) and c.__module__ == errors.__name__)
        for line in reversed(str(cause).splitlines()):
            m = _ERROR_LINE.match(line)
            if m and m.group(1) == ours.__name__:
                return ours(m.group(2).strip())
        return ours(str(cause).strip().splitlines()[-1])
    if cause.__class__.__name__.startswith(RAY_WRAPPERS):
        name, _, message = (_wrapped_error(exc) or "").partition(": ")
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, MmcurateError):
            return cls(message)
    return None


def one_line(exc: BaseException) -> str:
    """One line for any failure: our own errors verbatim, others as ``Type: first line``."""
    cause = root_cause(exc)
    ours = our_error(exc)
    if ours is not None:
        return str(ours)
    if cause.__class__.__name__.startswith(RAY_WRAPPERS):
        wrapped = _wrapped_error(exc)
        if wrapped:
            return wrapped[:500]
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    text = lines[-1] if lines and lines[-1].startswith(cause.__class__.__name__) else (lines[0] if lines else "")
    return f"{cause.__class__.__name__}: {text}"[:500]


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(app)


_register_commands()


def _stop_ray_output() -> None:
    """Shut down this process's Ray before the final error line is printed.

    Ray forwards worker output to the driver's stderr from a background thread; a worker's last
    words (its own log line about the same failure) could otherwise land after the one-line error,
    which must be the last line a scheduler's log shows. Ray is never imported here.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway; the error line matters more
            logger.debug("ray.shutdown failed", exc_info=True)
    sys.stderr.flush()


def main() -> None:
    """Console entry point: one-line errors for config and systemic faults."""
    try:
        app()
    except MmcurateError as exc:
        _stop_ray_output()
        exc = our_error(exc) or exc  # Ray's copy of a task's error carries the whole traceback
        typer.echo(f"mmcurate: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("mmcurate: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - systemic faults: one line, traceback only at DEBUG
        logger.debug("traceback", exc_info=True)
        _stop_ray_output()
        cause = our_error(exc)
        if cause is not None:  # raised inside a Ray task or actor and wrapped on the way out
            typer.echo(f"mmcurate: error: {cause}", err=True)
            sys.exit(cause.exit_code)
        typer.echo(f"mmcurate: error: {one_line(exc)} (rerun with --log-level DEBUG for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
