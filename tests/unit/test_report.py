"""Operator counters and the per-run report, without Ray: real operators on hand-built batches,
a hand-built committed output (Parquet files + ledger records) on local disk."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ground.layout import LEDGER, RUNS
from ground.schema import IMAGE_TYPE, MMCURATE_METADATA_KEY
from operators.base import Resources, registry
from pipelines import report as report_mod
from pipelines import stats as stats_mod
from pipelines.ledger import Ledger
from pipelines.plan import OperatorStep
from pipelines.stats import (InstrumentedStage, RunCollector, StageCounters, StatsCollector, merge_snapshots,
                             stage_figures)


def decoded(rows: list[dict]) -> pa.Table:
    """A batch as it leaves ``decode`` (some rows already rejected by the reader or decode)."""
    return pa.table({
        "key": [str(i) for i in range(len(rows))],
        "text": pa.array([r.get("text", "a red circle") for r in rows], type=pa.string()),
        "width": pa.array([r.get("w") for r in rows], type=pa.int32()),
        "height": pa.array([r.get("h") for r in rows], type=pa.int32()),
        "reject_reason": pa.array([r.get("reason") for r in rows], type=pa.string()),
    })


def make_step(name: str, config: dict) -> OperatorStep:
    cls = registry.get(name)
    cfg = cls.Config.model_validate(config)
    return OperatorStep(name, cls, cfg, cls.resources(cfg))


ROWS = [
    {"w": 100, "h": 100},
    {"w": 10, "h": 100},                      # min_side:too_small
    {"w": 100, "h": 100, "text": "one"},      # caption_length:too_few_words
    {"w": None, "h": None, "reason": "decode:truncated"},
    {"w": 5, "h": 5, "text": "x"},            # min_side wins over caption_length
    {"w": 200, "h": 100},
]


def run_chain(batches: list[pa.Table], steps: list[OperatorStep]) -> tuple[list[StageCounters], list[pa.Table]]:
    """Push batches through instrumented real operators as a plan does; return counters and outputs."""
    stages = [InstrumentedStage(lambda s=s: s.cls(s.config), s.name) for s in steps]
    outs = []
    for batch in batches:
        for stage in stages:
            batch = stage(batch)
        outs.append(batch)
    return [s.counters for s in stages], outs


def test_counters_chain_rows_out_of_one_operator_into_the_next():
    steps = [make_step("min_side", {"min": 32}), make_step("caption_length", {"min_words": 2})]
    counters, outs = run_chain([decoded(ROWS), decoded(ROWS[:3])], steps)
    min_side, caption = (c.snapshot() for c in counters)
    assert min_side["rows_seen"] == caption["rows_seen"] == 9
    # Pending rows in: 9 seen minus the one row decode already rejected.
    assert min_side["rows_in"] == 8
    assert min_side["rejected_by_reason"] == {"min_side:too_small": 3}
    assert min_side["rows_out"] == 5 == caption["rows_in"]
    assert caption["rejected_by_reason"] == {"caption_length:too_few_words": 2}
    assert caption["rows_out"] == 3
    # The counters agree with what the writer will see on the rows.
    reasons = [r for t in outs for r in t["reject_reason"].to_pylist()]
    assert reasons.count("min_side:too_small") == 3 and reasons.count("caption_length:too_few_words") == 2
    assert sum(r is None for r in reasons) == caption["rows_out"]
    assert min_side["batches"] == 2 and min_side["seconds"] > 0


class _SlowModel:
    """Stands in for a model operator's call (the expensive boundary): burns CPU, keeps model_seconds."""

    def __init__(self) -> None:
        self.model_seconds = 0.0

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        deadline = time.process_time() + 0.02
        while time.process_time() < deadline:
            pass
        self.model_seconds += time.perf_counter() - started
        return batch.append_column("fake_score", pa.array(np.ones(batch.num_rows, dtype="float32")))


def test_timers_count_model_seconds_and_process_cpu_time():
    stage = InstrumentedStage(_SlowModel, "fake")
    for _ in range(3):
        stage(decoded(ROWS))
    snap = stage.counters.snapshot()
    assert snap["model_seconds"] == pytest.approx(stage.op.model_seconds)
    assert snap["model_seconds"] > 0
    assert snap["cpu_seconds"] >= 0.05  # three calls that each burn 20 ms of CPU
    assert snap["seconds"] >= snap["model_seconds"]


def test_collector_keeps_the_newest_snapshot_so_late_or_repeated_pushes_never_double_count():
    counters = StageCounters("min_side")
    batch = decoded(ROWS)
    snaps = []
    for _ in range(3):
        counters.observe(batch, batch, 0.1, 0.05)
        snaps.append(counters.snapshot())
    other = StageCounters("min_side")
    other.observe(batch, batch, 0.1, 0.05)
    collector = StatsCollector()
    for snap in [snaps[0], snaps[2], snaps[1], snaps[2], other.snapshot()]:  # reordered and repeated
        collector.take(snap)
    merged = merge_snapshots(collector.current())["min_side"]
    assert merged["rows_seen"] == 4 * len(ROWS)
    assert merged["workers"] == 2
    assert merged["seconds"] == pytest.approx(0.4)


def test_one_collector_keeps_runs_apart_and_ignores_pushes_for_a_run_it_has_handed_over():
    counters = StageCounters("min_side")
    counters.observe(decoded(ROWS), decoded(ROWS), 0.1, 0.05)
    collector = StatsCollector()
    collector.take(counters.snapshot(), "run-a")
    counters.observe(decoded(ROWS), decoded(ROWS), 0.1, 0.05)
    collector.take(counters.snapshot(), "run-b")
    assert merge_snapshots(collector.current("run-a"))["min_side"]["rows_seen"] == len(ROWS)
    assert merge_snapshots(collector.current("run-b"))["min_side"]["rows_seen"] == 2 * len(ROWS)
    asyncio.run(collector.forget("run-a"))
    collector.take(counters.snapshot(), "run-a")  # a worker's late push, after the run collected
    assert collector.current("run-a") == [] and len(collector.current("run-b")) == 1


class _BrokenActor:
    """A collector actor handle whose pushes fail (a dead actor, a lost connection): the boundary, faked."""

    class push:  # noqa: N801 - mimics ``handle.push.remote``
        calls = 0

        @classmethod
        def remote(cls, run_id, snap):
            cls.calls += 1
            raise ConnectionError("collector unreachable")


def test_a_failing_collector_never_fails_a_batch_and_is_not_retried_every_batch(caplog):
    step = make_step("min_side", {"min": 32})
    stage = InstrumentedStage(lambda: step.cls(step.config), "min_side", collector=RunCollector(_BrokenActor(), "r1"))
    outs = [stage(decoded(ROWS)) for _ in range(3)]
    assert all(o["reject_reason"].to_pylist()[1] == "min_side:too_small" for o in outs)
    assert _BrokenActor.push.calls == 1
    assert stage.counters.snapshot()["rows_seen"] == 3 * len(ROWS)
    assert "cannot report stats" in caplog.text


def test_stage_figures_per_1k_rows_and_gpu_seconds_reserved_by_actors():
    m = merge_snapshots([{"stage": "clip", "worker": "w1", "seq": 1, "batches": 4, "rows_seen": 2000,
                          "rows_in": 1900, "rows_out": 1890, "rejected": 10, "seconds": 4.0, "cpu_seconds": 3.0,
                          "model_seconds": 2.0, "init_seconds": 1.0, "actor_seconds": 9.0,
                          "rejected_by_reason": {"clip:oom": 10}, "sample_shards": []}])["clip"]
    fig = stage_figures(m, Resources(num_cpus=1, num_gpus=0.5, max_actors=2), uses_actors=True)
    assert fig["cpu_seconds_per_1k_rows"] == 1.5
    assert fig["model_seconds_per_1k_rows"] == 1.0
    assert fig["gpu_seconds"] == 5.0            # 0.5 GPU x (1 s load + 9 s alive)
    assert fig["gpu_seconds_per_1k_rows"] == 2.5
    assert fig["rows_per_s"] == 500.0
    cpu_only = stage_figures(m, Resources(num_cpus=1), uses_actors=False)
    assert cpu_only["gpu_seconds"] == 0 and cpu_only["gpu_seconds_per_1k_rows"] == 0


def test_token_padding_is_summed_over_workers_and_shown_only_for_operators_that_count_tokens():
    base = {"stage": "clip", "seq": 1, "batches": 1, "rows_seen": 10, "rows_in": 10, "rows_out": 10, "rejected": 0,
            "seconds": 1.0, "cpu_seconds": 1.0, "model_seconds": 0.5, "init_seconds": 0.1, "actor_seconds": 2.0,
            "rejected_by_reason": {}, "sample_shards": []}
    m = merge_snapshots([{**base, "worker": "w1", "input_tokens": 300, "padded_tokens": 330},
                         {**base, "worker": "w2", "input_tokens": 100, "padded_tokens": 150}])["clip"]
    fig = stage_figures(m, Resources(num_cpus=1), uses_actors=True)
    assert (fig["input_tokens"], fig["padded_tokens"], fig["token_padding"]) == (400, 480, 1.2)
    plain = stage_figures(merge_snapshots([{**base, "worker": "w1"}])["clip"], Resources(num_cpus=1), uses_actors=False)
    assert not {"input_tokens", "padded_tokens", "token_padding"} & set(plain)


def test_an_instrumented_model_operator_reports_the_tokens_its_forwards_were_given(tiny_models):
    from operators.models.clip import ClipConfig, ClipEmbedder
    from tests.unit.test_models_clip import make_batch

    stage = InstrumentedStage(lambda: ClipEmbedder(ClipConfig(model=tiny_models["clip"], forward_batch_size=2)), "clip")
    texts = ["a cat", "a dog running on the beach", "a red chair", "two people riding bicycles in the street"]
    stage(make_batch(4, texts=texts))
    snap = stage.counters.snapshot()
    lengths = sorted((len(stage.op.tokenizer(t)["input_ids"]) for t in texts), reverse=True)
    assert snap["input_tokens"] == sum(lengths)
    assert snap["padded_tokens"] == 2 * lengths[0] + 2 * lengths[2]  # chunks of two, longest first


def test_duplicate_operator_names_get_distinct_stats_keys():
    steps = [make_step("min_side", {"min": 32}), make_step("min_side", {"min": 64})]
    assert stats_mod.stage_names(steps) == ["min_side", "min_side_2"]


def test_writer_counters_keep_a_uniform_mergeable_sample_of_shards():
    counters = StageCounters("writer", counts_rows=False)
    urls = [f"s3://b/shards/{i:05d}.tar" for i in range(100)]
    for i in range(0, 100, 10):
        counters.observe(pa.table({"x": [1]}), pa.table({"shard": urls[i:i + 10]}), 0.01, 0.01)
    from ground.layout import shard_tag

    assert counters.snapshot()["sample_shards"] == stats_mod.bottom_k_shards([shard_tag(u) for u in urls])
    assert len(counters.snapshot()["sample_shards"]) == stats_mod.SAMPLE_SHARDS


# --------------------------------------------------------------------------- report on a built output


def jpeg(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_committed_output(root, run_id: str, shards: int = 2, rows: int = 10, seed: int = 0) -> dict:
    """Lay out what a committed run leaves: data/ and rejected/ Parquet, ledger records, and the
    stats.json counters a run would have collected. Returns the stats dict."""
    rng = np.random.default_rng(seed)
    ledger = Ledger(str(root))
    meta = {MMCURATE_METADATA_KEY: json.dumps({"run_id": run_id, "models": {"clip_score": {}, "caption_len": {}}}).encode()}
    tags, totals, reasons = [], {"rows_in": 0, "kept": 0, "rejected": 0}, {}
    for s in range(shards):
        tag = f"{run_id[-3:]}s{s}-abc"
        tags.append(tag)
        n_rej = rows // 5
        kept = pa.table({
            "key": [f"{tag}-k{i}" for i in range(rows - n_rej)],
            "image": pa.array([{"bytes": jpeg("red"), "path": None}] * (rows - n_rej), type=IMAGE_TYPE),
            "text": ["a kept caption"] * (rows - n_rej),
            "reject_reason": pa.array([None] * (rows - n_rej), type=pa.string()),
            "clip_score": pa.array(rng.normal(0.3, 0.05, rows - n_rej), type=pa.float32()),
            "aesthetic_score": pa.array(rng.normal(5, 1, rows - n_rej), type=pa.float32()),
            "caption_len": pa.array(rng.integers(1, 9, rows - n_rej), type=pa.int32()),
            "clip_image_embedding": pa.array([[0.0, 1.0]] * (rows - n_rej), type=pa.list_(pa.float16(), 2)),
        }).replace_schema_metadata(meta)
        rej = pa.table({
            "key": [f"{tag}-r{i}" for i in range(n_rej)],
            "image": pa.array([{"bytes": None, "path": None}] * n_rej, type=IMAGE_TYPE),
            "text": ["tiny"] * n_rej,
            "reject_reason": ["min_side:too_small"] * (n_rej - 1) + ["decode:truncated"],
        })
        files = {}
        for kind, table in (("data", kept), ("rejected", rej)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            name = f"{tag}-00000.parquet"
            pq.write_table(table, root / kind / name)
            files[kind] = [name]
        by_reason = {"min_side:too_small": n_rej - 1, "decode:truncated": 1}
        ledger.write_json(f"{LEDGER}/{tag}.json", {"shard": f"/in/{tag}.tar", "tag": tag, "run_id": run_id,
                                                   "rows_in": rows, "kept": rows - n_rej, "rejected": n_rej,
                                                   "rejected_by_reason": by_reason, "files": files})
        totals["rows_in"] += rows
        totals["kept"] += rows - n_rej
        totals["rejected"] += n_rej
        for r, n in by_reason.items():
            reasons[r] = reasons.get(r, 0) + n
    n_in, n_decode = totals["rows_in"], reasons["decode:truncated"]
    n_small = reasons["min_side:too_small"]
    op = {"rows_seen": n_in, "batches": 2, "seconds": 0.5, "cpu_seconds": 0.4, "model_seconds": 0.0,
          "init_seconds": 0.1, "workers": 1, "num_gpus": 0.0, "gpu_seconds": 0.0, "rows_per_s": 100.0,
          "cpu_seconds_per_1k_rows": 20.0, "gpu_seconds_per_1k_rows": 0.0, "model_seconds_per_1k_rows": 0.0}
    stats = {"run_id": run_id, "pipeline": "unit", "config_hash": "abc", "rows_in": n_in, **totals,
             "shards": {"found": shards, "skipped_committed": 0, "committed": shards},
             "rejected_by_reason": reasons, "damaged_shards": {"/in/bad.tar": "truncated tar at byte 512"},
             "elapsed_s": 1.0, "rows_per_s": 20.0, "stats_complete": True, "sample_shards": tags,
             "operators": {
                 "decode": {**op, "position": 0, "rows_in": n_in, "rows_out": n_in - n_decode, "rejected": n_decode,
                            "rejected_by_reason": {"decode:truncated": n_decode}},
                 "min_side": {**op, "position": 1, "rows_in": n_in - n_decode, "rows_out": totals["kept"],
                              "rejected": n_small, "rejected_by_reason": {"min_side:too_small": n_small},
                              "workers": 2, "cpu_seconds_per_1k_rows": 3.5, "gpu_seconds_per_1k_rows": 1.25}},
             "writer": {**op, "workers": 1, "cpu_seconds_per_1k_rows": 7.0}}
    ledger.write_json(f"{RUNS}/{run_id}/stats.json", stats)
    return stats


def test_funnel_starts_with_rows_read_and_each_stage_feeds_the_next(tmp_path):
    stats = write_committed_output(tmp_path, "20260101T000000Z-aaa")
    stages = report_mod.funnel(stats)
    assert [s["stage"] for s in stages] == ["read", "decode", "min_side"]
    assert stages[0]["rows_in"] == stats["rows_in"]
    for prev, cur in zip(stages, stages[1:]):
        assert cur["rows_in"] == prev["rows_out"]
    assert stages[-1]["rows_out"] == stats["kept"]
    summed = {}
    for s in stages:
        for r, n in s["rejected_by_reason"].items():
            summed[r] = summed.get(r, 0) + n
    assert summed == stats["rejected_by_reason"]


def test_reader_rejects_show_as_the_read_stage():
    stats = {"rows_in": 10, "rejected_by_reason": {"webdataset:bad_utf8": 2, "min_side:too_small": 1},
             "operators": {"min_side": {"position": 0, "rows_in": 8, "rows_out": 7, "rejected": 1,
                                        "rejected_by_reason": {"min_side:too_small": 1}}}}
    read, op = report_mod.funnel(stats)
    assert read["rejected_by_reason"] == {"webdataset:bad_utf8": 2} and read["rows_out"] == 8 == op["rows_in"]


def test_score_columns_are_float_scores_and_numeric_model_outputs_not_embeddings():
    schema = pa.schema([("clip_score", pa.float32()), ("caption_len", pa.int32()), ("width", pa.int32()),
                        ("clip_image_embedding", pa.list_(pa.float16(), 2)), ("text_score", pa.string())],
                       metadata={MMCURATE_METADATA_KEY: json.dumps({"models": {"caption_len": {},
                                                                               "clip_image_embedding": {}}})})
    assert report_mod.score_columns(schema) == ["clip_score", "caption_len"]


def _sections(html_text: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z]+)"', html_text))


def test_report_is_self_contained_and_shows_every_section(tmp_path):
    write_committed_output(tmp_path, "20260101T000000Z-aaa", seed=1)
    stats = write_committed_output(tmp_path, "20260102T000000Z-bbb", seed=2)
    path = report_mod.build_report(str(tmp_path))  # default: the latest run
    assert path == str(tmp_path / RUNS / "20260102T000000Z-bbb" / "report.html")
    text = (tmp_path / RUNS / "20260102T000000Z-bbb" / "report.html").read_text()
    assert _sections(text) == {"summary", "shards", "funnel", "throughput", "scores", "samples", "change"}
    # Self-contained: no URL, script or stylesheet to fetch.
    assert not re.search(r"(src|href)=\"(?!data:)", text)
    assert "<script" not in text and "<link" not in text and "http" not in text
    # One histogram per score column, the funnel plot, and kept thumbnails that are real JPEGs.
    for col in ("clip_score", "aesthetic_score", "caption_len"):
        assert f'alt="{col}" src="data:image/png;base64,' in text
    assert "clip_image_embedding" not in text
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(thumbs) == report_mod.KEPT_SAMPLES
    assert Image.open(io.BytesIO(base64.b64decode(thumbs[0]))).format == "JPEG"
    # Rejected grids per reason, without thumbnails, saying why.
    assert "Rejected: min_side:too_small" in text and "Rejected: decode:truncated" in text
    assert "output.rejected_image_bytes: false" in text
    # Damaged shards listed; failed/quarantined absent from stats.json -> shown as zero.
    assert "/in/bad.tar" in text and "truncated tar at byte 512" in text
    assert re.search(r'id="failed_shards">[^<]*<span class="ok">0<', text)
    # Throughput and cost: one row per operator in plan order, then the writer, with its figures.
    table = re.search(r'<section id="throughput">.*?</section>', text, re.S).group(0)
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert [(c[0], c[1], c[5], c[6]) for c in cells] == [
        ("decode", "1", "20.000", "0.000"), ("min_side", "2", "3.500", "1.250"), ("writer", "1", "7.000", "0.000")]
    # Change against the previous run.
    assert "previous run: 20260101T000000Z-aaa" in text
    assert stats["run_id"] in text


def test_report_tolerates_failed_and_quarantined_as_lists_or_mappings(tmp_path):
    stats = write_committed_output(tmp_path, "20260101T000000Z-aaa")
    stats["failed_shards"] = [{"shard": "/in/flaky.tar", "error": "ConnectionReset"}]
    stats["quarantined_shards"] = ["/in/cursed.tar"]
    data = report_mod.ReportData(run_id=stats["run_id"], stats=stats)
    text = report_mod.render(data)
    assert "/in/flaky.tar" in text and "ConnectionReset" in text and "/in/cursed.tar" in text
    assert re.search(r'id="quarantined_shards">[^<]*<span class="bad">1<', text)


def test_the_throughput_table_shows_token_padding_for_operators_that_count_tokens(tmp_path):
    stats = write_committed_output(tmp_path, "20260101T000000Z-aaa")
    kept = stats["operators"]["min_side"]["rows_out"]
    stats["operators"]["clip"] = {"position": 2, "workers": 1, "rows_seen": stats["rows_in"], "rows_in": kept,
                                  "rows_out": kept, "rejected": 0, "rejected_by_reason": {}, "token_padding": 1.091}
    text = report_mod.render(report_mod.ReportData(run_id=stats["run_id"], stats=stats))
    table = re.search(r'<section id="throughput">.*?</section>', text, re.S).group(0)
    rows = {c[0]: c[-1] for c in (re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)[1:])}
    assert rows == {"decode": "–", "min_side": "–", "clip": "1.091", "writer": "–"}


def test_change_against_previous_run_compares_reject_rates_and_score_means():
    prev = {"run_id": "a", "rows_in": 100, "rejected": 10, "rejected_by_reason": {"min_side:too_small": 10},
            "scores": {"clip_score": {"mean": 0.25}}}
    now = {"run_id": "b", "rows_in": 200, "rejected": 50,
           "rejected_by_reason": {"min_side:too_small": 30, "decode:truncated": 20},
           "scores": {"clip_score": {"mean": 0.30}}}
    ch = report_mod.changes(now, prev)
    rates = {r["what"]: (r["now"], r["before"]) for r in ch["reject_rates"]}
    assert rates["all rejects"] == (0.25, 0.10)
    assert rates["min_side:too_small"] == (0.15, 0.10)
    assert rates["decode:truncated"] == (0.10, 0.0)
    assert ch["score_means"] == [{"what": "clip_score", "now": 0.30, "before": 0.25}]


def test_scores_in_stats_summarise_the_sampled_values(tmp_path):
    stats = write_committed_output(tmp_path, "20260101T000000Z-aaa", shards=3, rows=20)
    data = report_mod.gather(Ledger(str(tmp_path)), stats["run_id"], stats, rejected_image_bytes=False)
    kept = pa.concat_tables(pq.read_table(p, columns=["clip_score"]) for p in sorted((tmp_path / "data").glob("*.parquet")))
    summary = report_mod.score_summary(data.scores)
    assert summary["clip_score"]["count"] == kept.num_rows == 48
    assert summary["clip_score"]["mean"] == pytest.approx(float(np.mean(kept["clip_score"].to_numpy())), abs=1e-5)


def test_report_of_an_unknown_run_or_empty_output_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run has written"):
        report_mod.build_report(str(tmp_path))
    write_committed_output(tmp_path, "20260101T000000Z-aaa")
    with pytest.raises(FileNotFoundError, match="run 'nope' has no stats.json"):
        report_mod.build_report(str(tmp_path), run_id="nope")


def test_report_of_a_run_without_sample_shards_finds_its_shards_in_the_ledger(tmp_path):
    stats = write_committed_output(tmp_path, "20260101T000000Z-aaa")
    del stats["sample_shards"]  # a stats.json written before shards were sampled
    Ledger(str(tmp_path)).write_json(f"{RUNS}/{stats['run_id']}/stats.json", stats)
    # Another run's shards in the same ledger are not this run's.
    write_committed_output(tmp_path, "20260102T000000Z-bbb")
    data = report_mod.gather(Ledger(str(tmp_path)), stats["run_id"], stats, rejected_image_bytes=False)
    assert data.shards_sampled == 2
    assert all(s["key"].startswith("aaas") for s in data.kept_samples)


def test_cli_report_prints_the_path_and_fails_in_one_line_without_runs(tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    empty = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert empty.exit_code == 2
    assert empty.stderr.strip().splitlines() == [f"mmcurate: error: {tmp_path}: no run has written "
                                                 "_mmcurate/runs/<id>/stats.json"]
    write_committed_output(tmp_path, "20260101T000000Z-aaa")
    (tmp_path / RUNS / "20260102T000000Z-crashed").mkdir()  # a run that died before its stats.json
    ok = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == str(tmp_path / RUNS / "20260101T000000Z-aaa" / "report.html")
