"""What per-operator counters cost: instrumented vs bare operator calls, and one collector push.

A script, not a test. On the same hand-built batches, in one run, it measures:

* the bare call of cheap operators (row filters: the worst case, since counting is a fixed cost
  per batch and these do the least work) against the same call through ``InstrumentedStage``;
* with ``--ray``: the time a worker spends submitting one fire-and-forget push to a real
  ``StatsCollector`` actor on a private local Ray, and how long the collector then needs to
  absorb a burst of pushes (what the driver waits for at the end of a run).

    python benchmarks/bench_stats_overhead.py --rows 256 --batches 400 [--ray]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def batch(rows: int):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    w = rng.integers(8, 400, rows).astype("int32")
    return pa.table({"key": [str(i) for i in range(rows)],
                     "text": ["a red circle on a blue background"] * rows,
                     "width": pa.array(w), "height": pa.array(w[::-1].copy()),
                     "reject_reason": pa.array([None if i % 10 else "decode:truncated" for i in range(rows)],
                                               type=pa.string())})


def per_call(fn, table, n: int) -> float:
    """Median seconds per call over ``n`` calls (after one warm-up)."""
    fn(table)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(table)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="rows per batch (the default operator batch size)")
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--ray", action="store_true", help="also time pushes to a real collector actor")
    args = ap.parse_args()

    from operators.base import registry
    from pipelines.stats import InstrumentedStage

    table = batch(args.rows)
    print(f"{args.rows} rows per batch, median of {args.batches} calls")
    print(f"{'operator':<16}{'bare us':>10}{'counted us':>12}{'overhead us':>13}{'ratio':>8}")
    for name, cfg in (("min_side", {"min": 32}), ("caption_length", {"min_words": 2}),
                      ("max_aspect_ratio", {"max": 4.0})):
        cls = registry.get(name)
        op = cls(cls.Config.model_validate(cfg))
        counted = InstrumentedStage(lambda: cls(cls.Config.model_validate(cfg)), name)
        bare_s = per_call(op, table, args.batches)
        counted_s = per_call(counted, table, args.batches)
        print(f"{name:<16}{bare_s * 1e6:>10.1f}{counted_s * 1e6:>12.1f}{(counted_s - bare_s) * 1e6:>13.1f}"
              f"{counted_s / bare_s:>8.2f}")

    if not args.ray:
        return
    import ray

    from pipelines.stats import StageCounters, start_collector

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        collector = start_collector("bench")
        counters = StageCounters("min_side")
        counters.observe(table, table, 0.001, 0.001)
        ray.get(collector.actor.snapshots.remote("bench"))  # the actor is up
        submit = []
        started = time.perf_counter()
        for _ in range(args.batches):
            counters.observe(table, table, 0.001, 0.001)
            t = time.perf_counter()
            collector.push(counters.snapshot())
            submit.append(time.perf_counter() - t)
        ray.get(collector.actor.snapshots.remote("bench"))  # ordered after every push from this caller
        drained = time.perf_counter() - started
        print(f"push submit (worker side): median {statistics.median(submit) * 1e6:.1f} us, "
              f"max {max(submit) * 1e3:.2f} ms")
        print(f"{args.batches} pushes absorbed by the collector in {drained:.2f} s "
              f"({args.batches / drained:,.0f} pushes/s)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
