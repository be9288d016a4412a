"""clip with its CPU prepare stage (``prepare_in: tasks``) through a whole run on local Ray.

On CPU the default keeps decoding in the actor; ``prepare_in: tasks`` forces the stage that a
GPU actor gets by default, so the Ray plumbing (a task stage inserted before the actor pool, the
hand-over column, counters) is exercised here without a GPU.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.sample_data import make_webdataset_shards
from operators.models.base import read_embeddings
from operators.models.clip import ClipConfig, ClipEmbedder
from pipelines.runner import run
from tests.helpers import ledger_records, make_config, read_rows

LOCAL = fsspec.filesystem("file")


def test_a_run_with_the_prepare_stage_embeds_as_the_actor_would_and_writes_no_hand_over_column(
        ray_session, tmp_path, tiny_models):
    make_webdataset_shards(tmp_path / "in", n_shards=2, samples_per_shard=12)
    out = tmp_path / "out"
    clip = {"model": tiny_models["clip"], "prepare_in": "tasks", "resources": {"max_actors": 1}}
    summary = run(make_config([str(tmp_path / "in" / "*.tar")], str(out), operators=[{"decode": {}}, {"clip": clip}]))

    # every row accounted for, per shard
    for rec in ledger_records(LOCAL, str(out)):
        assert rec["rows_in"] == rec["kept"] + rec["rejected"] > 0
    kept, rejected = read_rows(LOCAL, str(out), "data"), read_rows(LOCAL, str(out), "rejected")
    assert len(kept) >= 24 and summary.rows_in == len(kept) + len(rejected)
    assert not [r for r in rejected if r["reject_reason"].startswith("clip")]  # decode caught the bad ones
    for path in (out / "data").glob("*.parquet"):
        assert "_clip_prepared" not in pq.read_schema(path).names
    for path in (out / "rejected").glob("*.parquet"):
        assert "_clip_prepared" not in pq.read_schema(path).names

    # the stage ran as a stage of its own, before the actor, on every row the actor saw
    (stats_path,) = (out / "_mmcurate" / "runs").glob("*/stats.json")
    ops = json.loads(stats_path.read_text())["operators"]
    assert ops["clip_prepare"]["class"] == "ClipPrepare" and ops["clip"]["class"] == "ClipEmbedder"
    assert ops["clip_prepare"]["position"] < ops["clip"]["position"]
    assert ops["clip_prepare"]["rows_in"] == ops["clip"]["rows_in"] == len(kept)

    # the embeddings are those the actor computes from the same stored images by itself
    written = pa.concat_tables(pq.read_table(p, columns=["image", "text", "clip_image_embedding"])
                               for p in sorted((out / "data").glob("*.parquet")))
    assert written.num_rows == len(kept)
    ref = ClipEmbedder(ClipConfig(model=tiny_models["clip"], prepare_in="actor"))(written.select(["image", "text"]))
    want, want_valid = read_embeddings(ref["clip_image_embedding"])
    got, _ = read_embeddings(written["clip_image_embedding"])
    assert want_valid.all()
    np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
