"""`top_fraction` through the real select on local Ray: an exact per-group cut across files and blocks."""

from __future__ import annotations

import math
import random

import pyarrow.parquet as pq

from pipelines.select.config import SelectConfig
from pipelines.select.runner import select
from tests.integration.select_support import row, write_annotated_output


def test_top_fraction_by_group_keeps_exactly_the_best_ceil_f_n_of_each_group(ray_session, tmp_path):
    rng = random.Random(5)
    shards = {}
    rows = []
    for f in range(3):  # rows of each language spread over three input files
        part = []
        for i in range(14):
            lang = "en" if (f + i) % 3 else "de"
            r = row(f"k{f}-{i:02d}", clip_score=round(rng.uniform(0.1, 0.9), 4), text_lang=lang)
            part.append(r)
        shards[f"/src/s{f}.tar"] = part
        rows += part
    shards["/src/s0.tar"][0]["clip_score"] = None  # cannot be ranked: the rule rejects it
    out, cur = str(tmp_path / "out"), str(tmp_path / "cur")
    write_annotated_output(out, shards)
    cfg = SelectConfig.model_validate(
        {"rules": [{"top_fraction": {"column": "clip_score", "fraction": 0.3, "by": "text_lang"}}]})
    summary = select(cfg, out, cur)

    kept = {r["key"] for r in pq.read_table(f"{cur}/data", columns=["key"]).to_pylist()}
    rejected = {r["key"]: r["reject_reason"] for r in
                pq.read_table(f"{cur}/rejected", columns=["key", "reject_reason"]).to_pylist()}
    assert summary.kept == len(kept) and len(kept) + len(rejected) == len(rows)
    reason = "select:top_0.3_clip_score_by_text_lang"
    assert set(rejected.values()) == {reason} and "k0-00" in rejected
    for lang in ("en", "de"):
        ranked = sorted((r for r in rows if r["text_lang"] == lang and r["clip_score"] is not None),
                        key=lambda r: (-r["clip_score"], r["key"]))
        want = {r["key"] for r in ranked[:math.ceil(0.3 * len(ranked))]}
        assert {k for k in kept if any(r["key"] == k and r["text_lang"] == lang for r in rows)} == want
