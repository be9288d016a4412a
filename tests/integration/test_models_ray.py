"""Model operators on local Ray: moto-S3 shards -> decode -> CLIP, caption, aesthetic -> S3 Parquet.

The models are tiny random ones, put in a local HF hub cache as if downloaded, prefetched to
S3 with ``mmcurate models prefetch`` (hub offline), and loaded by the Ray actors from S3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.sample_data import make_webdataset_shards
from jobs.tiny_models import build_head
from operators.models import loading
from operators.models.base import read_embeddings
from pipelines import config as config_mod
from pipelines.runner import ResourceError, run
from tests.conftest import TEST_KEY, TEST_SECRET
from tests.helpers import TEST_RAY, install_in_hub_cache

N_SHARDS, GOOD, BAD_PER_SHARD = 2, 8, 4
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_models):
    """Tiny CLIP and ViT-GPT2 in a local HF cache as 'tiny-org/...' (the driver sees them, workers never do)."""
    built = {name: tiny_models[name] for name in ("clip", "vit_gpt2")}
    install_in_hub_cache(tmp_path / "hf-hub", {f"tiny-org/tiny-{name.replace('_', '-')}": path
                                               for name, path in built.items()}, COMMIT, monkeypatch)
    return built


def rows_with_images(fs, root: str, kind: str) -> list[dict]:
    rows, metas = [], []
    for path in sorted(fs.find(f"{root}/{kind}")):
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                t = pq.read_table(f)
            metas.append((t.schema, json.loads(t.schema.metadata[b"mmcurate"])))
            rows.append(t)
    return rows, metas


def ray_logs_text(ray) -> str:
    """Everything the session's Ray wrote to its log folder (driver, raylet, every worker)."""
    from ray._private import worker

    logs = Path(worker._global_node.get_session_dir_path()) / "logs"
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert any(f.name.startswith("worker-") for f in files), f"no worker logs under {logs}"
    return "\n".join(f.read_text(errors="replace") for f in files)


def test_models_from_prefetched_s3_copies_on_ray(ray_session, s3, tmp_path, hub_cache, capfd):
    fs, opts, bucket = s3
    for p in make_webdataset_shards(tmp_path / "wds", n_shards=N_SHARDS, samples_per_shard=GOOD, seed=3):
        fs.put_file(str(p), f"{bucket}/wds/{p.name}")
    head = build_head(tmp_path / "aesthetic.safetensors", [16, 1024, 128, 64, 16, 1])
    out = f"s3://{bucket}/curated"
    model_opts = dict(opts)
    raw = {
        "name": "models-it",
        "input": {"format": "webdataset", "paths": [f"s3://{bucket}/wds/*.tar"], "storage_options": opts},
        "output": {"path": out, "storage_options": opts, "target_file_size_mb": 8},
        "operators": [
            {"decode": {"resize_max_side": 96}},
            {"min_side": {"min": 32}},
            # One actor: a second one (the 2-CPU default) costs ~12 CPU-s of imports and proves nothing more.
            # prepare_in: tasks (a GPU actor's default): the clip_prepare task stage stages the
            # processor's files from the prefetched copy itself, inside a Ray task.
            {"clip": {"model": "tiny-org/tiny-clip", "storage_options": model_opts, "prepare_in": "tasks",
                      "resources": {"batch_size": 8, "max_actors": 1}}},
            {"caption": {"model": "tiny-org/tiny-vit-gpt2", "name": "vitgpt2", "max_new_tokens": 5,
                         "storage_options": model_opts, "resources": {"batch_size": 8, "num_cpus": 0.25}}},
            {"aesthetic": {"weights": str(head), "storage_options": model_opts}},
        ],
        "ray": dict(TEST_RAY),
    }
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    res = CliRunner().invoke(app, ["models", "prefetch", str(cfg_path), "--to", f"s3://{bucket}/models",
                                   "--storage-options", json.dumps(opts),
                                   "--write-config", str(tmp_path / "offline.yaml")])
    assert res.exit_code == 0, res.output
    offline = yaml.safe_load((tmp_path / "offline.yaml").read_text())
    assert offline["operators"][2]["clip"]["model"] == f"s3://{bucket}/models/tiny-org--tiny-clip"
    assert fs.exists(f"{bucket}/models/tiny-org--tiny-clip/{loading.MANIFEST}")

    cache = loading.cache_root()
    before = set(cache.iterdir()) if cache.is_dir() else set()
    summary = run(config_mod.validate(offline, source="offline.yaml"))
    assert summary.rows_in == N_SHARDS * (GOOD + BAD_PER_SHARD)
    assert summary.kept == N_SHARDS * GOOD

    tables, metas = rows_with_images(fs, out, "data")
    kept = pa.concat_tables(tables)
    assert kept.num_rows == N_SHARDS * GOOD
    emb_type = kept.schema.field("clip_image_embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 16 and emb_type.value_type == pa.float16()
    assert kept["clip_image_embedding"].null_count == 0 and kept["aesthetic_score"].null_count == 0
    assert kept["caption_vitgpt2"].null_count == 0 and kept["text"].null_count == 0
    assert kept["clip_score"].null_count == 0
    assert "_clip_prepared" not in kept.column_names
    # the stage staged the processor's files only, the actor the whole model (one node: one cache)
    staged = {p.name: sorted(q.name for q in p.iterdir()) for p in set(cache.iterdir()) - before
              if p.is_dir() and p.name.startswith("tiny-org--tiny-clip-")}
    assert len(staged) == 2
    assert sorted(any(n.endswith(".safetensors") for n in names) for names in staged.values()) == [False, True]

    # Stored embeddings match a bare forward of the same model on the same stored images.
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from operators.image.pixels import decode_rgb

    model = AutoModel.from_pretrained(hub_cache["clip"]).eval()
    proc = AutoImageProcessor.from_pretrained(hub_cache["clip"])
    imgs = [decode_rgb(r["bytes"]) for r in kept["image"].to_pylist()]
    with torch.inference_mode():
        ref = model.get_image_features(pixel_values=proc(images=imgs, return_tensors="pt")["pixel_values"])
    ref = torch.nn.functional.normalize(getattr(ref, "pooler_output", ref), dim=-1).numpy()
    got, _ = read_embeddings(kept["clip_image_embedding"])
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() >= 0.999

    # Rejected rows travel on with null model outputs and their first reason.
    rtables, _ = rows_with_images(fs, out, "rejected")
    rejected = pa.concat_tables(rtables)
    assert rejected.num_rows == N_SHARDS * BAD_PER_SHARD
    assert rejected["clip_image_embedding"].null_count == rejected.num_rows
    assert not any(r.startswith(("clip:", "caption_")) for r in rejected["reject_reason"].to_pylist())

    # Provenance in every data file: digests from the prefetch manifest, source id and commit.
    want = loading.sha256_file(Path(hub_cache["clip"], "model.safetensors"))
    for schema, meta in metas:
        models = meta["models"]
        assert set(models) >= {"clip_image_embedding", "clip_text_embedding", "clip_score", "caption_vitgpt2",
                               "aesthetic_score"}
        rec = models["clip_image_embedding"]
        assert rec["weights_sha256"] == {"model.safetensors": want}
        assert rec["source"] == {"model": "tiny-org/tiny-clip", "commit": COMMIT}
        assert rec["random_weights"] is True and models["aesthetic_score"]["random_weights"] is True

    # The storage secrets every model operator carried appear in no output of the run: not
    # in what this process printed, nor in any log the session's Ray workers wrote.
    captured = capfd.readouterr()
    for name, text in (("stdout", captured.out), ("stderr", captured.err), ("ray logs", ray_logs_text(ray_session))):
        assert TEST_SECRET not in text and TEST_KEY not in text, name


def test_asking_for_gpus_the_cluster_lacks_fails_at_plan_time(ray_session, tmp_path, tiny_models):
    shards = make_webdataset_shards(tmp_path / "wds", n_shards=1, samples_per_shard=2, seed=4)
    built = {"clip": tiny_models["clip"]}
    cfg = config_mod.validate({
        "name": "gpu", "input": {"format": "webdataset", "paths": [str(shards[0])]},
        "output": {"path": str(tmp_path / "out")},
        "operators": [{"decode": {}}, {"clip": {"model": built["clip"], "device": "auto",
                                                "resources": {"num_gpus": 1}}}],
    }, source="<test>")
    with pytest.raises(ResourceError, match=r"need 1 GPU\(s\) at once .*clip 1x1.* has 0"):
        run(cfg)
