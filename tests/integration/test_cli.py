"""The `mmcurate` command as a user runs it: subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.sample_data import make_webdataset_shards
from tests.conftest import TEST_KEY, TEST_SECRET, free_port

REPO = Path(__file__).resolve().parents[2]


# Ray gives a new node a fixed 30 s to register, which a machine shared by many jobs can miss;
# a command that fails with exactly that is run again, up to this many times in all.
START_ATTEMPTS = 5


def mmcurate(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), RAY_DATA_DISABLE_PROGRESS_BARS="1", **(env or {}))
    for _ in range(START_ATTEMPTS):
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "node timed out during startup" not in proc.stderr:
            break
    return proc


def _config(tmp_path: Path, **over) -> Path:
    cfg = {
        "name": "cli",
        "input": {"format": "webdataset", "paths": [str(tmp_path / "shards" / "{00000..00002}.tar")]},
        "output": {"path": str(tmp_path / "out")},
        "operators": [{"decode": {}}, {"min_side": {"min": 32}}],
        "ray": {"num_cpus": 2},
    }
    cfg.update(over)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# A line Ray forwards from its own processes to the driver's terminal: "(raylet) ...",
# "(MapWorker(...) pid=123) ...", colour codes first when Ray colours them. They come at any
# moment (a raylet warns every 10 s on a nearly full disk), so "our last line" skips them.
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|.*?pid=\d+)\)")


def _last_own_line(stderr: str) -> str:
    return [ln for ln in stderr.strip().splitlines() if not RAY_FORWARDED.match(ln)][-1]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_plan_lists_pending_shards_and_operator_resources(tmp_path):
    make_webdataset_shards(tmp_path / "shards", n_shards=3, samples_per_shard=2)
    proc = mmcurate("plan", str(_config(tmp_path)), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["shards_found"] == 3 and plan["shards_pending"] == 3 and plan["shards_committed"] == 0
    assert [op["name"] for op in plan["operators"]] == ["decode", "min_side"]
    assert plan["operators"][0]["num_cpus"] is None  # derived at run time from the cluster
    text = mmcurate("plan", str(_config(tmp_path)))
    assert "3 found, 0 committed, 3 pending" in text.stdout
    assert "cpus=auto" in text.stdout


@pytest.mark.parametrize("override, expected", [
    (["--set", "output.compresion=zstd"], "unknown key 'output.compresion'"),
    (["--set", "operators.1.min_side.min=-5"], "operators[1].min_side.min=-5"),
    (["--set", "operators=[{blur: {}}]"], "unknown operator 'blur'"),
    (["--set", "input.format=tarball"], "input.format='tarball'"),
    (["--set", "input.paths=[unclosed"], "not valid YAML"),
])
def test_bad_config_is_one_line_naming_file_key_and_value(tmp_path, override, expected):
    path = _config(tmp_path)
    proc = mmcurate("run", str(path), *override)
    line = _one_error_line(proc)
    assert proc.returncode == 2
    assert expected in line
    if "YAML" not in expected:
        assert str(path) in line


def test_a_wrong_input_format_or_a_missing_model_path_stops_before_ray_starts_in_one_line(tmp_path):
    """Config faults that used to surface late: a tar under ``format: parquet`` read as damaged
    shards (exit 0, every shard marked done), a model path that does not exist failed in every
    actor with transformers' repo-id message after Ray and the actors had started."""
    make_webdataset_shards(tmp_path / "shards", n_shards=3, samples_per_shard=2)
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmr", dir="/tmp"))  # stays empty unless a Ray starts
    try:
        env = {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "local"}
        wrong = _config(tmp_path, input={"format": "parquet", "paths": [str(tmp_path / "shards" / "*.tar")]})
        proc = mmcurate("run", str(wrong), "--log-level", "WARNING", env=env)
        line = _one_error_line(proc)
        assert proc.returncode == 2
        assert re.fullmatch(rf"mmcurate: error: {re.escape(str(tmp_path))}/shards/0000[0-2]\.tar is a tar archive "
                            r"\(WebDataset\), but input\.format is 'parquet' \(set input\.format: webdataset\)", line)
        assert not list((tmp_path / "out").glob("_mmcurate/ledger/*.json"))
        # `mmcurate plan` refuses what `run` would refuse, with the same line.
        planned = mmcurate("plan", str(wrong), env=env)
        assert planned.returncode == 2 and _one_error_line(planned) == line
        # Paths that also catch a file of the other format (a stray Parquet file among the tars).
        pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "shards" / "stray.parquet")
        mixed = _config(tmp_path, input={"format": "webdataset", "paths": [str(tmp_path / "shards" / "*")]})
        planned = mmcurate("plan", str(mixed), env=env)
        assert planned.returncode == 2
        assert _one_error_line(planned).startswith(f"mmcurate: error: {tmp_path}/shards/stray.parquet is a Parquet "
                                                   "file, but input.format is 'webdataset', the format of ")
        (tmp_path / "shards" / "stray.parquet").unlink()

        missing = tmp_path / "models" / "clip"
        cfg = _config(tmp_path, operators=[{"decode": {}}, {"clip": {"model": str(missing)}}])
        proc = mmcurate("run", str(cfg), "--log-level", "WARNING", env=env)
        line = _one_error_line(proc)
        assert proc.returncode == 2
        assert line == f"mmcurate: error: operator 'clip': model '{missing}': no such file or folder"
        planned = mmcurate("plan", str(cfg), env=env)
        assert planned.returncode == 2 and _one_error_line(planned) == line
        assert not list(ray_tmp.iterdir()), "a Ray was started before the error"

        # On a cluster the driver does not judge the workers' paths (each actor refuses a missing
        # one itself): this run gets as far as connecting to its (dead) Ray.
        port = free_port()
        proc = mmcurate("run", str(cfg), "--log-level", "WARNING", env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        line = _one_error_line(proc)
        assert proc.returncode == 2 and f"cannot reach Ray at 127.0.0.1:{port}" in line
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_missing_input_and_unreachable_bucket_are_one_line(tmp_path):
    line = _one_error_line(mmcurate("plan", str(_config(tmp_path))))
    assert "00000.tar" in line and "does not exist" in line
    cfg = _config(tmp_path, input={
        "format": "webdataset", "paths": ["s3://nobucket/wds/00000.tar"],
        "storage_options": {"endpoint_url": f"http://127.0.0.1:{free_port()}",
                            "config_kwargs": {"retries": {"max_attempts": 1}}}})
    proc = mmcurate("plan", str(cfg))
    line = _one_error_line(proc)
    assert proc.returncode == 2  # the README: config and storage errors exit 2
    assert "s3://nobucket/wds/00000.tar" in line and "connect" in line.lower()


@pytest.mark.slow
def test_an_error_inside_a_ray_task_is_one_line_exit_1_and_debug_shows_the_traceback(session_ray_address, tmp_path,
                                                                                      tiny_models):
    """A model that loads but fails on every row: the run stops with exit 1 and one line.

    The runs join the session's Ray (``RAY_ADDRESS``, as inside a Ray job): what is under test is
    how an error raised in a worker reaches the terminal, not starting Ray."""
    make_webdataset_shards(tmp_path / "shards", n_shards=1, samples_per_shard=4)
    broken = tmp_path / "broken-clip"
    shutil.copytree(tiny_models["clip"], broken)
    proc_cfg = json.loads((broken / "processor_config.json").read_text())
    proc_cfg["image_processor"]["image_mean"] = [0.5, 0.5]  # RGB images need three; fails in the worker
    (broken / "processor_config.json").write_text(json.dumps(proc_cfg))
    cfg = _config(tmp_path, input={"format": "webdataset", "paths": [str(tmp_path / "shards" / "00000.tar")]},
                  operators=[{"decode": {}}, {"clip": {"model": str(broken), "resources": {"batch_size": 8, "max_actors": 1}}}])

    joined = {"RAY_ADDRESS": session_ray_address}
    proc = mmcurate("run", str(cfg), "--log-level", "WARNING", env=joined)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Workers' own warnings may be forwarded to stderr too; the failure itself is one line, last.
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mmcurate: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = _last_own_line(proc.stderr)
    assert line == errors[0]
    # The worker's own error, not Ray Data's wrapper ("UserCodeException: UDF failed ...").
    assert line.startswith("mmcurate: error: ") and "UserCodeException" not in line
    # The bad 2-value mean is refused where the model actor reads its processor, by name.
    assert "image_mean and image_std must have 3 values (RGB), got [0.5, 0.5]" in line, line
    assert line.endswith("(rerun with --log-level DEBUG for the traceback)")

    debug = mmcurate("run", str(cfg), "--log-level", "DEBUG", env=joined)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert _last_own_line(debug.stderr) == line


def test_a_config_error_raised_in_a_read_task_is_one_line_exit_2_without_ray_data_s_tracebacks(
        session_ray_address, tmp_path):
    """A Parquet list of URLs given as input: the read task refuses the column. Ray Data logged the
    remote traceback three times and the CLI printed Ray's multi-line copy of the error."""
    pq.write_table(pa.table({"url": ["http://example.com/a.jpg"], "caption": ["a"]}), tmp_path / "urls.parquet")
    cfg = _config(tmp_path, input={"format": "parquet", "paths": [str(tmp_path / "urls.parquet")],
                                   "image_column": "url", "text_column": "caption"},
                  operators=[{"decode": {}}])
    proc = mmcurate("run", str(cfg), "--log-level", "WARNING", env={"RAY_ADDRESS": session_ray_address})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "mmcurate: error:" in ln]
    assert errors == [_last_own_line(proc.stderr)], proc.stderr[-3000:]
    assert errors[0] == (f"mmcurate: error: {tmp_path}/urls.parquet: column 'url' holds string, not image bytes "
                         "(binary, or a struct with a binary 'bytes' field like HF datasets' Image); URLs must be "
                         "downloaded first")
    assert "Traceback" not in proc.stderr and "open an issue" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_run_against_s3_with_aws_endpoint_url_env_and_summary(s3, tmp_path):
    """No storage_options at all: the standard AWS chain (env credentials, AWS_ENDPOINT_URL)."""
    fs, opts, bucket = s3
    for p in make_webdataset_shards(tmp_path / "wds", n_shards=2, samples_per_shard=5, seed=3):
        fs.put_file(str(p), f"{bucket}/in/{p.name}")
    cfg = _config(tmp_path, input={"format": "webdataset", "paths": [f"s3://{bucket}/in/*.tar"]},
                  output={"path": f"s3://{bucket}/out"})
    # A Ray temp folder of its own, so the worker logs scanned below are this run's. Kept short:
    # Ray's unix socket paths must stay under 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="mmr", dir="/tmp")
    try:
        proc = mmcurate("run", str(cfg), "--log-level", "DEBUG",
                        env={"AWS_ENDPOINT_URL": opts["endpoint_url"], "RAY_TMPDIR": ray_tmp})
        assert proc.returncode == 0, proc.stderr[-3000:]
        # Credentials appear in no output: the CLI's own, and every log the run's Ray wrote.
        logs = [f for f in Path(ray_tmp).glob("ray/session_*/logs/**/*") if f.is_file()]
        assert any(f.name.startswith("worker-") for f in logs), "no Ray worker logs found to scan"
        assert "committed s3://" in proc.stderr  # DEBUG logging really was on
        for name, text in [("stdout", proc.stdout), ("stderr", proc.stderr)] + [
                (str(f), f.read_text(errors="replace")) for f in logs]:
            assert TEST_SECRET not in text and TEST_KEY not in text, name
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "shards: 2 found, 0 already committed, 2 committed now" in proc.stdout
    assert "rows:   18 in, 10 kept, 8 rejected" in proc.stdout
    for reason in ("decode:truncated", "decode:not_an_image", "webdataset:missing_image", "min_side:too_small"):
        assert reason in proc.stdout
    fs.invalidate_cache()
    assert len(fs.find(f"{bucket}/out/_mmcurate/ledger")) == 2


# The demo command itself runs in tests/integration/test_packaging.py, from the installed wheel.
