"""``mmcurate submit|status|logs|stop|jobs``: run a pipeline as a job on a Ray cluster.

``submit`` resolves the config here (``--set`` overrides applied, everything validated), then
hands Ray's ``JobSubmissionClient`` a job whose runtime_env carries what the cluster needs:

* without ``submit.image``: ``py_modules`` = the packages ``ground``, ``operators``,
  ``pipelines``, ``jobs`` and a ``working_dir`` holding ``conf/`` and the resolved config
  (nothing else of the checkout: no tests, data, .git or virtualenv), plus ``submit.pip``;
  the entrypoint is ``python -m jobs.cli run mmcurate-job.yaml`` (the ``mmcurate run``
  command, started through the shipped package because the cluster need not have it installed);
* with ``submit.image``: Ray's ``image_uri`` (an image with mmcurate installed); Ray allows only
  ``env_vars`` beside it, so the resolved config travels in ``MMCURATE_JOB_CONFIG`` and the
  entrypoint writes it to a file and runs ``mmcurate run`` on it.

The submission id is deterministic, ``<pipeline>-<YYYYMMDD UTC>-<config hash>``, so a
scheduler that retries ``submit`` finds the job it already started instead of starting a second
copy. Attempts after a FAILED or STOPPED one (``--resubmit``) get ``-2``, ``-3``, ...

Exit codes: 0 success (or: already submitted and pending/running/succeeded); 1 the job
FAILED or was STOPPED; 2 the dashboard is unreachable, refuses us, or the job is unknown.
The address comes from ``--address`` or ``RAY_ADDRESS`` (``http://HEAD:8265``). A cluster with
token authentication needs ``RAY_AUTH_MODE=token`` and its token (``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token``), exactly as Ray's own ``ray job`` commands do.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
import yaml

from ground.errors import ConfigError, MmcurateError
from jobs.clikit import setup_logging
from pipelines.config import SECRET_KEYS, PipelineConfig, config_hash, load

logger = logging.getLogger(__name__)

# Packages a job needs on the cluster: workers import the first three, the driver all four.
SHIPPED_PACKAGES = ("ground", "operators", "pipelines", "jobs")
# The resolved config's file name inside the job's working_dir.
JOB_CONFIG_NAME = "mmcurate-job.yaml"
# Environment variable that carries the resolved config when the job runs in an image.
JOB_CONFIG_ENV = "MMCURATE_JOB_CONFIG"
# Ray's switch that lets a job's driver runtime_env override the job's on a conflicting key.
OVERRIDE_RUNTIME_ENV = "RAY_OVERRIDE_JOB_RUNTIME_ENV"
# Never uploaded, whatever a package folder holds.
SHIP_EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache"]
# Metadata keys on every job we submit: `mmcurate jobs` lists only jobs that carry them.
META_PIPELINE, META_HASH, META_OUTPUT = "mmcurate_pipeline", "mmcurate_config_hash", "mmcurate_output"
# Seconds to wait for the dashboard's /api/version before calling it unreachable: a healthy
# dashboard answers in milliseconds; Ray's own client has no timeout and can hang on a dead host.
CONNECT_TIMEOUT_S = 10.0
# Seconds between status polls while waiting for a job (Ray's own `ray job submit` polls at 1 s).
POLL_INTERVAL_S = 2.0

ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ClusterError(MmcurateError):
    """The Ray dashboard is unreachable or refuses a request, or a job id is unknown."""


@dataclass
class Submission:
    """Everything ``JobSubmissionClient.submit_job`` receives for one pipeline run."""

    base_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float | None = None
    staged_files: dict[str, str] = field(default_factory=dict)


def submission_id(cfg: PipelineConfig, date: str | None = None) -> str:
    """``<pipeline>-<YYYYMMDD>-<config hash>``; ``date`` defaults to today in UTC."""
    day = date or datetime.now(timezone.utc).strftime("%Y%m%d")
    if len(day) != 8 or not day.isdigit():
        raise ConfigError(f"--date {day!r}: expected YYYYMMDD")
    return f"{cfg.name}-{day}-{config_hash(cfg)}"


def attempt_id(base_id: str, attempt: int) -> str:
    """The id of attempt ``attempt`` (1-based): the base id, then ``<base>-2``, ``<base>-3``..."""
    return base_id if attempt == 1 else f"{base_id}-{attempt}"


def job_config_yaml(cfg: PipelineConfig) -> str:
    """The resolved config the job runs, as YAML.

    Storage credentials stay in it (the job needs them; it travels in the job's package, never on
    a command line). ``ray`` is reset: inside a Ray job the driver joins the job's own cluster
    through ``RAY_ADDRESS``, and local-Ray sizes make no sense there.
    """
    data = cfg.model_dump(mode="json")
    data["ray"].update(address=None, num_cpus=None, object_store_memory_mb=None)
    data.pop("submit", None)
    return yaml.safe_dump(data, sort_keys=False)


def build_submission(cfg: PipelineConfig, staging: Path, date: str | None = None) -> Submission:
    """Describe the Ray job for ``cfg``; files it uploads are written under ``staging``.

    Raises:
        ConfigError: ``submit.image`` is set and the config holds storage credentials, which
            would then be visible in the job's runtime_env on the dashboard.
    """
    import importlib

    text = job_config_yaml(cfg)
    base = submission_id(cfg, date)
    metadata = {META_PIPELINE: cfg.name, META_HASH: config_hash(cfg), META_OUTPUT: _redacted_url(cfg.output.path)}
    env_vars = dict(cfg.submit.env_vars)
    if cfg.submit.image:
        secrets = sorted(credential_paths(cfg.model_dump(mode="json")))
        if secrets:
            raise ConfigError(f"submit.image: the config holds credentials ({', '.join(secrets)}) that would be "
                              "shown in the job's runtime_env; give the cluster its own credentials instead")
        env_vars[JOB_CONFIG_ENV] = text
        return Submission(
            base_id=base,
            entrypoint=f'printf "%s" "${JOB_CONFIG_ENV}" > {JOB_CONFIG_NAME} && mmcurate run {JOB_CONFIG_NAME}',
            runtime_env={"image_uri": cfg.submit.image, "env_vars": env_vars},
            metadata=metadata, entrypoint_num_cpus=cfg.submit.entrypoint_num_cpus)

    workdir = staging / "working_dir"
    workdir.mkdir(parents=True, exist_ok=True)
    if CONF_DIR.is_dir():
        shutil.copytree(CONF_DIR, workdir / "conf", ignore=shutil.ignore_patterns(*SHIP_EXCLUDES))
    (workdir / JOB_CONFIG_NAME).write_text(text)
    # `mmcurate run` inside the job may pass its own py_modules to ray.init (pipelines.runner ships
    # the packages whenever it connects to a cluster); Ray refuses to merge two py_modules unless
    # told that the driver's (the same packages, re-shipped from the job's copy) may win.
    env_vars.setdefault(OVERRIDE_RUNTIME_ENV, "1")
    runtime_env: dict[str, Any] = {
        "working_dir": str(workdir),
        "py_modules": [str(Path(importlib.import_module(p).__file__).parent) for p in SHIPPED_PACKAGES],
        "excludes": list(SHIP_EXCLUDES),
        "env_vars": env_vars,
    }
    if cfg.submit.pip:
        runtime_env["pip"] = list(cfg.submit.pip)
    return Submission(base_id=base, entrypoint=f"python -m jobs.cli run {JOB_CONFIG_NAME}",
                      runtime_env=runtime_env, metadata=metadata,
                      entrypoint_num_cpus=cfg.submit.entrypoint_num_cpus,
                      staged_files={JOB_CONFIG_NAME: text})


def credential_paths(obj: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the non-empty credential values (``SECRET_KEYS``) anywhere in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if str(k).lower() in SECRET_KEYS and v not in (None, ""):
                yield path
            else:
                yield from credential_paths(v, path)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from credential_paths(v, f"{prefix}[{i}]")


def _redacted_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class Cluster:
    """A Ray cluster's job API, with failures turned into one-line :class:`ClusterError` s."""

    def __init__(self, address: str | None):
        if not address:
            raise ClusterError("no Ray dashboard address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
        self.address = address.rstrip("/")
        self._probe()
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as exc:  # noqa: BLE001 - Ray raises several types; each is one line for the user
            raise self._error(exc) from None

    def _probe(self) -> None:
        """Fail within CONNECT_TIMEOUT_S when nothing answers at the address."""
        import requests

        url = self.address if "://" in self.address else f"http://{self.address}"
        try:
            requests.get(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S)
        except requests.RequestException as exc:
            raise ClusterError(f"Ray dashboard {self.address} is unreachable ({exc.__class__.__name__}); "
                               "is the head running and the dashboard port right?") from None

    def _error(self, exc: Exception, job: str | None = None) -> ClusterError:
        text = " ".join(str(exc).split())
        if exc.__class__.__name__ == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
            return ClusterError(f"Ray dashboard {self.address} refused the request (token authentication): set "
                                "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token")
        if job and ("does not exist" in text or "status code 404" in text):
            return ClusterError(f"no job {job!r} on the Ray cluster at {self.address}")
        return ClusterError(f"Ray dashboard {self.address}: {text[:300]}")

    def info(self, job: str):
        """The job's details, or None when no job has that id."""
        try:
            return self.client.get_job_info(job)
        except Exception as exc:  # noqa: BLE001
            err = self._error(exc, job)
            if str(err).startswith("no job "):
                return None
            raise err from None

    def require(self, job: str):
        details = self.info(job)
        if details is None:
            raise ClusterError(f"no job {job!r} on the Ray cluster at {self.address}")
        return details

    def submit(self, sub: Submission, job_id: str) -> None:
        try:
            self.client.submit_job(entrypoint=sub.entrypoint, submission_id=job_id, runtime_env=sub.runtime_env,
                                   metadata=sub.metadata, entrypoint_num_cpus=sub.entrypoint_num_cpus)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, job_id) from None

    def logs(self, job: str) -> str:
        try:
            return self.client.get_job_logs(job)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, job) from None

    def follow(self, job: str) -> None:
        """Stream the job's logs to stdout until it ends."""
        async def _tail() -> None:
            async for chunk in self.client.tail_job_logs(job):
                typer.echo(chunk, nl=False)

        try:
            asyncio.run(_tail())
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, job) from None

    def stop(self, job: str) -> bool:
        try:
            return self.client.stop_job(job)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, job) from None

    def list(self) -> list:
        try:
            return self.client.list_jobs()
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None

    def wait(self, job: str, timeout_s: float | None = None):
        """Poll until the job is SUCCEEDED, FAILED or STOPPED; its final details."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            details = self.require(job)
            if _status(details) in TERMINAL:
                return details
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError(f"job {job} still {_status(details)} after {timeout_s:g}s")
            time.sleep(POLL_INTERVAL_S)


def latest_attempt(cluster: Cluster, base_id: str):
    """(attempt number, details) of the newest attempt of ``base_id``; (0, None) if none exists."""
    attempt, found = 0, None
    while True:
        details = cluster.info(attempt_id(base_id, attempt + 1))
        if details is None:
            return attempt, found
        attempt, found = attempt + 1, details


def _status(details) -> str:
    status = details.status
    return getattr(status, "value", str(status))


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _status_line(details) -> str:
    line = f"{details.submission_id}: {_status(details)}"
    if details.start_time:
        line += f" (started {_when(details.start_time)}"
        line += f", ended {_when(details.end_time)})" if details.end_time else ")"
    if _status(details) in ("FAILED", "STOPPED") and details.message:
        line += f": {' '.join(details.message.split())[:300]}"
    return line


def _exit_for(details) -> int:
    """0 unless the job ended FAILED or STOPPED (then 1)."""
    return 1 if _status(details) in ("FAILED", "STOPPED") else 0


ADDRESS = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                       help="Ray dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")


def submit_command(
    config: Path = typer.Argument(..., help="pipeline YAML"),
    address: Optional[str] = ADDRESS,
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override: dotted.key=YAML value"),
    date: Optional[str] = typer.Option(None, "--date", help="YYYYMMDD in the submission id (default: today, UTC)"),
    resubmit: bool = typer.Option(False, "--resubmit",
                                  help="if today's job FAILED or was STOPPED, start a new attempt (<id>-2, ...)"),
    wait: bool = typer.Option(False, "--wait", help="wait for the job to end; exit 1 unless it SUCCEEDED"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds --wait waits at most"),
    log_level: str = typer.Option("WARNING", help="DEBUG, INFO, WARNING"),
) -> None:
    """Submit a pipeline run to a Ray cluster; idempotent per pipeline, day and config.

    The last line printed is the submission id (for schedulers that capture it).
    """
    setup_logging(log_level)
    cfg = load(config, set_ or [])
    with tempfile.TemporaryDirectory(prefix="mmcurate-submit-") as staging:
        sub = build_submission(cfg, Path(staging), date)
        cluster = Cluster(address)
        attempt, details = latest_attempt(cluster, sub.base_id)
        if details is not None and (_status(details) not in ("FAILED", "STOPPED")):
            typer.echo(f"already submitted, not submitting again: {_status_line(details)}")
            job = details.submission_id
        elif details is not None and not resubmit:
            typer.echo(f"{_status_line(details)}")
            typer.echo(f"not submitting again; pass --resubmit to start attempt {attempt_id(sub.base_id, attempt + 1)}",
                       err=True)
            typer.echo(details.submission_id)
            raise typer.Exit(1)
        else:
            job = attempt_id(sub.base_id, attempt + 1)
            cluster.submit(sub, job)
            typer.echo(f"submitted {job} to {cluster.address}: pipeline {cfg.name}, config {config_hash(cfg)}, "
                       f"output {_redacted_url(cfg.output.path)}")
    if wait:
        final = cluster.wait(job, timeout)
        typer.echo(_status_line(final))
        typer.echo(job)
        raise typer.Exit(_exit_for(final))
    typer.echo(job)


def status_command(
    job: str = typer.Argument(..., help="submission id"),
    address: Optional[str] = ADDRESS,
    wait: bool = typer.Option(False, "--wait", help="wait until the job ends"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds --wait waits at most"),
) -> None:
    """Print a job's status; exit 1 if it FAILED or was STOPPED (with --wait: unless it SUCCEEDED)."""
    setup_logging("WARNING")
    cluster = Cluster(address)
    details = cluster.wait(job, timeout) if wait else cluster.require(job)
    typer.echo(_status_line(details))
    raise typer.Exit(_exit_for(details))


def logs_command(
    job: str = typer.Argument(..., help="submission id"),
    address: Optional[str] = ADDRESS,
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends; exit 1 unless it SUCCEEDED"),
) -> None:
    """Print a job's driver log (stdout and stderr of ``mmcurate run`` on the cluster)."""
    setup_logging("WARNING")
    cluster = Cluster(address)
    cluster.require(job)
    if not follow:
        typer.echo(cluster.logs(job), nl=False)
        return
    cluster.follow(job)
    details = cluster.wait(job)
    typer.echo(_status_line(details), err=True)
    raise typer.Exit(_exit_for(details))


def stop_command(
    job: str = typer.Argument(..., help="submission id"),
    address: Optional[str] = ADDRESS,
) -> None:
    """Ask Ray to stop a job (an ended job is left as it is)."""
    setup_logging("WARNING")
    cluster = Cluster(address)
    details = cluster.require(job)
    if _status(details) in TERMINAL:
        typer.echo(f"not stopping, already ended: {_status_line(details)}")
        return
    cluster.stop(job)
    typer.echo(f"stop requested: {job}")


def jobs_command(
    address: Optional[str] = ADDRESS,
    show_all: bool = typer.Option(False, "--all", help="also jobs not submitted by mmcurate"),
) -> None:
    """A table of the cluster's mmcurate submissions, oldest first."""
    setup_logging("WARNING")
    cluster = Cluster(address)
    rows = [d for d in cluster.list() if show_all or META_PIPELINE in (d.metadata or {})]
    rows.sort(key=lambda d: d.start_time or 0)
    width = max([len(d.submission_id or d.job_id or "") for d in rows] + [len("SUBMISSION ID")])
    typer.echo(f"{'SUBMISSION ID':<{width}}  {'STATUS':<9}  {'STARTED':<20}  {'ENDED':<20}  PIPELINE")
    for d in rows:
        typer.echo(f"{(d.submission_id or d.job_id or ''):<{width}}  {_status(d):<9}  {_when(d.start_time):<20}  "
                   f"{_when(d.end_time):<20}  {(d.metadata or {}).get(META_PIPELINE, '-')}")


def register(app: typer.Typer) -> None:
    """Add ``submit``, ``status``, ``logs``, ``stop`` and ``jobs`` to the CLI."""
    app.command("submit")(submit_command)
    app.command("status")(status_command)
    app.command("logs")(logs_command)
    app.command("stop")(stop_command)
    app.command("jobs")(jobs_command)
