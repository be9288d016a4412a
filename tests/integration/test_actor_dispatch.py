"""A pool of several CPU model actors, on a real local Ray: local shards are read inside the
actors, which still run the operator ``batch_size`` rows at a time (``pipelines.plan.reads_in_actors``);
the run waits until every actor of the pool is ready before it dispatches a batch
(``pipelines.plan.waits_for_actors``), and an actor that can never start is a one-line error after
``ray.no_progress_timeout_s``, not a hang.

That the batches are then spread over the actors is Ray's least-busy dispatch; a test of it
here depended on when the read tasks' blocks arrived and passed without the wait as often as
with it, so the wait itself is what is tested.
"""

from __future__ import annotations

import json
import math
import tarfile
import time

import pytest

from ground.errors import StalledError
from jobs.sample_data import make_webdataset_shards
from pipelines.runner import run
from tests.helpers import make_config


def test_local_shards_are_read_inside_the_cpu_actors_which_still_run_batch_size_rows_a_call(
        ray_session, tmp_path, tiny_models):
    shards = make_webdataset_shards(tmp_path / "in", n_shards=2, samples_per_shard=20, seed=6)
    # rows per shard, the generator's bad samples included
    rows = [len({m.name.split(".", 1)[0] for m in tarfile.open(s) if m.isfile()}) for s in shards]
    cfg = make_config([str(tmp_path / "in" / "*.tar")], str(tmp_path / "out"),
                      operators=[{"decode": {}}, {"clip": {"model": tiny_models["clip"], "resources": {"batch_size": 10}}}])
    summary = run(cfg)
    assert summary.shards_committed == 2 and summary.rows_in == sum(rows) == summary.kept + summary.rejected
    (run_dir,) = (tmp_path / "out" / "_mmcurate" / "runs").iterdir()
    # Ray fused the read and decode into the actor pool: one operator, no tasks of their own...
    assert "Operator 1 ReadReadWebdataset->MapBatches(ImageDecoder)->MapBatches(ClipEmbedder):" in (
        run_dir / "ray_stats.txt").read_text()
    # ...whose calls are still 10 rows at most: each shard reaches an actor as one block, cut
    # into 10 + 10 + the rest (a whole block per call would be 2 calls; Ray batching 10 rows of
    # both shards, one fewer).
    clip = json.loads((run_dir / "stats.json").read_text())["operators"]["clip"]
    assert rows[0] > 20 and clip["batches"] == sum(math.ceil(n / 10) for n in rows)
    assert clip["rows_seen"] == sum(rows)


def test_cpu_actors_that_can_never_all_start_fail_in_one_line(ray_session, tmp_path, tiny_models):
    cpus = ray_session.cluster_resources()["CPU"]
    make_webdataset_shards(tmp_path / "in", n_shards=1, samples_per_shard=2, seed=5)
    cfg = make_config([str(tmp_path / "in" / "00000.tar")], str(tmp_path / "out"),
                      operators=[{"clip": {"model": tiny_models["clip"],
                                           "resources": {"num_cpus": cpus / 2 + 0.25, "min_actors": 2,
                                                         "max_actors": 2}}}])
    cfg.ray.autoscaling = True  # the CPU check only warns: the second actor waits for a node that never comes
    cfg.ray.no_progress_timeout_s = 5
    with pytest.raises(StalledError) as err:
        run(cfg)
    assert str(err.value) == ("the model actors (clip x2) were not all ready after 5s (ray.no_progress_timeout_s): "
                              "the cluster cannot give them the resources they ask for, or loading the model takes "
                              "longer")
    assert not (tmp_path / "out" / "_mmcurate" / "ledger").exists() or not any(
        (tmp_path / "out" / "_mmcurate" / "ledger").iterdir())
    # The actor that did start is dropped with the run's handles, but only once its constructor
    # has finished (Ray kills an actor no one holds after its creation): the next test on this
    # session's Ray gets every CPU back.
    deadline = time.monotonic() + 90
    while ray_session.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) == cpus
