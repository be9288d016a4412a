"""The suite restores the environment it changes: an inner pytest session started from a process
whose variables hold sentinel values leaves every one of them as it found it, and removes the
temporary folders it made; the Rays the tests start keep their session folders in one of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What tests/conftest.py sets (and, for the first group, deletes) for the whole session.
MANAGED = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "RAY_DATA_DISABLE_PROGRESS_BARS",
           "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MMCURATE_MODEL_CACHE", "HF_HOME", "XDG_CACHE_HOME",
           "XDG_CONFIG_HOME", "CUDA_CACHE_PATH", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_TMPDIR", "TMPDIR",
           "TORCHINDUCTOR_CACHE_DIR", "AWS_PROFILE", "HF_ENDPOINT"]

INNER = """
import json, os, sys, pytest
names = json.loads(sys.argv[1])
before = {n: os.environ.get(n) for n in names}

class Folders:  # the temporary folders this inner session made (conftest sets them before it starts)
    def pytest_sessionstart(self, session):
        self.made = [os.path.dirname(os.environ["MMCURATE_MODEL_CACHE"]), os.environ["RAY_TMPDIR"]]

folders = Folders()
code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests/unit/test_filters.py"],
                   plugins=[folders])
after = {n: os.environ.get(n) for n in names}
print(json.dumps({"code": int(code), "changed": sorted(n for n in names if before[n] != after[n]),
                  "made": folders.made, "left": [f for f in folders.made if os.path.exists(f)]}))
"""


def test_an_inner_session_restores_every_variable_it_sets():
    import json

    env = dict(os.environ, **{name: f"sentinel-{name.lower()}" for name in MANAGED})
    env["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME", "/nonexistent")  # must stay a usable path
    proc = subprocess.run([sys.executable, "-c", INNER, json.dumps(MANAGED)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stdout[-2000:]
    assert result["changed"] == [], result
    suite_root, ray_tmp = (Path(f).name for f in result["made"])
    assert suite_root.startswith("mmcurate-tests-") and ray_tmp.startswith("mmr-"), result
    assert result["left"] == [], result  # its temporary folders (the suite's, Ray's) are removed


def test_the_session_ray_keeps_its_session_folder_in_the_suite_s_temporary_folder(ray_session):
    """Not in /tmp/ray, where Ray's session folders (logs, sockets, spilled objects) outlive the suite."""
    session_dir = Path(ray_session._private.worker._global_node.get_session_dir_path())
    suite_ray_tmp = Path(os.environ["RAY_TMPDIR"])
    assert suite_ray_tmp.name.startswith("mmr-") and session_dir.is_relative_to(suite_ray_tmp), session_dir


def test_processes_the_tests_start_make_their_temporary_files_in_the_suite_s_folder(ray_session):
    """A subprocess and a Ray worker both get the suite's temporary folder, not /tmp: what a killed
    process leaves (a `ray start` dashboard's multiprocessing folder, pymp-*) goes with the suite."""
    suite_ray_tmp = Path(os.environ["RAY_TMPDIR"])

    @ray_session.remote
    def worker_tempdir() -> str:
        import tempfile

        return tempfile.gettempdir()

    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    for where in (child, ray_session.get(worker_tempdir.remote())):
        assert Path(where).is_relative_to(suite_ray_tmp), where


def test_torch_s_cache_folder_is_in_the_suite_s_folder_in_this_process_too(session_dir):
    """Importing transformers makes torch's inductor cache folder; in the pytest process, whose own
    temporary folder stays /tmp, that would be /tmp/torchinductor_USER after every run."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()).is_relative_to(session_dir), cache_dir()
