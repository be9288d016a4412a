"""Every input format through the whole pipeline on local Ray, with per-shard accounting."""

from __future__ import annotations

import json
import random
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.sample_data import draw_image, encode, make_webdataset_shards, write_tar
from pipelines.runner import run
from tests.helpers import ledger_records, make_config, read_rows

LOCAL = fsspec.filesystem("file")


def _accounting(out: Path) -> list[dict]:
    records = ledger_records(LOCAL, str(out))
    kept, rejected = read_rows(LOCAL, str(out), "data"), read_rows(LOCAL, str(out), "rejected")
    for rec in records:
        assert rec["rows_in"] == rec["kept"] + rec["rejected"]
        assert rec["kept"] == sum(r["source_shard"] == rec["shard"] for r in kept)
        assert rec["rejected"] == sum(r["source_shard"] == rec["shard"] for r in rejected)
    return records


def test_parquet_input_with_hf_struct_and_binary_columns(ray_session, tmp_path):
    rng = random.Random(5)
    imgs = [draw_image(rng) for _ in range(5)]
    struct_tbl = pa.table({
        "id": [f"s{i}" for i in range(5)],
        "image": [{"bytes": encode(im), "path": f"{i}.jpg"} for i, (im, _) in enumerate(imgs)],
        "caption": [c for _, c in imgs],
        "score": [0.5] * 5,
    })
    bin_tbl = pa.table({"image": [encode(im) for im, _ in imgs[:3]] + [None], "caption": ["x y", None, "a b", "c d"]})
    pq.write_table(struct_tbl, tmp_path / "a.parquet")
    pq.write_table(bin_tbl, tmp_path / "b.parquet")
    out = tmp_path / "out"
    s = run(make_config([str(tmp_path / "*.parquet")], str(out), fmt="parquet", text_column="caption"))
    assert s.rows_in == 9 and s.shards_committed == 2
    # b.parquet: row 1 has no caption (caption_length min_words=1), row 3 has no image
    assert s.rejected_by_reason == {"caption_length:missing_text": 1, "parquet:missing_image": 1}
    kept = {r["key"]: r for r in read_rows(LOCAL, str(out), "data")}
    # without id_column the key is <file stem>/<row number>; other columns land in meta
    assert json.loads(kept["a/000000000"]["meta"]) == {"id": "s0", "score": 0.5}
    assert kept["b/000000002"]["text"] == "a b"
    _accounting(out)


def test_imagefolder_and_coco_inputs(ray_session, tmp_path):
    rng = random.Random(6)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(4):
        im, cap = draw_image(rng)
        (folder / f"img{i}.png").write_bytes(encode(im, "PNG"))
        (folder / f"img{i}.txt").write_text(cap)
    (folder / "orphan.txt").write_text("caption without an image")
    out = tmp_path / "out-folder"
    s = run(make_config([str(folder)], str(out), fmt="imagefolder"))
    assert (s.rows_in, s.kept, dict(s.rejected_by_reason)) == (5, 4, {"imagefolder:missing_image": 1})
    _accounting(out)

    images = tmp_path / "coco" / "images"
    images.mkdir(parents=True)
    doc = {"images": [], "annotations": []}
    for i in range(5):
        im, cap = draw_image(rng)
        if i != 4:  # the last image is listed but missing on disk
            (images / f"{i:06d}.jpg").write_bytes(encode(im))
        doc["images"].append({"id": i, "file_name": f"{i:06d}.jpg"})
        doc["annotations"] += [{"image_id": i, "caption": cap}, {"image_id": i, "caption": "another view " + cap}]
    ann = tmp_path / "coco" / "captions.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "out-coco"
    cfg = make_config([str(ann)], str(out), fmt="coco", images_prefix=str(images), coco_images_per_shard=2)
    s = run(cfg)
    assert s.shards_committed == 3  # 5 images in slices of 2
    assert (s.rows_in, s.kept, dict(s.rejected_by_reason)) == (10, 8, {"coco:missing_image": 2})
    assert len(_accounting(out)) == 3


def test_empty_and_truncated_shards_are_committed_with_damage(ray_session, tmp_path):
    shards = tmp_path / "wds"
    make_webdataset_shards(shards, n_shards=1, samples_per_shard=6, with_bad=False, seed=9)
    write_tar(shards / "00001.tar", [])  # an empty shard
    whole = (shards / "00000.tar").read_bytes()
    (shards / "00002.tar").write_bytes(whole[: len(whole) * 2 // 3])  # cut mid-member
    out = tmp_path / "out"
    s = run(make_config([str(shards / "*.tar")], str(out)))
    records = {Path(r["shard"]).name: r for r in _accounting(out)}
    assert set(records) == {"00000.tar", "00001.tar", "00002.tar"}
    assert records["00001.tar"]["rows_in"] == 0 and records["00001.tar"]["files"] == {"data": [], "rejected": []}
    cut = records["00002.tar"]
    assert cut["damage"] and "tar damaged after" in cut["damage"]
    assert 0 < cut["kept"] < 6
    assert str(shards / "00002.tar") in s.damaged_shards
    assert records["00000.tar"]["damage"] is None and records["00000.tar"]["kept"] == 6


def test_target_file_size_splits_files_and_rejected_image_bytes_is_optional(ray_session, tmp_path):
    shards = make_webdataset_shards(tmp_path / "wds", n_shards=1, samples_per_shard=30, seed=4)
    url = "file://" + str(shards[0])  # any fsspec URL, file:// included
    out = tmp_path / "small-files"
    cfg = make_config([url], str(out))
    cfg.output.target_file_size_mb = 0.2
    cfg.output.rejected_image_bytes = True
    s = run(cfg)
    files = sorted((out / "data").glob("*.parquet"))
    total = sum((f.stat().st_size for f in files))
    assert len(files) >= 3 and total > 0.4 * 2**20
    # A file rolls over at the first row group that takes it to the target, so every file but
    # the last reaches it (the few-files bound, ceil(bytes / target) + 1, follows) and none is
    # over it by more than one row group: a quarter of the target, or one row where a single
    # photo is larger than that (this shard's largest is ~250 KB, more than the whole target).
    target = 0.2 * 2**20
    sizes = [f.stat().st_size for f in files]
    largest_row = max(len(r["image"]["bytes"]) for r in pq.read_table(out / "data", columns=["image"]).to_pylist())
    assert all(size >= target for size in sizes[:-1])
    assert max(sizes) < target + max(target / 4, largest_row) + 16 * 1024  # + footer and headers
    assert len(files) <= -(-total // target) + 1
    assert sum(pq.read_metadata(f).num_rows for f in files) == s.kept == 30
    rejected = pq.read_table(out / "rejected").to_pylist()
    with_bytes = [r for r in rejected if r["image"] and r["image"]["bytes"]]
    assert len(with_bytes) == 3  # truncated, not-an-image and tiny keep their bytes; no-image has none

    out2 = tmp_path / "default"
    run(make_config([url], str(out2)))
    rejected = pq.read_table(out2 / "rejected").to_pylist()
    assert len(rejected) == 4 and not any(r["image"] and r["image"]["bytes"] for r in rejected)
    assert {r["image"]["path"] for r in rejected if r["image"]} == {"00000xt.jpg", "00000xn.jpg", "00000xs.png"}
