"""``mmcurate schedule``: the emitted crontab line, Kubernetes manifests and Airflow DAG.

Kubernetes objects are checked against the published schemas: the core kinds with
``kubernetes-validate`` (the API's own OpenAPI schemas, strict: unknown fields fail), the RayJob
against KubeRay's CRD schema vendored in tests/data/kuberay (see the README there), made strict
the same way. Airflow is far too heavy to install for a test: the DAG file is compiled, and run
against a small stand-in for the two Airflow names it imports to check what it declares.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import py_compile
import shlex
import subprocess
import sys
import types
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from croniter import croniter

from jobs.sample_data import make_webdataset_shards
from pipelines import config as config_mod
from tests.helpers import suite_temp_env

REPO = Path(__file__).resolve().parents[2]
RAYJOB_SCHEMA = REPO / "tests" / "data" / "kuberay" / "rayjob-v1.schema.json.gz"
# Kubernetes minor version whose schemas the core objects are checked against (CronJob.timeZone
# is GA since 1.27).
K8S_VERSION = "1.30"


def mmcurate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _config(tmp_path: Path, **over) -> Path:
    data = {"name": "nightly", "input": {"format": "webdataset", "paths": ["shards/{00000..00001}.tar"]},
            "output": {"path": "out"}, "operators": [{"decode": {}}, {"min_side": {"min": 32}}],
            "ray": {"num_cpus": 2}, **over}
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _strict(schema):
    """The CRD schema as the API server applies it with field validation on: unknown fields fail."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _rayjob_validator():
    return jsonschema.Draft7Validator(_strict(json.loads(gzip.decompress(RAYJOB_SCHEMA.read_bytes()))))


@pytest.mark.parametrize("expr, why", [("0 2 * *", "expected 5 fields"), ("0 25 * * *", "not a valid"),
                                       ("0 0 2 * * *", "expected 5 fields")])
def test_bad_cron_is_one_line_exit_2(tmp_path, expr, why):
    proc = mmcurate("schedule", str(_config(tmp_path)), "--cron", expr, "--target", "crontab")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and why in proc.stderr and expr in proc.stderr


def test_bad_target_and_bad_config_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "sched.txt"
    proc = mmcurate("schedule", str(_config(tmp_path)), "--cron", "0 2 * * *", "--target", "systemd", "--out", str(out))
    assert proc.returncode == 2 and "crontab, k8s, airflow" in proc.stderr and not out.exists()
    proc = mmcurate("schedule", str(_config(tmp_path, output={"path": "out", "pth": "x"})), "--cron", "0 2 * * *",
                    "--target", "crontab", "--out", str(out))
    assert proc.returncode == 2 and "output.pth" in proc.stderr and not out.exists()


def test_crontab_line_runs_as_cron_would(tmp_path):
    """The emitted line, run by ``sh`` from another folder with cron's bare environment, curates the shards."""
    work = tmp_path / "work"
    make_webdataset_shards(work / "shards", n_shards=2, samples_per_shard=3)
    config = _config(work)
    log = tmp_path / "logs" / "nightly.log"
    proc = mmcurate("schedule", str(config), "--cron", "30 1 * * *", "--target", "crontab",
                    "--log-file", str(log), "--set", "ray.no_progress_timeout_s=300", cwd=work)
    assert proc.returncode == 0, proc.stderr
    entries = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(entries) == 1
    fields = entries[0].split(None, 5)
    assert fields[:5] == ["30", "1", "*", "*", "*"] and croniter.is_valid(" ".join(fields[:5]))
    command = fields[5]
    assert f">> {log} 2>&1" in command and str(config) in command
    argv_paths = [a for a in shlex.split(command) if "/" in a and not a.startswith(("ray.", "-"))]
    assert all(Path(a).is_absolute() for a in argv_paths), argv_paths

    # What cron does: /bin/sh -c, cwd = $HOME, PATH=/usr/bin:/bin, nothing else set.
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           # Not cron's, but not what the line relies on either: where the run's Ray and its
           # processes keep their temporary files (without them every suite run left a Ray
           # session folder in /tmp/ray).
           **suite_temp_env()}
    if os.environ.get("PYTHONPATH") or not (Path(sys.executable).parent / "mmcurate").exists():
        env["PYTHONPATH"] = str(REPO)  # a source checkout run without `pip install -e .`
    sessions = lambda: set(Path(os.environ["RAY_TMPDIR"]).glob("ray/session_2*"))  # noqa: E731
    before = sessions()
    ran = subprocess.run(["/bin/sh", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=540)
    assert ran.returncode == 0, log.read_text()[-3000:] if log.exists() else ran.stderr
    assert sessions() - before, "the run's Ray kept its session folder outside the suite's folder"
    assert "shards: 2 found, 0 already committed, 2 committed now" in log.read_text()
    assert len(list((work / "out" / "_mmcurate" / "ledger").rglob("*.json"))) == 2


def test_crontab_escapes_percent_and_refuses_credentials_on_the_line(tmp_path):
    config = _config(tmp_path)
    proc = mmcurate("schedule", str(config), "--cron", "0 2 * * *", "--target", "crontab",
                    "--set", "output.path=out-%Y")
    assert proc.returncode == 0, proc.stderr
    assert "out-\\%Y" in proc.stdout and "out-%Y" not in proc.stdout.replace("\\%", "")
    proc = mmcurate("schedule", str(config), "--cron", "0 2 * * *", "--target", "crontab",
                    "--set", "input.storage_options.secret=hunter2")
    assert proc.returncode == 2 and "hunter2" not in proc.stdout + proc.stderr


def test_crontab_with_address_submits_and_waits(tmp_path):
    proc = mmcurate("schedule", str(_config(tmp_path)), "--cron", "0 2 * * *", "--target", "crontab",
                    "--address", "http://head:8265")
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")][0]
    argv = shlex.split(line.split(None, 5)[5].split(" && ")[-1])
    assert argv[argv.index("submit") + 2:argv.index("submit") + 4] == ["--address", "http://head:8265"]
    assert "--wait" in argv


def test_k8s_manifests_match_the_published_schemas(tmp_path):
    config = _config(tmp_path, submit={"env_vars": {"AWS_REGION": "eu-west-1"}})
    out = tmp_path / "nightly.k8s.yaml"
    proc = mmcurate("schedule", str(config), "--cron", "0 2 * * *", "--target", "k8s", "--image",
                    "registry.example/mmcurate:0.1", "--namespace", "curation", "--workers", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert sorted(kinds) == ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["namespace"] == "curation"

    cron = kinds["CronJob"]["spec"]
    assert cron["schedule"] == "0 2 * * *" and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    # The pod may create RayJobs: its ServiceAccount is bound to a Role that allows it.
    account = pod["serviceAccountName"]
    binding, role = kinds["RoleBinding"], kinds["Role"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "curation"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == account == kinds["ServiceAccount"]["metadata"]["name"]
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]} in role["rules"]
    script = pod["containers"][0]["command"][-1]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"kubectl create -f {mount}/rayjob.yaml" in script
    assert pod["volumes"][0]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]

    # The RayJob the pod creates, from the ConfigMap, against KubeRay's v1 CRD schema.
    rayjob = yaml.safe_load(kinds["ConfigMap"]["data"]["rayjob.yaml"])
    errors = sorted(_rayjob_validator().iter_errors(rayjob), key=str)
    assert not errors, [e.message for e in errors]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["entrypoint"] == "mmcurate run /etc/mmcurate/pipeline.yaml"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/mmcurate:0.1"
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in head["containers"][0]["env"]
    assert "/etc/mmcurate" in [m["mountPath"] for m in head["containers"][0]["volumeMounts"]]
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    # The config it runs is the resolved one, and joins the RayJob's own cluster.
    shipped = config_mod.validate(yaml.safe_load(kinds["ConfigMap"]["data"]["pipeline.yaml"]), "<configmap>")
    assert shipped.ray.address is None and shipped.ray.num_cpus is None
    assert config_mod.config_hash(shipped) == config_mod.config_hash(config_mod.load(config))


def test_the_rayjob_schema_check_catches_a_misspelt_field():
    """Guards the check above: a field KubeRay does not know is an error, not silently pruned."""
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
           "spec": {"entrypoint": "mmcurate run x.yaml", "shutdownAfterJobFinish": True}}
    assert [e.message for e in _rayjob_validator().iter_errors(job)]


def test_k8s_needs_an_image_and_refuses_credentials_in_the_configmap(tmp_path):
    config = _config(tmp_path)
    proc = mmcurate("schedule", str(config), "--cron", "0 2 * * *", "--target", "k8s")
    assert proc.returncode == 2 and "--image" in proc.stderr
    secret = _config(tmp_path, input={"format": "webdataset", "paths": ["s3://b/x.tar"],
                                      "storage_options": {"secret": "hunter2"}})
    proc = mmcurate("schedule", str(secret), "--cron", "0 2 * * *", "--target", "k8s", "--image", "img:1")
    assert proc.returncode == 2 and "input.storage_options.secret" in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr


def _run_dag(path: Path) -> dict:
    """Execute the DAG file against a stand-in for ``airflow.DAG`` and ``BashOperator``."""
    seen: dict = {"tasks": {}, "edges": []}

    class DAG:
        def __init__(self, **kwargs):
            seen["dag"] = kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class BashOperator:
        def __init__(self, task_id, bash_command, **kwargs):
            seen["tasks"][task_id] = {"bash_command": bash_command, **kwargs}
            self.task_id = task_id

        def __rshift__(self, other):
            seen["edges"].append((self.task_id, other.task_id))
            return other

    airflow = types.ModuleType("airflow")
    airflow.DAG = DAG
    bash = types.ModuleType("airflow.operators.bash")
    bash.BashOperator = BashOperator
    modules = {"airflow": airflow, "airflow.operators": types.ModuleType("airflow.operators"),
               "airflow.operators.bash": bash}
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        exec(compile(path.read_text(), str(path), "exec"), {"__name__": "dag_under_test"})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return seen


def test_airflow_dag_compiles_and_declares_the_schedule(tmp_path):
    config = _config(tmp_path)
    dag_file = tmp_path / "mmcurate_nightly.py"
    proc = mmcurate("schedule", str(config), "--cron", "15 3 * * 1-5", "--target", "airflow", "--out", str(dag_file))
    assert proc.returncode == 0, proc.stderr
    py_compile.compile(str(dag_file), cfile=str(tmp_path / "dag.pyc"), doraise=True)
    imported = {n.module for n in ast.walk(ast.parse(dag_file.read_text())) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "airflow", "airflow.operators.bash", "airflow.providers.standard.operators.bash"}

    seen = _run_dag(dag_file)
    assert seen["dag"]["schedule"] == "15 3 * * 1-5"
    assert seen["dag"]["catchup"] is False and seen["dag"]["max_active_runs"] == 1
    assert list(seen["tasks"]) == ["run"]
    argv = shlex.split(seen["tasks"]["run"]["bash_command"].split(" && ")[-1])
    assert argv[-2:] == ["run", str(config.resolve())]


def test_airflow_dag_with_address_submits_then_waits_on_the_submitted_id(tmp_path):
    dag_file = tmp_path / "dag.py"
    proc = mmcurate("schedule", str(_config(tmp_path)), "--cron", "0 2 * * *", "--target", "airflow",
                    "--address", "http://head:8265", "--out", str(dag_file))
    assert proc.returncode == 0, proc.stderr
    seen = _run_dag(dag_file)
    assert seen["edges"] == [("submit", "wait")]
    submit, wait = seen["tasks"]["submit"], seen["tasks"]["wait"]
    assert submit["do_xcom_push"] is True
    assert "--resubmit" in submit["bash_command"] and "--date {{ ds_nodash }}" in submit["bash_command"]
    assert "status {{ ti.xcom_pull(task_ids='submit') }} --address http://head:8265 --wait" in wait["bash_command"]
