"""Plan-time checks: operator order against the columns each one reads, and the config hash."""

from __future__ import annotations

import pytest

from pipelines.config import config_hash, validate
from ground.errors import ConfigError
from pipelines.plan import operator_steps


def _cfg(operators):
    return validate({"name": "p", "input": {"format": "webdataset", "paths": ["/x/*.tar"]},
                     "output": {"path": "/out"}, "operators": operators})


def test_operator_order_is_checked_against_the_columns_each_reads():
    with pytest.raises(ConfigError, match=r"'min_side' needs column\(s\) \['width', 'height'\]"):
        operator_steps(_cfg([{"min_side": {"min": 8}}, {"decode": {}}]))
    with pytest.raises(ConfigError, match=r"'aesthetic' needs column\(s\) \['clip_l14_image_embedding'\]"):
        operator_steps(_cfg([{"decode": {}}, {"clip": {"model": "/m/clip", "prefix": "clip_b32"}},
                             {"aesthetic": {"weights": "/m/a.safetensors",
                                            "embedding_column": "clip_l14_image_embedding"}}]))
    steps = operator_steps(_cfg([{"decode": {}}, {"clip": {"model": "/m/clip", "prefix": "clip_l14"}},
                                 {"aesthetic": {"weights": "/m/a.safetensors",
                                                "embedding_column": "clip_l14_image_embedding"}}]))
    assert [s.name for s in steps] == ["decode", "clip", "aesthetic"]
    # the model runs in actors (how many is derived at run time), decode in tasks
    assert steps[1].resources.uses_actors and not steps[0].resources.uses_actors


def test_model_storage_options_do_not_change_the_config_hash():
    a = _cfg([{"clip": {"model": "s3://b/clip", "storage_options": {"key": "A", "secret": "B"}}}])
    b = _cfg([{"clip": {"model": "s3://b/clip", "storage_options": {"profile": "other"}}}])
    c = _cfg([{"clip": {"model": "s3://b/clip-l14"}}])
    assert config_hash(a) == config_hash(b) != config_hash(c)


@pytest.mark.parametrize("address, env, local", [
    (None, None, True), (None, "local", True), ("local", None, True),
    (None, "10.0.0.5:6379", False), ("ray://head:10001", None, False), ("10.0.0.5:6379", "local", False)])
def test_the_driver_checks_local_model_paths_only_when_its_ray_is_local(monkeypatch, address, env, local):
    from pipelines.runner import runs_on_local_ray
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = validate({"name": "p", "input": {"format": "webdataset", "paths": ["/d/*.tar"]}, "output": {"path": "/o"},
                    "operators": [{"decode": {}}], "ray": {"address": address}}, source="<test>")
    assert runs_on_local_ray(cfg) is local
