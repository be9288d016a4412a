"""The bad-input zoo through the whole pipeline on local Ray: no crash, right reason, nothing lost."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
from PIL import Image

from pipelines.runner import run
from tests import zoo
from tests.helpers import ledger_records, make_config, read_rows

LOCAL = fsspec.filesystem("file")


def test_zoo_and_truncated_tar_every_row_kept_or_rejected_with_its_reason(ray_session, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    expected = zoo.make_zoo_shard(shards / "00000.tar")
    complete, cut_key, cut_rows = zoo.make_truncated_tar(shards / "00001.tar")
    out = tmp_path / "out"

    summary = run(make_config([str(shards / "*.tar")], str(out), operators=[{"decode": {}}]))

    kept = {r["key"]: r for r in read_rows(LOCAL, str(out), "data") if r["source_shard"].endswith("00000.tar")}
    rejected = {r["key"]: r for r in read_rows(LOCAL, str(out), "rejected")
                if r["source_shard"].endswith("00000.tar")}
    assert set(kept) | set(rejected) == set(expected)  # every zoo sample is somewhere...
    assert not set(kept) & set(rejected)  # ...exactly once
    for key, reason in expected.items():
        if reason is None:
            assert key in kept, f"{key} should be kept, got {rejected.get(key, {}).get('reject_reason')}"
            w, h, fmt = zoo.KEPT_DECODED[key]
            assert (kept[key]["width"], kept[key]["height"], kept[key]["format"]) == (w, h, fmt), key
        else:
            assert rejected[key]["reject_reason"] == reason, key
    assert kept[zoo.NO_CAPTION]["text"] is None

    # Normalised images are stored as upright 8-bit RGB that PIL opens with the recorded size.
    data_files = sorted((out / "data").glob("*.parquet"))
    images = {r["key"]: r["image"]["bytes"] for f in data_files for r in pq.read_table(f).to_pylist()}
    for key in zoo.NORMALISED_KEYS:
        img = Image.open(io.BytesIO(images[key]))
        assert img.mode == "RGB" and img.size == zoo.KEPT_DECODED[key][:2], key

    # The truncated tar: the samples before the cut kept, the cut one rejected, damage recorded.
    records = {Path(r["shard"]).name: r for r in ledger_records(LOCAL, str(out))}
    cut = records["00001.tar"]
    assert cut["rows_in"] == cut_rows and cut["kept"] == complete and cut["rejected"] == 1
    assert cut["rejected_by_reason"] == {"webdataset:truncated_sample": 1}
    assert cut["damage"] and str(shards / "00001.tar") in summary.damaged_shards
    zoo_rec = records["00000.tar"]
    assert zoo_rec["rows_in"] == len(expected) == zoo_rec["kept"] + zoo_rec["rejected"]
    assert summary.rows_in == len(expected) + cut_rows
