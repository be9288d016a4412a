"""The embedded default: sample shards on local disk, the demo pipeline on local Ray."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from jobs.sample_data import make_webdataset_shards

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "pipelines" / "demo.yaml"
# In a wheel, conf/ is installed as the package `mmcurate_conf` (pyproject.toml).
DEMO_RESOURCE = ("mmcurate_conf", "pipelines/demo.yaml")
# Model references in demo.yaml that name a tiny model `mmcurate demo` builds.
DEMO_MODELS = "demo-models/"


def _point_at(models: dict[str, str], data: Any) -> Any:
    """Replace ``demo-models/<name>`` strings in the config with the built models' paths."""
    if isinstance(data, dict):
        return {k: _point_at(models, v) for k, v in data.items()}
    if isinstance(data, list):
        return [_point_at(models, v) for v in data]
    if isinstance(data, str) and data.startswith(DEMO_MODELS):
        return models[data[len(DEMO_MODELS):]]
    return data


def demo_config_text() -> tuple[str, str]:
    """(YAML text, where it came from) of the demo config: the checkout's conf/ or the installed copy."""
    if DEMO_CONFIG.exists():
        return DEMO_CONFIG.read_text(), str(DEMO_CONFIG)
    from importlib.resources import files

    resource = files(DEMO_RESOURCE[0])
    for part in DEMO_RESOURCE[1].split("/"):  # one part per call: a namespace package's path takes one
        resource = resource.joinpath(part)
    return resource.read_text(), f"{DEMO_RESOURCE[0]}/{DEMO_RESOURCE[1]}"


def run_demo(output: Path, shards: int = 4, samples: int = 32, extra_overrides: list[str] | None = None):
    """Generate shards under ``output/shards``, tiny random models under ``output/models``,
    and run the demo config into ``output/out``."""
    from jobs.tiny_models import build_demo_models
    from pipelines import config as config_mod
    from pipelines.runner import run

    output = Path(output).resolve()
    shard_dir = output / "shards"
    if not any(shard_dir.glob("*.tar")):
        make_webdataset_shards(shard_dir, n_shards=shards, samples_per_shard=samples)
        logger.info("generated %d sample shard(s) in %s", shards, shard_dir)
    models = build_demo_models(output / "models")
    out = output / "out"
    overrides = [f"input.paths=['{shard_dir}/*.tar']", f"output.path={out}"] + list(extra_overrides or [])
    text, source = demo_config_text()
    data = _point_at(models, yaml.safe_load(text))
    data = config_mod.apply_overrides(data, overrides)
    cfg = config_mod.validate(data, source=source)
    return run(cfg), out
