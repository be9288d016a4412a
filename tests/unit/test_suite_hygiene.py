"""The suite restores the environment it changes: an inner pytest session started from a process
whose variables hold sentinel values leaves every one of them as it found it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What tests/conftest.py sets (and, for the first group, deletes) for the whole session.
MANAGED = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "RAY_DATA_DISABLE_PROGRESS_BARS",
           "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MMCURATE_MODEL_CACHE", "HF_HOME", "XDG_CACHE_HOME",
           "XDG_CONFIG_HOME", "CUDA_CACHE_PATH", "RAY_ADDRESS", "RAY_AUTH_MODE", "AWS_PROFILE", "HF_ENDPOINT"]

INNER = """
import json, os, sys, pytest
names = json.loads(sys.argv[1])
before = {n: os.environ.get(n) for n in names}
code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests/unit/test_filters.py"])
after = {n: os.environ.get(n) for n in names}
print(json.dumps({"code": int(code), "changed": sorted(n for n in names if before[n] != after[n])}))
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
