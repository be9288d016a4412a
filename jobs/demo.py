"""The embedded default: sample shards on local disk, the demo pipeline on local Ray."""

from __future__ import annotations

import logging
from pathlib import Path

from jobs.sample_data import make_webdataset_shards

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "pipelines" / "demo.yaml"


def run_demo(output: Path, shards: int = 4, samples: int = 32, extra_overrides: list[str] | None = None):
    """Generate shards under ``output/shards`` and run the demo config into ``output/out``."""
    from pipelines import config as config_mod
    from pipelines.runner import run

    output = Path(output).resolve()
    shard_dir = output / "shards"
    if not any(shard_dir.glob("*.tar")):
        make_webdataset_shards(shard_dir, n_shards=shards, samples_per_shard=samples)
        logger.info("generated %d sample shard(s) in %s", shards, shard_dir)
    out = output / "out"
    overrides = [f"input.paths=['{shard_dir}/*.tar']", f"output.path={out}"] + list(extra_overrides or [])
    cfg = config_mod.load(DEMO_CONFIG, overrides)
    return run(cfg), out
