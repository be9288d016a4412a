"""Which input files a select run decides together (its plan), and how a rerun resumes it. No Ray."""

from __future__ import annotations

from ground.layout import LEDGER, shard_tag
from pipelines.ledger import Ledger
from pipelines.select.runner import _next_plan

FILES = [f"/out/data/f{i}-00000.parquet" for i in range(3)]


def _commit(ledger: Ledger, url: str, dhash: str) -> None:
    ledger.write_json(f"{LEDGER}/{shard_tag(url)}.json", {"tag": shard_tag(url), "decision_hash": dhash})


def test_a_killed_plan_is_resumed_over_exactly_the_same_files(tmp_path):
    dst = Ledger(str(tmp_path / "cur"))
    plan = _next_plan(dst, FILES, "h1", set())
    assert plan.files == FILES and plan.pending == FILES
    _commit(dst, FILES[0], "h1")  # killed after the first commit
    # A new night's file appeared meanwhile: the interrupted plan is finished first, unchanged.
    again = _next_plan(dst, FILES + ["/out/data/f9-00000.parquet"], "h1", set())
    assert again.plan_id == plan.plan_id and again.files == FILES and again.pending == FILES[1:]
    for f in FILES[1:]:
        _commit(dst, f, "h1")
    nxt = _next_plan(dst, FILES + ["/out/data/f9-00000.parquet"], "h1", {plan.plan_id})
    assert nxt.files == ["/out/data/f9-00000.parquet"]  # then the new file, on its own


def test_new_rules_redo_every_file_and_nothing_pending_means_no_plan(tmp_path):
    dst = Ledger(str(tmp_path / "cur"))
    for f in FILES:
        _commit(dst, f, "h1")
    assert _next_plan(dst, FILES, "h1", set()) is None
    retuned = _next_plan(dst, FILES, "h2", set())
    assert retuned.pending == FILES
