"""Real pipeline runs on local Ray leave stats.json counters and a report.html that headless
Chromium (Debian's ``chromium`` package, driven by Playwright) loads cleanly, on local disk and on
a real S3 API (moto server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.sample_data import make_webdataset_shards
from pipelines.runner import run
from pipelines.stats import collector_name
from tests.helpers import ledger_records, make_config

CHROMIUM = Path("/usr/bin/chromium")
# Flags for a sandbox-less CI container: no GPU, no background traffic, no first-run UI.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SECTIONS = {"summary": "Summary", "shards": "Shards", "funnel": "Funnel",
            "throughput": "Throughput and cost per stage", "scores": "Score histograms", "samples": "Samples",
            "change": "Change against the previous run"}
GOOD, BAD_PER_SHARD = 6, 4  # jobs.sample_data.bad_samples: truncated, not an image, no image, tiny

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Debian's chromium package (apt-get install chromium)")


def open_in_chromium(report: Path, screenshot: Path) -> dict:
    """Load the report in headless Chromium; return console errors, failed requests and what shows."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.goto(report.as_uri(), wait_until="load")
            shown = {sid: page.locator(f"section#{sid} h2").inner_text() for sid in SECTIONS
                     if page.locator(f"section#{sid} h2").is_visible()}
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
            funnel_rows = page.locator("section#funnel table tr").count()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"errors": errors, "shown": shown, "images": images, "funnel_rows": funnel_rows}


def _stats(out: Path, run_id: str) -> dict:
    return json.loads((out / "_mmcurate" / "runs" / run_id / "stats.json").read_text())


@needs_chromium
def test_two_runs_leave_counters_matching_the_ledger_and_a_report_chromium_reads(ray_session, tmp_path, tiny_models):
    make_webdataset_shards(tmp_path / "wds", n_shards=3, samples_per_shard=GOOD, seed=2)
    clip = tiny_models["clip"]
    out = tmp_path / "out"
    operators = [{"decode": {}}, {"min_side": {"min": 32}}, {"caption_length": {"min_words": 1}},
                 {"clip": {"model": str(clip), "cpu_threads": 1,
                           "resources": {"num_cpus": 0.5, "batch_size": 8, "max_actors": 1}}}]
    first = run(make_config([str(tmp_path / "wds" / "{00000..00001}.tar")], str(out), operators))
    collector = ray_session.get_actor(collector_name())
    # The second night one more shard has landed: only it is processed, and it is compared with the first.
    second = run(make_config([str(tmp_path / "wds" / "{00000..00002}.tar")], str(out), operators))
    assert second.shards_committed == 1
    # Both runs of this process counted through one collector actor (a worker process each costs
    # seconds to start), and each run's stats.json has its own rows only (below).
    assert ray_session.get_actor(collector_name())._actor_id == collector._actor_id
    assert _stats(out, first.run_id)["writer"]["rows_seen"] == 2 * (GOOD + BAD_PER_SHARD)

    stats = _stats(out, second.run_id)
    ops = stats["operators"]
    names = sorted(ops, key=lambda name: ops[name]["position"])  # stats.json keys are sorted; position is order
    assert names == ["decode", "min_side", "caption_length", "clip"]
    assert stats["stats_complete"] is True
    mine = [r for r in ledger_records(_fs(), str(out)) if r["run_id"] == second.run_id]
    rows_in = sum(r["rows_in"] for r in mine)
    assert rows_in == stats["rows_in"] == GOOD + BAD_PER_SHARD
    # Every row passes every stage; pending rows out of one operator are the rows into the next.
    assert {o["rows_seen"] for o in ops.values()} == {rows_in} == {stats["writer"]["rows_seen"]}
    for prev, cur in zip(names, names[1:]):
        assert ops[cur]["rows_in"] == ops[prev]["rows_out"], (prev, cur)
    assert ops["clip"]["rows_out"] == stats["kept"] == sum(r["kept"] for r in mine)
    # Rejects counted in the workers add up to the ledger's, reason by reason (reader rejects aside).
    ledger_reasons: dict[str, int] = {}
    for r in mine:
        for reason, n in r["rejected_by_reason"].items():
            ledger_reasons[reason] = ledger_reasons.get(reason, 0) + n
    counted = {reason: n for o in ops.values() for reason, n in o["rejected_by_reason"].items()}
    assert counted == {k: v for k, v in ledger_reasons.items() if not k.startswith("webdataset:")}
    assert counted == {"decode:truncated": 1, "decode:not_an_image": 1, "min_side:too_small": 1}
    assert ops["clip"]["model_seconds"] > 0 and ops["clip"]["workers"] == 1
    assert ops["clip"]["model_seconds_per_1k_rows"] > 0
    assert ops["clip"]["input_tokens"] > 0 and ops["clip"]["token_padding"] >= 1.0
    assert "token_padding" not in ops["decode"]
    assert all(o["cpu_seconds_per_1k_rows"] is not None and o["gpu_seconds"] == 0 for o in ops.values())
    assert stats["scores"]["clip_score"]["count"] == stats["kept"]
    assert stats["sample_shards"] == [r["tag"] for r in mine]

    # Both runs have a report; `mmcurate report OUT` rebuilds the latest and prints its path.
    runs_dir = out / "_mmcurate" / "runs"
    assert (runs_dir / first.run_id / "report.html").exists()
    report = runs_dir / second.run_id / "report.html"
    report.unlink()
    cli = CliRunner().invoke(app, ["report", str(out)])
    assert cli.exit_code == 0, cli.output
    assert cli.stdout.strip() == str(report)
    cli = CliRunner().invoke(app, ["report", str(out), "--run", first.run_id])
    assert cli.stdout.strip() == str(runs_dir / first.run_id / "report.html")
    text = report.read_text()
    assert f"previous run: {first.run_id}" in text

    seen = open_in_chromium(report, tmp_path / "report.png")
    assert seen["errors"] == []
    assert seen["shown"] == SECTIONS
    assert seen["images"] and all(ok for _, ok in seen["images"]), seen["images"]
    alts = [alt for alt, _ in seen["images"]]
    assert "funnel" in alts and "clip_score" in alts
    # header + read + four operators + kept
    assert seen["funnel_rows"] == 1 + 1 + len(ops) + 1
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _fs():
    import fsspec

    return fsspec.filesystem("file")


def test_report_on_s3_keeps_rejected_thumbnails_when_asked(ray_session, s3, tmp_path):
    fs, opts, bucket = s3
    for p in make_webdataset_shards(tmp_path / "wds", n_shards=1, samples_per_shard=GOOD, seed=4):
        fs.put_file(str(p), f"{bucket}/wds/{p.name}")
    out = f"s3://{bucket}/curated"
    cfg = make_config([f"s3://{bucket}/wds/00000.tar"], out, storage_options=opts)
    cfg.output.rejected_image_bytes = True
    summary = run(cfg)

    key = f"{bucket}/curated/_mmcurate/runs/{summary.run_id}/report.html"
    fs.invalidate_cache()
    text = fs.cat_file(key).decode()
    assert "output.rejected_image_bytes: false" not in text
    # min_side:too_small rows keep decodable bytes -> a thumbnail; decode failures say why there is none.
    small = text.split("Rejected: min_side:too_small", 1)[1].split("<h3", 1)[0]
    assert "data:image/jpeg;base64," in small
    assert re.search(r"image does not decode|no image bytes", text)
    stats = json.loads(fs.cat_file(f"{bucket}/curated/_mmcurate/runs/{summary.run_id}/stats.json"))
    assert stats["operators"]["decode"]["rows_seen"] == GOOD + BAD_PER_SHARD

    fs.rm(key)
    cli = CliRunner().invoke(app, ["report", out, "--storage-options", json.dumps(opts)])
    assert cli.exit_code == 0, cli.output
    assert cli.stdout.strip() == f"s3://{key}"
    fs.invalidate_cache()
    assert fs.exists(key)
