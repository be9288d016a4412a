"""The select config: rule grammar, validation, one-line errors from the CLI (exit 2, before any work)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ground.errors import ConfigError
from pipelines import config as config_mod
from pipelines.select.config import CompareRule, SelectConfig, TopFraction
from tests.integration.select_support import row, write_annotated_output

REPO = Path(__file__).resolve().parents[2]


def test_rule_grammar_parses_comparisons_lists_and_top_fractions():
    cfg = SelectConfig.model_validate({"rules": [
        "clip_score >= 0.28", "nsfw<0.5", "text_lang in [en, de]", "text_lang not in [xx]",
        {"rule": "aesthetic_score >= 5", "name": "pretty"},
        {"column": "width", "op": ">=", "value": 256},
        {"top_fraction": {"column": "clip_score", "fraction": 0.3, "by": "text_lang"}}]})
    r = cfg.rules
    assert (r[0].column, r[0].op, r[0].value) == ("clip_score", ">=", 0.28)
    assert (r[1].column, r[1].op, r[1].value) == ("nsfw", "<", 0.5)
    assert r[2].value == ["en", "de"] and r[3].op == "not in"
    assert r[4].reason == "select:pretty"
    assert isinstance(r[5], CompareRule) and r[5].reason == "select:width>=256"
    assert isinstance(r[6], TopFraction) and r[6].reason == "select:top_0.3_clip_score_by_text_lang"


@pytest.mark.parametrize("rules, expect", [
    (["clip_score >> 3"], "cannot parse rule"),
    (["text_lang in en"], "needs a non-empty list"),
    ([{"top_fraction": {"column": "clip_score", "fraction": 1.5}}], "fraction"),
    ([{"top_fraction": {"column": "clip_score", "fraction": 0.3, "bogus": 1}}], "bogus"),
])
def test_bad_rules_are_one_line_config_errors_naming_the_rule(rules, expect):
    with pytest.raises(ConfigError) as err:
        config_mod.validate({"name": "t", "input": {"format": "webdataset", "paths": ["x"]},
                             "output": {"path": "o"}, "select": {"rules": rules}}, source="p.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("p.yaml:") and expect in msg
    assert "rules[0]" in msg or "select.rules" in msg


def test_unknown_dedup_method_and_unknown_keys_are_rejected():
    for bad in ({"dedup": [{"fuzzy": {}}]}, {"dedup": [{"phash": {"max_distance": 4, "bands": 2}}]}, {"rulez": []}):
        with pytest.raises(ConfigError):
            config_mod.validate({"name": "t", "input": {"format": "webdataset", "paths": ["x"]},
                                 "output": {"path": "o"}, "select": bad}, source="p.yaml")


def test_changing_select_rules_does_not_change_the_phase1_config_hash():
    base = {"name": "t", "input": {"format": "webdataset", "paths": ["x"]}, "output": {"path": "o"}}
    a = config_mod.validate({**base, "select": {"rules": ["clip_score >= 0.2"]}})
    b = config_mod.validate({**base, "select": {"rules": ["clip_score >= 0.3"]}})
    assert config_mod.config_hash(a) == config_mod.config_hash(b)
    assert a.select.decision_hash() != b.select.decision_hash()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_rule_on_a_missing_column_fails_in_one_line_before_any_work(tmp_path):
    out = tmp_path / "out"
    write_annotated_output(str(out), {"file:///s/a.tar": [row("k1", b"x")]})
    conf = tmp_path / "sel.yaml"
    conf.write_text(yaml.safe_dump({"select": {"rules": ["aesthetic_score >= 5"]}}))
    res = _cli("select", str(conf), "--from", str(out), "--to", str(tmp_path / "cur"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mmcurate: error:")]
    assert len(lines) == 1 and "aesthetic_score" in lines[0] and "rule 'aesthetic_score>=5'" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "cur" / "data").exists()  # nothing was written


def test_cli_unparsable_rule_exits_2_naming_file_and_rule(tmp_path):
    conf = tmp_path / "sel.yaml"
    conf.write_text(yaml.safe_dump({"select": {"rules": ["clip_score >= 0.2", "clip_score ~ 3"]}}))
    res = _cli("select", str(conf), "--from", str(tmp_path / "o"), "--to", str(tmp_path / "c"), cwd=tmp_path)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("mmcurate: error:") and "sel.yaml" in err and "rules[1]" in err


def test_shuffle_auto_sorts_small_inputs_and_hashes_large_ones_and_an_explicit_choice_wins():
    from ray.data.context import ShuffleStrategy

    from pipelines.select.config import SORT_SHUFFLE_MAX_ROWS
    from pipelines.select.runner import shuffle_strategy

    assert shuffle_strategy("auto", 1_000) == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    assert shuffle_strategy("auto", SORT_SHUFFLE_MAX_ROWS) not in (ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
                                                                   ShuffleStrategy.SORT_SHUFFLE_PUSH_BASED)
    assert shuffle_strategy("hash", 10) not in (ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
                                                ShuffleStrategy.SORT_SHUFFLE_PUSH_BASED)
    assert shuffle_strategy("sort", 10**12) == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # how rows are shuffled never changes which rows survive
    assert SelectConfig(shuffle="hash").decision_hash() == SelectConfig().decision_hash()
