"""The wheel carries what `mmcurate demo` needs (issue 8 item 7), and the demo does what the README says.

Builds the wheel from this checkout (``pip wheel --no-deps --no-build-isolation``), installs it
with ``--no-deps`` into a fresh venv and runs ``mmcurate demo`` from an unrelated folder. A full
dependency install would take too long here, so the fresh venv sees our venv's third-party
packages through a folder of links to them, one per entry of our site-packages, leaving out
everything of mmcurate itself (its editable-install finder and dist-info, and the repo), so the
code and conf/ that run are only those inside the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """The environment without anything pointing at this checkout (PYTHONPATH, VIRTUAL_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(RAY_DATA_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1")
    return env


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", clean_env())
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_and_runs_the_demo_outside_the_checkout(tmp_path):
    # build from a copy: a build writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "mmcurate-demo"))
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
         str(src)], cwd=tmp_path)
    (wheel,) = dist.glob("mmcurate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmcurate_conf/pipelines/demo.yaml" in names
    # every code package of the checkout is in the wheel (the package list in pyproject is explicit)
    for top in ("ground", "operators", "pipelines", "jobs"):
        for init in (REPO / top).rglob("__init__.py"):
            assert str(init.relative_to(REPO)) in names, f"{init.relative_to(REPO)} missing from the wheel"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    ours = Path(sysconfig.get_paths()["purelib"])
    shared = tmp_path / "third_party"
    shared.mkdir()
    for entry in ours.iterdir():
        if entry.name.lower().startswith(("mmcurate", "__editable__")) or entry.suffix == ".pth":
            continue
        (shared / entry.name).symlink_to(entry)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "third_party.pth").write_text(str(shared) + "\n")
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # As a new user runs it: Ray's default token auth (the suite otherwise turns it off), with
    # the token Ray writes under HOME kept in this test's folder.
    env = {k: v for k, v in clean_env().items() if k != "RAY_AUTH_MODE"}
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    where = run([str(python), "-c", "import jobs, operators; print(jobs.__file__, operators.__file__)"],
                cwd=elsewhere, env=env).stdout
    assert str(REPO) not in where and str(site) in where
    demo = [str(venv / "bin" / "mmcurate"), "demo", "--output", str(elsewhere / "demo"), "--shards", "2",
            "--samples", "6"]
    proc = run(demo, cwd=elsewhere, env=env, timeout=900)
    assert "shards: 2 found" in proc.stdout
    # the warnings a new user used to see on the demo (issue 8 item 7)
    for noise in ("requires torchvision", "attention mask is not set", "Token authentication is enabled",
                  "Truncating long operator name", "Loading weights", "Writing model shards"):
        assert noise not in proc.stderr, proc.stderr[-2000:]
    files = list((elsewhere / "demo" / "out" / "data").glob("*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in files) == 12  # 2 x 6 good samples (+4 bad each, rejected)
    # The demo embeds, captions and scores with tiny models labelled as random weights.
    table = pq.read_table(files[0])
    for col in ("clip_image_embedding", "clip_text_embedding", "clip_score", "caption_vitgpt2", "aesthetic_score"):
        assert table[col].null_count == 0, col
    assert table.schema.field("clip_image_embedding").type.value_type == "halffloat"
    models = json.loads(table.schema.metadata[b"mmcurate"])["models"]
    assert models["caption_vitgpt2"]["random_weights"] is True
    assert set(models["clip_image_embedding"]["weights_sha256"]) == {"model.safetensors"}
    # Rerunning the demo resumes: nothing left to do.
    again = run(demo, cwd=elsewhere, env=env, timeout=900)
    assert "0 committed now" in again.stdout
