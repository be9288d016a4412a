"""Resource defaults derived from the node (issue 8 item 1), resolved without Ray.

``resolve_resources`` is what the driver calls with the connected cluster's node shape; these
tests hand it node shapes directly. What a user would notice: a CPU model that gets one torch
thread on a 2-core box, a plan that asks for more CPUs than a node has (it never schedules), or
an explicit setting that is ignored.
"""

from __future__ import annotations

import pytest

from pipelines.plan import NodeShape, light_share, operator_steps, resolve_resources
from tests.helpers import make_config

DECODE_CLIP = [{"decode": {}}, {"clip": {"model": "/models/clip"}}]
DEMO_LIKE = [{"decode": {}}, {"min_side": {"min": 32}}, {"clip": {"model": "/m/clip"}},
             {"caption": {"model": "/m/vit_gpt2", "name": "vitgpt2"}},
             {"aesthetic": {"weights": "/m/head.safetensors"}}]


def steps_for(tmp_path, operators):
    return operator_steps(make_config([str(tmp_path / "*.tar")], str(tmp_path / "out"), operators=operators))


def by_name(steps):
    return {s.name: s for s in steps}


def test_a_cpu_model_gets_most_of_a_two_core_node_as_two_single_threaded_actors(tmp_path):
    steps = by_name(resolve_resources(steps_for(tmp_path, DECODE_CLIP), NodeShape(cpus=2)))
    clip = steps["clip"]
    assert clip.resources.min_actors == clip.resources.max_actors == 2
    assert clip.resources.num_cpus == 0.75
    # each actor sizes torch from the resolved value it receives in its config: one thread
    assert clip.config.resources.num_cpus == 0.75 and round(clip.config.resources.num_cpus) == 1
    # and every light stage (read, decode, write) still fits next to both
    assert 2 * clip.resources.num_cpus + 3 * light_share(NodeShape(cpus=2)) <= 2
    assert steps["decode"].resources.num_cpus == light_share(NodeShape(cpus=2))


@pytest.mark.parametrize("cpus, actors, threads", [(1, 1, 1), (4, 3, 1), (8, 6, 1), (16, 6, 2), (96, 8, 9)])
def test_cpu_model_actors_are_many_and_narrow_up_to_a_cap(tmp_path, cpus, actors, threads):
    clip = by_name(resolve_resources(steps_for(tmp_path, DECODE_CLIP), NodeShape(cpus=cpus)))["clip"]
    assert clip.resources.max_actors == actors
    assert max(1, round(clip.resources.num_cpus)) == threads  # the torch threads an actor starts
    assert actors * clip.resources.num_cpus <= cpus


def test_a_gpu_model_or_a_set_num_cpus_keeps_one_actor_and_set_counts_win(tmp_path):
    ops = [{"decode": {}}, {"clip": {"model": "/m/clip", "resources": {"num_gpus": 1}}},
           {"caption": {"model": "/m/c", "name": "c", "resources": {"num_cpus": 2}}}]
    steps = by_name(resolve_resources(steps_for(tmp_path, ops), NodeShape(cpus=16, cpus_per_gpu=16)))
    assert steps["clip"].resources.max_actors == 1 and steps["caption"].resources.max_actors == 1
    ops = [{"decode": {}}, {"clip": {"model": "/m/clip", "resources": {"min_actors": 1, "max_actors": 3}}}]
    clip = by_name(resolve_resources(steps_for(tmp_path, ops), NodeShape(cpus=2)))["clip"]
    assert (clip.resources.min_actors, clip.resources.max_actors, clip.resources.num_cpus) == (1, 3, 0.5)


@pytest.mark.parametrize("node, pool", [(NodeShape(cpus=2), (1, 1)), (NodeShape(cpus=16, nodes=4), (1, 4)),
                                        (NodeShape(cpus=96, cpus_per_gpu=12, nodes=100), (1, 100))])
def test_a_head_on_actors_grows_on_demand_to_one_actor_per_node_and_set_counts_win(tmp_path, node, pool):
    # Ray's own default for an unset max_actors is no bound: on 2 cores, up to sixteen heads
    # actors at a 0.125-CPU light share, every one holding torch.
    head = by_name(resolve_resources(steps_for(tmp_path, DEMO_LIKE), node))["aesthetic"]
    assert head.resources.uses_actors and (head.resources.min_actors, head.resources.max_actors) == pool
    ops = [{"clip": {"model": "/m/clip"}},
           {"aesthetic": {"weights": "/m/h.safetensors", "resources": {"min_actors": 2}}},
           {"head": {"weights": "/m/n.safetensors", "output": "nsfw_score", "resources": {"max_actors": 3}}}]
    steps = by_name(resolve_resources(steps_for(tmp_path, ops), node))
    assert (steps["aesthetic"].resources.min_actors, steps["aesthetic"].resources.max_actors) == (2, max(2, pool[1]))
    assert (steps["head"].resources.min_actors, steps["head"].resources.max_actors) == (1, 3)


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 96])
def test_model_actors_together_never_take_the_whole_node(tmp_path, cpus):
    node = NodeShape(cpus=cpus)
    steps = resolve_resources(steps_for(tmp_path, DEMO_LIKE), node)
    heavy = [s.resources.num_cpus for s in steps if s.cls.heavy]
    assert len(heavy) == 2 and heavy[0] == heavy[1]
    # two 1-CPU actors on 2 cores starve the readers: some CPU always stays for read + decode
    assert sum(heavy) + light_share(node) <= max(cpus, 1)
    assert all(s.resources.num_cpus > 0 for s in steps)


def test_explicit_settings_always_win(tmp_path):
    ops = [{"decode": {"resources": {"num_cpus": 1}}},
           {"clip": {"model": "/m/clip", "cpu_threads": 3, "resources": {"num_cpus": 0.5}}}]
    steps = by_name(resolve_resources(steps_for(tmp_path, ops), NodeShape(cpus=16)))
    assert steps["decode"].resources.num_cpus == 1
    assert steps["clip"].resources.num_cpus == 0.5
    assert steps["clip"].config.cpu_threads == 3


def test_a_gpu_actor_that_decodes_on_its_threads_reserves_the_cpus_that_come_with_its_gpu_share(tmp_path):
    ops = [{"decode": {}}, {"clip": {"model": "/m/clip", "prepare_in": "actor",
                                     "resources": {"num_gpus": 0.5, "max_actors": 4}}}]
    # an H200 node of this project: 16 cores, one GPU
    steps = by_name(resolve_resources(steps_for(tmp_path, ops), NodeShape(cpus=16, cpus_per_gpu=16)))
    assert list(steps) == ["decode", "clip"]
    assert steps["clip"].resources.num_cpus == 6  # 0.75 of the 8 CPUs that come with half a GPU
    assert steps["decode"].resources.num_cpus == 1


def test_a_gpu_clip_gets_a_cpu_prepare_stage_by_default_and_keeps_one_cpu_itself(tmp_path):
    ops = [{"decode": {}}, {"clip": {"model": "/m/clip", "resources": {"num_gpus": 1}}}]
    steps = resolve_resources(steps_for(tmp_path, ops), NodeShape(cpus=16, cpus_per_gpu=16))
    assert [s.name for s in steps] == ["decode", "clip_prepare", "clip"]
    prep, clip = steps[1], steps[2]
    # the stage is a task pool (one process per task: decoding is not held to one GIL) of
    # light tasks, on the model's batches; the actor only unpacks and runs the model
    assert not prep.resources.uses_actors and not prep.cls.heavy
    assert prep.resources.num_cpus == light_share(NodeShape(cpus=16)) == 1
    assert prep.resources.batch_size == clip.resources.batch_size
    assert clip.resources.num_cpus == 1 and clip.resources.max_actors == 1
    assert clip.config.resources.num_cpus == 1  # what the actor sizes its threads from


@pytest.mark.parametrize("cpus, prep", [(4, 1.0), (8, 1.0), (16, 1.0), (2, 0.125)])
def test_the_prepare_stage_takes_whole_cpus_where_the_node_has_room(tmp_path, cpus, prep):
    # a small GPU node (4 vCPUs, one GPU): a quarter-CPU share would start 12 decode processes,
    # each with torch imported, on 4 cores; a whole CPU each starts at most as many as cores
    ops = [{"clip": {"model": "/m/clip", "resources": {"num_gpus": 1}}}]
    steps = by_name(resolve_resources(steps_for(tmp_path, ops), NodeShape(cpus=cpus, cpus_per_gpu=cpus)))
    assert steps["clip_prepare"].resources.num_cpus == prep
    assert steps["clip"].resources.num_cpus == 1
    # forced onto a CPU-only node, the stage never asks for more than the model actors leave
    ops = [{"clip": {"model": "/m/clip", "prepare_in": "tasks"}}]
    steps = by_name(resolve_resources(steps_for(tmp_path, ops), NodeShape(cpus=cpus)))
    held = steps["clip"].resources.num_cpus * steps["clip"].resources.max_actors
    assert held + steps["clip_prepare"].resources.num_cpus <= cpus


@pytest.mark.parametrize("prepare_in, gpus, staged", [("auto", 0, False), ("tasks", 0, True), ("actor", 1, False),
                                                      ("auto", 0.5, True)])
def test_prepare_in_decides_whether_clip_gets_a_prepare_stage(tmp_path, prepare_in, gpus, staged):
    ops = [{"decode": {}}, {"clip": {"model": "/m/clip", "prepare_in": prepare_in, "resources": {"num_gpus": gpus}}}]
    names = [s.name for s in steps_for(tmp_path, ops)]
    assert names == (["decode", "clip_prepare", "clip"] if staged else ["decode", "clip"])


def test_the_plan_shows_unset_cpus_as_derived(tmp_path):
    described = [s.resources.num_cpus for s in steps_for(tmp_path, DECODE_CLIP)]
    # nothing is decided from the machine that builds the plan
    assert described == [None, None]


def test_several_cpu_actors_queue_two_batches_each_and_make_the_run_wait_for_them(tmp_path):
    """A pool of several CPU actors keeps the next batch queued in each actor (no idle gap
    between batches) and makes the run wait for its actors before dispatching (else the first
    one ready takes the queued batches alone); a GPU actor or a single actor keeps Ray's default."""
    from pipelines.plan import batches_in_flight, waits_for_actors

    two_cores = NodeShape(cpus=2)
    cpu = by_name(resolve_resources(steps_for(tmp_path, DECODE_CLIP), two_cores))
    assert cpu["clip"].resources.max_actors == 2 and batches_in_flight(cpu["clip"].resources) == 2
    assert waits_for_actors(list(cpu.values()))
    one = resolve_resources(steps_for(tmp_path, [{"clip": {"model": "/m", "resources": {"max_actors": 1}}}]), two_cores)
    assert batches_in_flight(one[0].resources) is None and not waits_for_actors(one)
    gpu = resolve_resources(steps_for(tmp_path, [{"clip": {"model": "/m", "resources": {"num_gpus": 1, "max_actors": 2}}}]),
                            NodeShape(cpus=16, cpus_per_gpu=8))
    assert all(batches_in_flight(s.resources) is None for s in gpu) and not waits_for_actors(gpu)
    decode_only = resolve_resources(steps_for(tmp_path, [{"decode": {}}]), two_cores)
    assert not waits_for_actors(decode_only)


def test_local_shards_are_read_inside_a_first_pool_of_cpu_model_actors_and_nowhere_else(tmp_path):
    """Reads fuse into the model actors only where that is cheaper and Ray can fuse them: the
    first pool is of CPU model actors with only derived light steps before it, the shards are
    local files, read_concurrency is unset. The steps before it take its CPUs, no batch size."""
    from pipelines.plan import reads_in_actors

    clip = [{"clip": {"model": "/models/clip"}}]

    def fused(operators, paths=None, **extra):
        cfg = make_config(paths or [str(tmp_path / "*.tar")], str(tmp_path / "out"), operators=operators, **extra)
        steps = operator_steps(cfg)
        at = reads_in_actors(cfg, steps)
        return None if at is None else steps[at].name

    assert fused(clip) == "clip"
    assert fused(clip, paths=[f"file://{tmp_path}/a.tar"]) == "clip"
    assert fused([{"text_embed": {"model": "/models/st"}}]) == "text_embed"
    assert fused(clip, paths=["s3://bucket/shards/*.tar"]) is None  # the network wait stays in read tasks
    assert fused(clip, paths=[str(tmp_path / "a.tar"), "s3://bucket/b.tar"]) is None
    assert fused(clip, read_concurrency=2) is None  # Ray fuses no read with a task pool size of its own
    assert fused(DECODE_CLIP) == "clip"
    assert fused([{"decode": {"resources": {"num_cpus": 0.5}}}, *clip]) is None  # an explicit setting wins
    gpu_first = [{"clip": {"model": "/m", "resources": {"num_gpus": 1}}}, {"text_embed": {"model": "/st"}}]
    assert fused(gpu_first) is None  # the first pool has a GPU
    assert fused([{"clip": {"model": "/m", "resources": {"num_gpus": 1}}}]) is None
    assert fused([{"decode": {}}]) is None  # no model pool at all


def test_the_steps_before_the_actors_that_read_take_their_cpus_and_no_batch_size(tmp_path):
    from pipelines.plan import fuse_into_actors

    cfg = make_config([str(tmp_path / "*.tar")], str(tmp_path / "out"),
                      operators=[{"decode": {}}, {"min_side": {"min": 32}}, {"clip": {"model": "/m"}}, {"decode": {}}])
    configured = operator_steps(cfg)
    steps, pool = fuse_into_actors(cfg, configured, resolve_resources(configured, NodeShape(cpus=2)))
    assert pool.name == "clip" and pool.resources.num_cpus == 0.75
    assert [(s.resources.num_cpus, s.resources.batch_size) for s in steps[:2]] == [(0.75, None), (0.75, None)]
    assert steps[2] is pool and steps[3].resources.num_cpus == light_share(NodeShape(cpus=2))  # after: unchanged
    s3 = make_config(["s3://b/*.tar"], str(tmp_path / "out"), operators=[{"decode": {}}, {"clip": {"model": "/m"}}])
    steps3 = resolve_resources(operator_steps(s3), NodeShape(cpus=2))
    assert fuse_into_actors(s3, operator_steps(s3), steps3) == (steps3, None)
