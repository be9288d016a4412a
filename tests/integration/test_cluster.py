"""``mmcurate submit|status|logs|stop|jobs`` against a real Ray cluster this module starts.

One head (``ray start --head`` with the dashboard on 127.0.0.1) and one worker node joined to
it, both with token authentication on, in a short temp dir under /tmp (unix socket paths under
pytest's tmp_path get too long). The submitted job runs a real pipeline that reads and writes
the moto S3 server over HTTP; the test reads the ledger and rows it wrote. Nothing is faked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from jobs.cluster import JOB_CONFIG_NAME, build_submission, submission_id
from jobs.sample_data import make_webdataset_shards
from pipelines import config as config_mod
from tests.conftest import TEST_KEY, TEST_SECRET, free_port
from tests.faultproxy import FaultProxy
from tests.helpers import ledger_records, read_rows

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# A busy 2-core machine takes well over Ray's defaults to bring a node up (`ray start` gives up after
# 30 s and is retried); these are waits, not assertions on speed.
STARTUP_BUDGET_S = 900
# A node's raylet gives its dashboard agent about 15 s to come up, a wait Ray does not let us
# configure; with eight test suites sharing two cores the agent's imports take longer than that.
# Ray's processes (not the test) get a higher CPU priority where the OS allows it (root).
NODE_NICENESS = -10
CLUSTER_READY_S = 300
JOB_DONE_S = 420
N_SHARDS, GOOD, BAD_PER_SHARD = 2, 6, 4  # jobs.sample_data: 4 bad samples per shard

# Bringing the cluster up counts against the first test's timeout: on a loaded machine it takes
# several node-start attempts (about 5 minutes seen with eight suites on two cores; STARTUP_BUDGET_S).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _node_ports() -> list[str]:
    """Free ports for everything a node listens on, so this cluster never collides with another."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def _raise_priority() -> None:
    try:
        os.nice(NODE_NICENESS)
    except OSError:  # not permitted: start at normal priority
        pass


class LocalRayCluster:
    """A head and one worker node started with ``ray start --block``, each in its own process group.

    ``ray stop`` would stop every Ray on this machine, so teardown signals only the process
    groups started here.
    """

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="mmc-", dir="/tmp")
        self.token = uuid.uuid4().hex
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        RAY_DATA_DISABLE_PROGRESS_BARS="1")
        # The job must get the project from the shipped py_modules, not from this checkout.
        self.env.pop("PYTHONPATH", None)
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"{name}.log", "ab")
        proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                 "--object-store-memory=100000000", "--num-cpus=1", *_node_ports(), *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_raise_priority)
        self.procs.append(proc)
        return proc

    def _alive_nodes(self) -> int | None:
        try:
            r = requests.get(f"{self.address}/nodes?view=summary", timeout=10,
                             headers={"Authorization": f"Bearer {self.token}"})
            nodes = r.json()["data"]["summary"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return sum(n["raylet"]["state"] == "ALIVE" for n in nodes)

    def _wait_nodes(self, n: int, proc: subprocess.Popen) -> bool:
        deadline = time.monotonic() + CLUSTER_READY_S
        while time.monotonic() < deadline:
            if (self._alive_nodes() or 0) >= n:
                return True
            if proc.poll() is not None:  # `ray start` gave up (node start timeout on a busy machine)
                return False
            time.sleep(2)
        return False

    def start(self) -> None:
        """Start the head, then the worker, each retried until STARTUP_BUDGET_S is spent."""
        deadline = time.monotonic() + STARTUP_BUDGET_S
        head_args = ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                     f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        for name, args, nodes in (("head", head_args, 1), ("worker", [f"--address=127.0.0.1:{self.gcs_port}"], 2)):
            while True:
                extra = [f"--ray-client-server-port={free_port()}"] if name == "head" else []
                proc = self._start(name, args + extra)
                if self._wait_nodes(nodes, proc):
                    break
                self._kill(proc)
                if time.monotonic() > deadline:
                    log = (Path(self.temp_dir) / f"{name}.log").read_text(errors="replace")
                    raise RuntimeError(f"Ray {name} did not start within {STARTUP_BUDGET_S}s: {log[-1500:]}")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        # A node given SIGTERM shuts its processes down in a few seconds when it can; the test
        # has nothing to save, so it does not wait longer before SIGKILL.
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    proc.poll()
                    return
                proc.poll()
                time.sleep(0.5)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self._kill(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalRayCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def mmcurate(*args: str, env: dict, timeout: float = JOB_DONE_S) -> subprocess.CompletedProcess:
    full_env = dict(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _write_config(tmp_path: Path, s3_opts: dict, bucket: str) -> Path:
    cfg = {
        "name": "nightly-s3",
        "input": {"format": "webdataset", "paths": [f"s3://{bucket}/wds/{{00000..{N_SHARDS - 1:05d}}}.tar"],
                  "storage_options": s3_opts, "block_rows": 8},
        "output": {"path": f"s3://{bucket}/curated", "storage_options": s3_opts, "target_file_size_mb": 8},
        "operators": [{"decode": {}}, {"min_side": {"min": 32}}],
        "ray": {"num_cpus": 2, "no_progress_timeout_s": 300},
        # The cluster already has every dependency (same virtualenv); a real cluster lists them here.
        "submit": {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_submit_runs_the_pipeline_on_the_cluster_once(ray_cluster, s3, tmp_path):
    fs, opts, bucket = s3
    for p in make_webdataset_shards(tmp_path / "wds", n_shards=N_SHARDS, samples_per_shard=GOOD, seed=3):
        fs.put_file(str(p), f"{bucket}/wds/{p.name}")
    config = _write_config(tmp_path, opts, bucket)
    env = dict(ray_cluster.env, RAY_ADDRESS=ray_cluster.address)
    expected_id = submission_id(config_mod.load(config, ["output.path=s3://elsewhere/x"]))

    first = mmcurate("submit", str(config), "--set", "operators.1.min_side.min=40", env=env)
    assert first.returncode == 0, first.stderr
    job = first.stdout.strip().splitlines()[-1]
    # Same pipeline, date and hash: the id is predictable; the override changed the hash.
    assert job.startswith(f"nightly-s3-{time.strftime('%Y%m%d', time.gmtime())}-")
    assert job != expected_id
    assert TEST_SECRET not in first.stdout + first.stderr and TEST_KEY not in first.stdout + first.stderr

    # A scheduler's retry: no second job, the first one's status instead.
    again = mmcurate("submit", str(config), "--set", "operators.1.min_side.min=40", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == job
    assert "already submitted" in again.stdout

    waited = mmcurate("status", job, "--wait", env=env)
    logs = mmcurate("logs", job, env=env)
    assert waited.returncode == 0, f"{waited.stdout}{waited.stderr}\n{logs.stdout[-3000:]}"
    assert "SUCCEEDED" in waited.stdout
    # The driver log is the `mmcurate run` summary.
    assert f"shards: {N_SHARDS} found, 0 already committed, {N_SHARDS} committed now" in logs.stdout
    assert TEST_SECRET not in logs.stdout

    # Its output, read back from S3: every row accounted for, the override applied.
    records = ledger_records(fs, f"{bucket}/curated")
    assert len(records) == N_SHARDS
    assert all(r["rows_in"] == r["kept"] + r["rejected"] == GOOD + BAD_PER_SHARD for r in records)
    kept, rejected = read_rows(fs, f"{bucket}/curated", "data"), read_rows(fs, f"{bucket}/curated", "rejected")
    assert len(kept) + len(rejected) == N_SHARDS * (GOOD + BAD_PER_SHARD)
    assert all(min(r["width"], r["height"]) >= 40 for r in kept)

    listed = mmcurate("jobs", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [ln for ln in listed.stdout.splitlines() if ln.startswith(job)]
    assert len(rows) == 1 and "SUCCEEDED" in rows[0] and "nightly-s3" in rows[0]

    # Another submit that day finds the succeeded job and starts nothing.
    third = mmcurate("submit", str(config), "--set", "operators.1.min_side.min=40", env=env)
    assert third.returncode == 0 and third.stdout.strip().splitlines()[-1] == job
    assert len([ln for ln in mmcurate("jobs", env=env).stdout.splitlines() if ln.startswith(job)]) == 1


def test_failed_job_makes_status_and_follow_exit_nonzero_and_resubmit_adds_an_attempt_that_stop_stops(
        ray_cluster, s3, tmp_path):
    fs, opts, bucket = s3
    proxy = FaultProxy(opts["endpoint_url"])  # lets the test hold the second attempt mid-way
    try:
        # No shards uploaded yet: attempt 1 fails (no input).
        config = _write_config(tmp_path, {**opts, "endpoint_url": proxy.url}, bucket)
        env = dict(ray_cluster.env, RAY_ADDRESS=ray_cluster.address)

        sub = mmcurate("submit", str(config), "--date", "20260101", env=env)
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip().splitlines()[-1]
        follow = mmcurate("logs", job, "--follow", env=env)
        assert follow.returncode == 1, follow.stdout + follow.stderr
        assert "FAILED" in follow.stderr
        # --follow streamed the driver's log: its one-line error is there, as in plain `logs`.
        (error,) = [ln for ln in mmcurate("logs", job, env=env).stdout.splitlines()
                    if ln.startswith("mmcurate: error:")]
        assert error in follow.stdout.splitlines()
        status = mmcurate("status", job, env=env)
        assert status.returncode == 1 and "FAILED" in status.stdout

        # Without --resubmit a failed job is reported, not retried; with it, attempt 2 starts.
        retry = mmcurate("submit", str(config), "--date", "20260101", env=env)
        assert retry.returncode == 1 and "--resubmit" in retry.stderr
        # Attempt 2 has input, and would succeed: hold its listing so it is still running when stopped.
        for p in make_webdataset_shards(tmp_path / "wds", n_shards=N_SHARDS, samples_per_shard=GOOD, seed=4):
            fs.put_file(str(p), f"{bucket}/wds/{p.name}")
        held = proxy.add_rule("hold", method="GET", path=r"list-type=2&prefix=wds(/|%2F)", times=1)
        resub = mmcurate("submit", str(config), "--date", "20260101", "--resubmit", env=env)
        assert resub.returncode == 0, resub.stderr
        assert resub.stdout.strip().splitlines()[-1] == f"{job}-2"
        assert held.waiting.wait(JOB_DONE_S), "attempt 2 never listed its input"
        stop = mmcurate("stop", f"{job}-2", env=env)
        assert stop.returncode == 0 and f"stop requested: {job}-2" in stop.stdout, stop.stderr
        final = mmcurate("status", f"{job}-2", "--wait", env=env)
        assert final.returncode == 1 and "STOPPED" in final.stdout and "FAILED" not in final.stdout, final.stdout
        assert not fs.exists(f"{bucket}/curated/_mmcurate/ledger")  # stopped before anything was committed
    finally:
        proxy.stop()


def test_unknown_job_unreachable_dashboard_and_missing_token_are_one_line_exit_2(ray_cluster):
    env = dict(ray_cluster.env, RAY_ADDRESS=ray_cluster.address)
    unknown = mmcurate("status", "no-such-job", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"mmcurate: error: no job 'no-such-job' on the Ray cluster at {ray_cluster.address}"

    dead = mmcurate("jobs", "--address", f"http://127.0.0.1:{free_port()}", env=env)
    assert dead.returncode == 2 and len(dead.stderr.strip().splitlines()) == 1
    assert "unreachable" in dead.stderr

    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = mmcurate("jobs", env=no_token)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "RAY_AUTH_MODE=token" in refused.stderr


def test_job_package_ships_code_conf_and_resolved_config_but_not_the_checkout(tmp_path):
    cfg = config_mod.validate({
        "name": "pkg", "input": {"format": "webdataset", "paths": ["s3://b/{0..1}.tar"],
                                 "storage_options": {"key": TEST_KEY, "secret": TEST_SECRET}},
        "output": {"path": "s3://b/out"}, "ray": {"address": "ray://elsewhere:10001", "num_cpus": 4},
        "submit": {"pip": ["s3fs>=2024.6"], "entrypoint_num_cpus": 0.5}}, "<test>")
    sub = build_submission(cfg, tmp_path, date="20260102")

    assert sub.base_id == f"pkg-20260102-{config_mod.config_hash(cfg)}"
    env = sub.runtime_env
    assert sorted(Path(p).name for p in env["py_modules"]) == ["ground", "jobs", "operators", "pipelines"]
    assert env["pip"] == ["s3fs>=2024.6"] and sub.entrypoint_num_cpus == 0.5
    workdir = Path(env["working_dir"])
    shipped = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*") if p.is_file())
    assert JOB_CONFIG_NAME in shipped and "conf/pipelines/basic.yaml" in shipped
    assert not [p for p in shipped if p.startswith(("tests", ".git", ".venv", "data"))]
    # The job joins its own cluster; the credentials travel in the file, never on the command line.
    job_cfg = yaml.safe_load((workdir / JOB_CONFIG_NAME).read_text())
    assert job_cfg["ray"]["address"] is None and job_cfg["ray"]["num_cpus"] is None
    assert job_cfg["input"]["storage_options"]["secret"] == TEST_SECRET
    assert TEST_SECRET not in sub.entrypoint and JOB_CONFIG_NAME in sub.entrypoint
    assert config_mod.config_hash(config_mod.validate(job_cfg, "<job>")) == config_mod.config_hash(cfg)


def test_image_submission_refuses_credentials_in_the_config(tmp_path):
    from ground.errors import ConfigError

    base = {"name": "img", "input": {"format": "webdataset", "paths": ["s3://b/{0..1}.tar"]},
            "output": {"path": "s3://b/out"}, "submit": {"image": "registry.example/mmcurate:1"}}
    sub = build_submission(config_mod.validate(base, "<test>"), tmp_path)
    assert sub.runtime_env["image_uri"] == "registry.example/mmcurate:1"
    assert set(sub.runtime_env) == {"image_uri", "env_vars"}  # all Ray allows beside image_uri
    assert "mmcurate run" in sub.entrypoint

    base["input"]["storage_options"] = {"secret": TEST_SECRET}
    with pytest.raises(ConfigError, match=r"input\.storage_options\.secret") as err:
        build_submission(config_mod.validate(base, "<test>"), tmp_path)
    assert TEST_SECRET not in str(err.value)


def _cluster_job_ids(cluster: LocalRayCluster) -> set[str]:
    """Every job the cluster has seen, drivers that joined it included (type DRIVER)."""
    r = requests.get(f"{cluster.address}/api/jobs/", timeout=30, headers={"Authorization": f"Bearer {cluster.token}"})
    r.raise_for_status()
    return {j.get("job_id") or j.get("submission_id") for j in r.json()}


def test_run_without_an_address_starts_its_own_ray_even_when_the_address_file_names_a_live_cluster(
        ray_cluster, tmp_path):
    # As after `ray start --head` on this machine: Ray's address file (in Ray's default temp dir)
    # names the live head. A short dir under /tmp: the private Ray's socket paths live below it.
    lure = Path(tempfile.mkdtemp(prefix="mmc-lure-", dir="/tmp"))
    try:
        (lure / "ray").mkdir()
        (lure / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{ray_cluster.gcs_port}")
        env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(lure)
        # The lure works: plain Ray's address discovery (ray.init() with no address) names the head.
        probe = subprocess.run([sys.executable, "-c", "from ray._private.services import "
                                "get_ray_address_from_environment as g; print(g(None, None))"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert probe.stdout.strip() == f"127.0.0.1:{ray_cluster.gcs_port}", probe.stderr[-2000:]

        shards = make_webdataset_shards(tmp_path / "wds", n_shards=1, samples_per_shard=GOOD, seed=5)
        config = tmp_path / "local.yaml"
        config.write_text(yaml.safe_dump({
            "name": "local-beside-a-cluster", "input": {"format": "webdataset", "paths": [str(p) for p in shards]},
            "output": {"path": str(tmp_path / "out")}, "operators": [{"decode": {}}],
            "ray": {"no_progress_timeout_s": 300}}))  # no num_cpus: joining would not be refused
        jobs_before = _cluster_job_ids(ray_cluster)
        run = mmcurate("run", str(config), env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "1 committed now" in run.stdout + run.stderr
        # Nothing joined the cluster: a driver connecting to it would be listed as a job.
        assert _cluster_job_ids(ray_cluster) == jobs_before
    finally:
        shutil.rmtree(lure, ignore_errors=True)
