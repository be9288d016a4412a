"""``mmcurate schedule``: write what an existing scheduler needs to run a pipeline on a cron.

mmcurate has no scheduler of its own. Each night's run is safe to start at any time (the run
lock refuses a second run on the same output, the ledger makes it incremental), so this command
only emits one of:

* ``crontab``: one crontab line with absolute paths and the log appended to a file;
* ``k8s``: one multi-document YAML: a ConfigMap with the resolved config and a KubeRay
  ``RayJob`` manifest, a ServiceAccount with a Role allowed to create and watch RayJobs, and a
  CronJob (``concurrencyPolicy: Forbid``) whose pod creates the RayJob with ``kubectl`` and
  waits for its end (a CronJob cannot create a custom resource itself);
* ``airflow``: a DAG file using only the BashOperator, ``catchup=False``, ``max_active_runs=1``.

With ``--address`` the crontab line and the DAG submit to that Ray cluster (``mmcurate submit``,
whose deterministic id makes a retry harmless) instead of running on the scheduler's machine.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from ground.errors import ConfigError
from jobs.clikit import setup_logging
from jobs.cluster import credential_paths, job_config_yaml
from pipelines.config import SECRET_KEYS, PipelineConfig, load

logger = logging.getLogger(__name__)

TARGETS = ("crontab", "k8s", "airflow")
# Where the k8s ConfigMap is mounted in the Ray head and in the scheduling pod.
K8S_CONFIG_DIR = "/etc/mmcurate"
# A kubectl image with a POSIX shell (the scheduling pod runs a small sh loop).
DEFAULT_KUBECTL_IMAGE = "bitnami/kubectl:latest"
# KubeRay deletes the finished RayJob (and with it its cluster) after this long; an hour leaves
# time to read `kubectl describe rayjob` and the head's logs after a failure.
RAYJOB_TTL_S = 3600
# A nightly run that is still going after 23 hours is stuck: KubeRay stops it before the next night.
RAYJOB_ACTIVE_DEADLINE_S = 23 * 3600
# Seconds between the scheduling pod's checks of the RayJob's status.
K8S_POLL_S = 30
# Head and worker pod sizes in the emitted RayJob (edit the YAML for other shapes).
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}
WORKER_RESOURCES = {"cpu": "4", "memory": "16Gi"}


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML for people to read: no anchors, multi-line strings as ``|`` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_block)


def _dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_ManifestDumper, sort_keys=False)


def validate_cron(expr: str) -> str:
    """``expr`` normalised to single spaces, if it is a valid 5-field cron expression.

    Raises:
        ConfigError: one line naming the expression.
    """
    from croniter import croniter

    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError(f"--cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
                          f"got {len(fields)}")
    norm = " ".join(fields)
    if not croniter.is_valid(norm):
        raise ConfigError(f"--cron {expr!r}: not a valid cron expression")
    return norm


def mmcurate_command() -> list[str]:
    """The absolute command that starts mmcurate with this Python (cron has no PATH to speak of)."""
    script = Path(sys.executable).parent / "mmcurate"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "jobs.cli"]


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _refuse_secret_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip().rsplit(".", 1)[-1].lower()
        if key in SECRET_KEYS:
            raise ConfigError(f"--set {item.split('=', 1)[0]}: a credential would be written into the schedule; "
                              "give the scheduler's environment the credentials instead")


def run_command(config: Path, overrides: list[str], address: str | None, date_arg: str | None = None,
                resubmit: bool = False) -> list[str]:
    """argv that runs (no address) or submits and waits for (with address) one nightly run."""
    cmd = mmcurate_command()
    if address is None:
        return [*cmd, "run", str(config), *_set_args(overrides)]
    argv = [*cmd, "submit", str(config), "--address", address, *_set_args(overrides)]
    if date_arg:
        argv += ["--date", date_arg]
    if resubmit:
        argv.append("--resubmit")
    return argv


def crontab_line(cfg: PipelineConfig, config: Path, cron: str, overrides: list[str], address: str | None,
                 log_file: Path, workdir: Path) -> str:
    """A comment and one crontab line: ``cd`` to ``workdir``, run, append output to ``log_file``."""
    argv = run_command(config, overrides, address)
    if address is not None:
        argv.append("--wait")
    command = (f"mkdir -p {shlex.quote(str(log_file.parent))} && cd {shlex.quote(str(workdir))} && "
               f"{shlex.join(argv)} >> {shlex.quote(str(log_file))} 2>&1")
    # cron turns an unescaped % into a newline.
    command = command.replace("%", "\\%")
    what = f"submits to {address}" if address else "runs on this machine"
    return (f"# mmcurate pipeline {cfg.name}: {what}. Overlap is safe: the run lock on the output refuses a "
            f"second run.\n# Cron runs with a bare environment: put storage credentials"
            f"{' and RAY_AUTH_MODE/RAY_AUTH_TOKEN' if address else ''} in the crontab or the config's "
            f"credential chain.\n{cron} {command}\n")


def k8s_manifests(cfg: PipelineConfig, cron: str, image: str, namespace: str, workers: int,
                  kubectl_image: str) -> str:
    """The multi-document YAML for ``kubectl apply -f``: ConfigMap, RBAC and CronJob.

    Raises:
        ConfigError: the config holds credentials (they would land in a ConfigMap).
    """
    secrets = sorted(credential_paths(cfg.model_dump(mode="json")))
    if secrets:
        raise ConfigError(f"--target k8s: the config holds credentials ({', '.join(secrets)}) that would be "
                          "written into a ConfigMap; give the pods credentials through a Secret or a workload identity")
    import ray

    base = f"mmcurate-{cfg.name.lower().replace('_', '-').replace('.', '-')}"[:52].rstrip("-")
    labels = {"app.kubernetes.io/name": "mmcurate", "app.kubernetes.io/instance": base}
    config_map, account = f"{base}-config", f"{base}-scheduler"
    config_volume = {"name": "mmcurate-config", "configMap": {"name": config_map}}
    mount = {"name": "mmcurate-config", "mountPath": K8S_CONFIG_DIR, "readOnly": True}
    env = [{"name": k, "value": v} for k, v in sorted(cfg.submit.env_vars.items())]

    def container(name: str, resources: dict[str, str], ports: list[dict[str, Any]] | None = None) -> dict:
        spec: dict[str, Any] = {"name": name, "image": image,
                                "resources": {"requests": dict(resources), "limits": dict(resources)},
                                "volumeMounts": [dict(mount)]}
        if ports:
            spec["ports"] = ports
        if env:
            spec["env"] = [dict(e) for e in env]
        return spec

    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"generateName": f"{base}-", "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "entrypoint": f"mmcurate run {K8S_CONFIG_DIR}/pipeline.yaml",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": RAYJOB_TTL_S,
            "activeDeadlineSeconds": RAYJOB_ACTIVE_DEADLINE_S,
            # A failed night is retried by the next night (or by hand), not in a loop.
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": ray.__version__,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0"},
                    "template": {"spec": {
                        "containers": [container("ray-head", HEAD_RESOURCES, [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"}])],
                        "volumes": [dict(config_volume)]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "workers",
                    "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [container("ray-worker", WORKER_RESOURCES)],
                                          "volumes": [dict(config_volume)]}},
                }],
            },
        },
    }
    wait_script = "\n".join([
        "set -eu",
        f"job=$(kubectl create -f {K8S_CONFIG_DIR}/rayjob.yaml -o name)",
        'echo "created $job"',
        "while :; do",
        "  deploy=$(kubectl get \"$job\" -o jsonpath='{.status.jobDeploymentStatus}')",
        "  status=$(kubectl get \"$job\" -o jsonpath='{.status.jobStatus}')",
        '  case "$status" in',
        '    SUCCEEDED) echo "$job SUCCEEDED"; exit 0;;',
        '    FAILED|STOPPED) echo "$job $status"; exit 1;;',
        "  esac",
        '  if [ "$deploy" = "Failed" ]; then echo "$job deployment failed"; exit 1; fi',
        f"  sleep {K8S_POLL_S}",
        "done",
    ])
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": config_map, "namespace": namespace, "labels": dict(labels)},
         "data": {"pipeline.yaml": job_config_yaml(cfg),
                  "rayjob.yaml": _dump(rayjob)}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": account, "namespace": namespace, "labels": dict(labels)}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": account, "namespace": namespace, "labels": dict(labels)},
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                    "verbs": ["create", "get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": account, "namespace": namespace, "labels": dict(labels)},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}},
        {"apiVersion": "batch/v1", "kind": "CronJob",
         "metadata": {"name": base, "namespace": namespace, "labels": dict(labels)},
         "spec": {
             "schedule": cron,
             "timeZone": "Etc/UTC",
             # The pod waits for its RayJob, so Forbid keeps two nights from overlapping.
             "concurrencyPolicy": "Forbid",
             "startingDeadlineSeconds": 3600,
             "successfulJobsHistoryLimit": 3,
             "failedJobsHistoryLimit": 3,
             "jobTemplate": {"spec": {
                 "backoffLimit": 0,
                 "activeDeadlineSeconds": RAYJOB_ACTIVE_DEADLINE_S + 3600,
                 "template": {"metadata": {"labels": dict(labels)}, "spec": {
                     "serviceAccountName": account,
                     "restartPolicy": "Never",
                     "containers": [{"name": "create-rayjob", "image": kubectl_image,
                                     "command": ["/bin/sh", "-c", wait_script],
                                     "volumeMounts": [dict(mount)]}],
                     "volumes": [dict(config_volume)]}}}}}},
    ]
    header = (f"# mmcurate pipeline {cfg.name}: nightly KubeRay RayJob, cron {cron!r} (UTC).\n"
              f"# Needs the KubeRay operator. Apply with: kubectl apply -f <this file>\n")
    return header + yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False)


AIRFLOW_TEMPLATE = '''"""Airflow DAG for mmcurate pipeline {name}, written by `mmcurate schedule --target airflow`.

{what}
Only Airflow's BashOperator is used. Retries are safe: `mmcurate run` is incremental and locked, and
`mmcurate submit` finds the job it already started for this run's date.
"""

from __future__ import annotations

import datetime

from airflow import DAG

try:  # Airflow 3 moved the core operators into the bundled "standard" provider.
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

with DAG(
    dag_id={dag_id!r},
    schedule={cron!r},
    start_date=datetime.datetime({start.year}, {start.month}, {start.day}, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={{"retries": 2, "retry_delay": datetime.timedelta(minutes=10)}},
    tags=["mmcurate"],
) as dag:
{tasks}
'''


def airflow_dag(cfg: PipelineConfig, config: Path, cron: str, overrides: list[str], address: str | None,
                workdir: Path) -> str:
    """The source of an Airflow DAG file that runs (or submits and waits for) the pipeline."""
    start = datetime.now(timezone.utc)
    cd = f"cd {shlex.quote(str(workdir))} && "
    if address is None:
        what = "One task runs the pipeline on the Airflow worker (`mmcurate run`)."
        tasks = (f"    run = BashOperator(task_id=\"run\", bash_command={json.dumps(cd + shlex.join(run_command(config, overrides, None)))})")
    else:
        what = (f"`submit` sends the run to the Ray cluster at {address} (id from the run's logical date; a\n"
                "retry after a FAILED job starts a new attempt), `wait` follows it to its end.")
        submit = cd + shlex.join(run_command(config, overrides, address, date_arg="DATE", resubmit=True))
        submit = submit.replace("--date DATE", "--date {{ ds_nodash }}")
        status = shlex.join([*mmcurate_command(), "status", "JOB", "--address", address, "--wait"])
        status = status.replace(" JOB ", " {{ ti.xcom_pull(task_ids='submit') }} ")
        tasks = (f"    # The last line `mmcurate submit` prints is the job id; BashOperator pushes it to XCom.\n"
                 f"    submit = BashOperator(task_id=\"submit\", bash_command={json.dumps(submit)}, do_xcom_push=True)\n"
                 f"    wait = BashOperator(task_id=\"wait\", bash_command={json.dumps(status)})\n"
                 f"    submit >> wait")
    dag_id = "mmcurate_" + "".join(c if c.isalnum() or c in "_-." else "_" for c in cfg.name)
    return AIRFLOW_TEMPLATE.format(name=cfg.name, what=what, dag_id=dag_id, cron=cron, start=start, tasks=tasks)


def schedule_command(
    config: Path = typer.Argument(..., help="pipeline YAML"),
    cron: str = typer.Option(..., "--cron", help='5-field cron expression, e.g. "0 2 * * *" (UTC for k8s)'),
    target: str = typer.Option(..., "--target", help="crontab, k8s or airflow"),
    out: Optional[Path] = typer.Option(None, "--out", help="write here instead of stdout"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override: dotted.key=YAML value"),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="crontab/airflow: submit to this Ray dashboard instead of running locally"),
    image: Optional[str] = typer.Option(None, "--image", help="k8s: image with mmcurate installed (default: submit.image)"),
    namespace: str = typer.Option("default", "--namespace", help="k8s namespace"),
    workers: int = typer.Option(2, "--workers", min=0, help="k8s: Ray worker pods"),
    kubectl_image: str = typer.Option(DEFAULT_KUBECTL_IMAGE, "--kubectl-image", help="k8s: image of the scheduling pod"),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="crontab: log file (default: ~/.local/state/mmcurate/NAME.log)"),
) -> None:
    """Emit a crontab line, Kubernetes manifests or an Airflow DAG that runs CONFIG on a cron."""
    setup_logging("WARNING")
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    cron = validate_cron(cron)
    overrides = list(set_ or [])
    config = config.resolve()
    cfg = load(config, overrides)  # a broken config fails now, not at 2 am
    workdir = Path.cwd().resolve()  # relative paths in the config mean what they mean here
    if target == "crontab":
        _refuse_secret_overrides(overrides)
        log = (log_file or Path.home() / ".local" / "state" / "mmcurate" / f"{cfg.name}.log").expanduser().resolve()
        text = crontab_line(cfg, config, cron, overrides, address, log, workdir)
    elif target == "airflow":
        _refuse_secret_overrides(overrides)
        text = airflow_dag(cfg, config, cron, overrides, address, workdir)
    else:
        image = image or cfg.submit.image
        if not image:
            raise ConfigError("--target k8s: pass --image (an image with mmcurate installed) or set submit.image")
        text = k8s_manifests(cfg, cron, image, namespace, workers, kubectl_image)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``schedule`` to the CLI."""
    app.command("schedule")(schedule_command)
