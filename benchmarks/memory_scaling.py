"""Peak memory of `mmcurate run` over 4 shards vs 40 shards (streaming means ~equal).

Runs the real CLI twice under /usr/bin/time -v and, independently, samples the summed PSS (proportional set size)
of the whole process tree (driver + raylet + Ray workers) every 0.5 s. Prints both figures
for both runs and their ratios, measured in this one invocation.

    python benchmarks/memory_scaling.py [--workdir DIR] [--samples 100]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.sample_data import make_webdataset_shards  # noqa: E402


def tree_rss(pid: int) -> tuple[int, int]:
    """(summed PSS in bytes, number of processes) of ``pid`` and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        try:
            # PSS splits shared pages (Ray's object store is shared memory mapped by every
            # worker) between the processes that map them, so the sum does not count them twice.
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, len(procs)


def measure(config: Path) -> dict[str, float]:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, "-m", "jobs.cli", "run", str(config),
                             "--log-level", "WARNING"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = peak_procs = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_procs
        while not done.is_set():
            pss, nprocs = tree_rss(proc.pid)
            peak, peak_procs = max(peak, pss), max(peak_procs, nprocs)
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.time()
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{err[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rows = re.search(r"rows:\s+(\d+) in", out)
    return {"time_v_max_rss_mb": int(m.group(1)) / 1024 if m else float("nan"),
            "tree_peak_rss_mb": peak / 2**20, "peak_processes": peak_procs, "seconds": time.time() - t0,
            "rows": int(rows.group(1)) if rows else -1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--samples", type=int, default=100, help="good samples per shard")
    ap.add_argument("--object-store-mb", type=int, default=512, help="ray.object_store_memory_mb")
    ap.add_argument("--read-concurrency", type=int, default=None, help="input.read_concurrency")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmcurate-mem-"))
    shards = work / "shards"
    if not (shards / "00039.tar").exists():
        make_webdataset_shards(shards, n_shards=40, samples_per_shard=args.samples, seed=11)
    size_mb = sum(p.stat().st_size for p in shards.glob("*.tar")) / 2**20
    results = {}
    for n in (4, 40):
        cfg = {"name": f"mem{n}", "input": {"format": "webdataset",
                                            "paths": [str(shards / f"{{00000..{n - 1:05d}}}.tar")],
                                            "read_concurrency": args.read_concurrency},
               "output": {"path": str(work / f"out{n}")},
               "operators": [{"decode": {}}, {"min_side": {"min": 32}}, {"caption_length": {"min_words": 2}}],
               "ray": {"num_cpus": 2, "object_store_memory_mb": args.object_store_mb}}
        shutil.rmtree(work / f"out{n}", ignore_errors=True)  # a committed output would skip every shard
        path = work / f"mem{n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        results[n] = measure(path)
        print(f"{n:>2} shards: {results[n]['rows']} rows in {results[n]['seconds']:.1f}s; "
              f"/usr/bin/time -v max RSS {results[n]['time_v_max_rss_mb']:.0f} MB; "
              f"process-tree peak PSS {results[n]['tree_peak_rss_mb']:.0f} MB "
              f"over at most {results[n]['peak_processes']} processes", flush=True)
    print(f"input: 40 shards, {size_mb:.0f} MB; machine: {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB")
    print(f"ratio 40/4: time -v max RSS {results[40]['time_v_max_rss_mb'] / results[4]['time_v_max_rss_mb']:.2f}, "
          f"tree peak PSS {results[40]['tree_peak_rss_mb'] / results[4]['tree_peak_rss_mb']:.2f}, "
          f"rows {results[40]['rows'] / max(results[4]['rows'], 1):.1f}x")


if __name__ == "__main__":
    main()
