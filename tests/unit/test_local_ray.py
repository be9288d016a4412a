"""The Ray a run starts for itself (the embedded default) gets ``LOCAL_RAY_SYSTEM_CONFIG``.

In a fresh subprocess: the suite's own session Ray may already be initialised in this process.
Reads the started node's system config through Ray's private ``_global_node`` (no public API
exposes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from pipelines import config as config_mod
from pipelines.runner import init_ray
import ray
cfg = config_mod.validate({"name": "probe", "input": {"format": "webdataset", "paths": ["/nowhere/x.tar"]},
                           "output": {"path": sys.argv[1]}, "operators": [], "ray": {"num_cpus": 1}}, "<probe>")
init_ray(cfg)
print(json.dumps(ray._private.worker._global_node._config))
ray.shutdown()
"""


def test_a_run_s_own_ray_keeps_idle_workers_for_the_next_burst_of_tasks(tmp_path):
    from pipelines.runner import LOCAL_RAY_SYSTEM_CONFIG

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    started = json.loads(proc.stdout.strip().splitlines()[-1])
    assert started["idle_worker_killing_time_threshold_ms"] == 10_000
    assert {k: started[k] for k in LOCAL_RAY_SYSTEM_CONFIG} == LOCAL_RAY_SYSTEM_CONFIG
