"""Unattended runs as a scheduler sees them: exit codes, the run lock between two processes,
incremental runs over changed and appended inputs, and ``mmcurate runs``.

``mmcurate`` runs here are real subprocesses (joining the session's Ray, or starting their own
where Ray's address is what is tested); S3 is the real
moto server, with ``tests/faultproxy.py`` holding one read so a run is caught mid-way.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import yaml

from jobs.sample_data import draw_image, encode, make_webdataset_shards
from pipelines.runner import run
from tests.conftest import free_port
from tests.faultproxy import FaultProxy
from tests.helpers import ledger_records, make_config, read_rows

REPO = Path(__file__).resolve().parents[2]
LOCAL_RAY = {"num_cpus": 2, "object_store_memory_mb": 256, "no_progress_timeout_s": 120}


def mmcurate(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    extra = env or {}
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_DATA_DISABLE_PROGRESS_BARS="1", **extra)
    if "RAY_ADDRESS" not in extra:
        env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_config(path: Path, inputs: list[str], output: str, storage_options: dict | None = None,
                 ray: dict | None = None, **input_extra) -> Path:
    cfg = {"name": "nightly",
           "input": {"format": "webdataset", "paths": inputs, "storage_options": storage_options or {}, **input_extra},
           "output": {"path": output, "storage_options": storage_options or {}},
           "operators": [{"decode": {}}, {"min_side": {"min": 32}}],
           "ray": ray or LOCAL_RAY}
    path.write_text(yaml.safe_dump(cfg))
    return path


def row_list(fs, root: str) -> list[tuple]:
    out = []
    for kind in ("data", "rejected"):
        for r in read_rows(fs, root, kind):
            out.append((kind, r["source_shard"].rsplit("/", 1)[-1], r["key"], r["reject_reason"], r["sha256"]))
    return sorted(out, key=repr)


def test_exit_3_names_each_failed_shard_and_exit_2_names_an_unreachable_ray(session_ray_address, tmp_path):
    make_webdataset_shards(tmp_path / "in", n_shards=1, samples_per_shard=3, seed=8)
    (tmp_path / "in" / "00001.tar").mkdir()  # listed like a shard, unreadable on every run
    (tmp_path / "in" / "00002.tar").write_bytes(b"")  # permanently bad bytes: damaged, committed
    out = tmp_path / "out"
    config = write_config(tmp_path / "p.yaml", [str(tmp_path / "in" / "*.tar")], str(out),
                          shard_retries=0)
    # This run joins the session's Ray (a scheduler's run on a cluster); the runs below name dead ones.
    proc = mmcurate("run", str(config), "--log-level", "WARNING",
                    env={"RAY_ADDRESS": session_ray_address})
    assert proc.returncode == 3, proc.stderr[-2000:]
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("failed shard ")]
    assert len(failed) == 1 and f"{tmp_path}/in/00001.tar: " in failed[0]
    assert "Traceback" not in proc.stderr
    assert "2 committed (1 damaged), 1 failed, 0 quarantined" in proc.stdout
    (failure,) = (out / "_mmcurate" / "failures").glob("*.json")
    assert json.loads(failure.read_text())["consecutive_failures"] == 1

    # The history shows that run as partial with its shard outcomes, rows and rate (no Ray needed).
    (stats,) = [json.loads(p.read_text()) for p in (out / "_mmcurate" / "runs").glob("*/stats.json")]
    history = mmcurate("runs", str(out))
    assert history.returncode == 0, history.stderr
    header, line = history.stdout.splitlines()
    assert header.split() == ["run", "start", "end", "status", "commit", "damag", "fail", "quar", "rows", "rows/s"]
    assert line.split()[0] == stats["run_id"] and line.split()[5:] == [
        "partial", "2", "1", "1", "0", str(stats["rows_in"]), f"{stats['rows_per_s']:.1f}"]
    assert stats["rows_in"] == 7 and stats["rows_per_s"] > 0  # 3 good + 4 bad samples in 00000.tar

    port = free_port()  # nothing listens here: a dead head
    config = write_config(tmp_path / "p2.yaml", [str(tmp_path / "in" / "00000.tar")], str(tmp_path / "out2"),
                          ray={"address": f"127.0.0.1:{port}", "connect_timeout_s": 20})
    proc = mmcurate("run", str(config))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mmcurate: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

    # A port that accepts connections but never speaks Ray (a wedged head): bounded, one line.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nothing ever answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        config = write_config(tmp_path / "p4.yaml", [str(tmp_path / "in" / "00000.tar")], str(tmp_path / "out4"),
                              ray={"address": address, "connect_timeout_s": 3})
        started = time.monotonic()
        proc = mmcurate("run", str(config), timeout=120)
        took = time.monotonic() - started
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mmcurate: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"Ray at {address} did not answer within 3s" in lines[0] and took < 60

    # ray.address: null inside a Ray job: RAY_ADDRESS names the cluster, and it is the one used.
    config = write_config(tmp_path / "p3.yaml", [str(tmp_path / "in" / "00000.tar")], str(tmp_path / "out3"),
                          ray={"address": None, "connect_timeout_s": 20})
    proc = mmcurate("run", str(config), env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert proc.returncode == 2 and f"cannot reach Ray at 127.0.0.1:{port}" in proc.stderr, proc.stderr[-2000:]


def test_a_second_run_on_the_same_output_is_refused_and_a_stale_lease_is_taken_over(session_ray_address, s3,
                                                                                      tmp_path):
    fs, opts, bucket = s3
    for p in make_webdataset_shards(tmp_path / "wds", n_shards=2, samples_per_shard=4, seed=9):
        fs.put_file(str(p), f"{bucket}/wds/{p.name}")
    proxy = FaultProxy(opts["endpoint_url"])
    try:
        # Hold the first run's listing of the input: it already holds the lock then (taken first).
        held = proxy.add_rule("hold", method="GET", path=r"list-type=2&prefix=wds(/|%2F)", times=1)
        inputs, out = [f"s3://{bucket}/wds/{{00000..00001}}.tar"], f"s3://{bucket}/out"
        slow = write_config(tmp_path / "slow.yaml", inputs, out, {"endpoint_url": proxy.url})
        direct = write_config(tmp_path / "direct.yaml", inputs, out, {"endpoint_url": opts["endpoint_url"]})
        # The first run joins the session's Ray; the lock is taken before Ray either way.
        env = dict(os.environ, PYTHONPATH=str(REPO), RAY_DATA_DISABLE_PROGRESS_BARS="1",
                   RAY_ADDRESS=session_ray_address)
        first = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(slow), "--log-level", "WARNING"],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while not held.waiting.wait(1):
                assert first.poll() is None, f"the first run ended early: {first.communicate()[1][-2000:]}"
            second = mmcurate("run", str(direct))
            lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
            assert second.returncode == 4 and len(lines) == 1, second.stderr[-2000:]
            assert lines[0].startswith("mmcurate: error: output is locked by run ")
            assert socket.gethostname() in lines[0] and "--break-lock" in lines[0]
            with fs.open(f"{bucket}/out/_mmcurate/lock", "rb") as f:
                holder = json.load(f)
            assert holder["run_id"] in lines[0] and holder["pid"] == first.pid
        finally:
            proxy.clear()  # let the first run read on
            stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-2000:]
        fs.invalidate_cache()
        assert not fs.exists(f"{bucket}/out/_mmcurate/lock")  # released at the end
        assert len(ledger_records(fs, f"{bucket}/out")) == 2

        # A run that crashed leaves a lease nobody renews: once expired, the next run takes it over.
        stale = {"run_id": "crashed-run", "host": "old-host", "pid": 1, "acquired_at": 0, "renewed_at": 0,
                 "expires_at": time.time() - 1, "ttl_s": 600}
        fs.pipe_file(f"{bucket}/out/_mmcurate/lock", json.dumps(stale).encode())
        third = mmcurate("run", str(direct))
        assert third.returncode == 0, third.stderr[-2000:]
        assert "took over the run lock (expired) from run crashed-run on old-host" in third.stderr

        # A live lease of another host is refused until it expires, unless an operator breaks it.
        live = {**stale, "run_id": "live-run", "expires_at": time.time() + 3600}
        fs.pipe_file(f"{bucket}/out/_mmcurate/lock", json.dumps(live).encode())
        refused = mmcurate("run", str(direct))
        assert refused.returncode == 4 and "locked by run live-run" in refused.stderr, refused.stderr[-2000:]
        broken = mmcurate("run", str(direct), "--break-lock")
        assert broken.returncode == 0, broken.stderr[-2000:]
        assert "took over the run lock (broken with --break-lock) from run live-run" in broken.stderr
        assert "shards: 2 found, 2 already committed" in broken.stdout
        fs.invalidate_cache()
        assert not fs.exists(f"{bucket}/out/_mmcurate/lock")  # broken, held, then released
    finally:
        proxy.stop()


def test_changed_shards_are_reported_then_redone_atomically_and_runs_lists_the_history(ray_session, tmp_path):
    fs = fsspec.filesystem("file")
    make_webdataset_shards(tmp_path / "in", n_shards=2, samples_per_shard=4, seed=10)
    out = str(tmp_path / "out")
    paths = [str(tmp_path / "in" / "*.tar")]
    initial = run(make_config(paths, out))
    assert initial.exit_code == 0
    before = row_list(fs, out)

    # The provider re-uploads shard 00001 with other samples (another seed, another size).
    make_webdataset_shards(tmp_path / "new", n_shards=2, samples_per_shard=6, seed=11)
    (tmp_path / "in" / "00001.tar").write_bytes((tmp_path / "new" / "00001.tar").read_bytes())
    changed = str(tmp_path / "in" / "00001.tar")

    reported = run(make_config(paths, out))
    assert set(reported.changed_shards) == {changed} and reported.changed_shards[changed]["action"] == "reported"
    assert reported.shards_committed == 0 and row_list(fs, out) == before  # report only: rows untouched
    old_files = set(ledger_records(fs, out)[1]["files"]["data"])

    redone = run(make_config(paths, out, on_change="redo"))
    assert redone.changed_shards[changed]["action"] == "redone" and redone.shards_committed == 1
    fresh_out = str(tmp_path / "fresh")
    run(make_config(paths, fresh_out))
    assert row_list(fs, out) == row_list(fs, fresh_out)  # old rows replaced, none duplicated
    rec = {Path(r["shard"]).name: r for r in ledger_records(fs, out)}["00001.tar"]
    assert rec["generation"] == 1 and not old_files & set(rec["files"]["data"])
    published = {p.name for p in (tmp_path / "out" / "data").iterdir()}
    assert published == {f for r in ledger_records(fs, out) for f in r["files"]["data"]}

    quiet = run(make_config(paths, out, on_change="redo"))
    assert not quiet.changed_shards and quiet.shards_committed == 0

    proc = mmcurate("runs", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "start", "end", "status"] and len(lines) == 1 + 4
    assert [ln.split()[0] for ln in lines[1:]] == [r.run_id for r in (initial, reported, redone, quiet)]
    redo_line = next(ln for ln in lines if ln.startswith(redone.run_id))
    assert " complete " in redo_line and f" {redone.rows_in} " in redo_line
    history = json.loads(mmcurate("runs", out, "--json").stdout)
    assert [h["run_id"] for h in history][-2:] == [redone.run_id, quiet.run_id]


def test_an_appended_coco_file_redoes_only_its_last_shard(ray_session, tmp_path):
    fs = fsspec.filesystem("file")
    rng = random.Random(12)
    (tmp_path / "img").mkdir()
    images = []
    for i in range(8):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode(draw_image(rng, (48, 48))[0]))
        images.append({"id": 800 - i, "file_name": f"{i}.jpg"})
    annotations = [{"image_id": im["id"], "caption": f"picture number {n}"} for n, im in enumerate(images)]

    def write(n_images: int) -> None:
        ids = {im["id"] for im in images[:n_images]}
        (tmp_path / "captions.json").write_text(json.dumps(
            {"images": images[:n_images], "annotations": [a for a in annotations if a["image_id"] in ids]}))

    def cfg(out: str):
        return make_config([str(tmp_path / "captions.json")], out, fmt="coco", images_prefix=str(tmp_path / "img"),
                           coco_images_per_shard=2, on_change="redo", operators=[{"decode": {}}])

    write(5)  # shards 0-1, 2-3 full; 4-5 holds one image
    out = str(tmp_path / "out")
    assert run(cfg(out)).shards_committed == 3
    full = {r["shard"]: r["files"] for r in ledger_records(fs, out) if not r["shard"].endswith("4-5")}

    write(8)  # three images appended
    grown = run(cfg(out))
    assert [s.rsplit("=", 1)[1] for s in grown.changed_shards] == ["4-5"]
    assert grown.shards_committed == 2  # the grown shard and the new one; full shards untouched
    assert {r["shard"]: r["files"] for r in ledger_records(fs, out) if r["shard"] in full} == full
    run(cfg(str(tmp_path / "fresh")))
    assert row_list(fs, out) == row_list(fs, str(tmp_path / "fresh"))
