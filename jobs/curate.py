"""``mmcurate select`` and ``mmcurate dedup``: phase 2 over an annotated output.

``CONFIG`` is either a pipeline YAML with a ``select:`` section (its ``output.path`` is the
default ``--from``) or a YAML holding just the select section. Config errors exit 2 with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import ValidationError

from ground.errors import ConfigError
from jobs.clikit import echo_counts, setup_logging


def load_select(path: Path, overrides: list[str]) -> tuple[Any, Any, str | None]:
    """(SelectConfig, RayConfig, default source path) from a pipeline or select-only YAML.

    Raises:
        ConfigError: one line naming the file, the dotted key and the bad value.
    """
    from pipelines import config as config_mod
    from pipelines.select.config import SelectConfig

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = config_mod.apply_overrides(data, overrides)
    if "input" in data or "name" in data:
        cfg = config_mod.validate(data, source=str(path))
        if cfg.select is None:
            raise ConfigError(f"{path}: no 'select:' section")
        return cfg.select, cfg.ray, cfg.output.path
    section = data.get("select", data) if set(data) <= {"select", "ray"} else data
    try:
        select_cfg = SelectConfig.model_validate(section)
        ray_cfg = config_mod.RayConfig.model_validate(data.get("ray") or {}) if "select" in data else None
    except ValidationError as exc:
        prefix = ("select",) if "select" in data else ()
        raise config_mod.config_error(exc, section, str(path), prefix=prefix) from None
    return select_cfg, ray_cfg, None


def print_select_summary(summary) -> None:
    d = summary.to_dict()
    typer.echo("")
    typer.echo(f"select {d['run_id']}  decisions={d['decision_hash']}")
    echo_counts("files", d["files"], d)


def run_select(select_cfg, ray_cfg, source: str | None, target: str | None, break_lock: bool = False,
               lock_ttl_s: float = 600.0):
    """Resolve --from/--to against the config and run phase 2 under the target's run lock."""
    from pipelines.select.runner import select

    source_options: dict[str, Any] = {}
    target_options: dict[str, Any] = {}
    if select_cfg.input is not None:
        source = source or select_cfg.input.path
        source_options = select_cfg.input.storage_options
    if select_cfg.output is not None:
        target = target or select_cfg.output.path
        target_options = select_cfg.output.storage_options
    if not source:
        raise ConfigError("select: no input: pass --from OUT (or set select.input.path)")
    if not target:
        raise ConfigError("select: no output: pass --to CURATED (or set select.output.path)")
    if source.rstrip("/") == target.rstrip("/"):
        raise ConfigError(f"select: --from and --to are the same place ({source}); curated output needs its own root")
    return select(select_cfg, source, target, source_options, target_options, ray_cfg, break_lock=break_lock,
                  lock_ttl_s=lock_ttl_s)


def run_after_annotate(cfg) -> None:
    """The phase-1 hook: ``mmcurate run`` with a ``select:`` section selects right after annotating."""
    print_select_summary(run_select(cfg.select, cfg.ray, cfg.output.path, None, lock_ttl_s=cfg.output.lock_ttl_s))


def _phase2(config: Path, source: Optional[str], target: Optional[str], overrides: list[str], log_level: str,
            rules: bool, break_lock: bool) -> None:
    """Load CONFIG's select section (without its rules for ``dedup``), run it and print the summary."""
    setup_logging(log_level)
    select_cfg, ray_cfg, default_source = load_select(config, overrides)
    if not rules:
        select_cfg = select_cfg.model_copy(update={"rules": []})
    print_select_summary(run_select(select_cfg, ray_cfg, source or default_source, target, break_lock))


CONFIG_ARG = typer.Argument(..., help="pipeline YAML with a select: section, or a select YAML")
FROM_OPT = typer.Option(None, "--from", help="annotated output (phase 1 OUT)")
TO_OPT = typer.Option(None, "--to", help="curated output root")
SET_OPT = typer.Option(None, "--set", help="override: dotted.key=YAML value")
LOG_OPT = typer.Option("INFO", help="DEBUG, INFO, WARNING")
BREAK_OPT = typer.Option(False, "--break-lock", help="take the curated output's run lock even if another run holds it")


def register(app: typer.Typer) -> None:
    @app.command("select")
    def select_cmd(config: Path = CONFIG_ARG, source: Optional[str] = FROM_OPT, target: Optional[str] = TO_OPT,
                   set_: Optional[list[str]] = SET_OPT, log_level: str = LOG_OPT,
                   break_lock: bool = BREAK_OPT) -> None:
        """Phase 2: apply rules and dedup to OUT/data, writing CURATED/data and CURATED/rejected exactly once.

        Exit 4 when another select holds CURATED's run lock."""
        _phase2(config, source, target, set_ or [], log_level, rules=True, break_lock=break_lock)

    @app.command("dedup")
    def dedup_cmd(config: Path = CONFIG_ARG, source: Optional[str] = FROM_OPT, target: Optional[str] = TO_OPT,
                  set_: Optional[list[str]] = SET_OPT, log_level: str = LOG_OPT,
                  break_lock: bool = BREAK_OPT) -> None:
        """Phase 2 with only the dedup methods of CONFIG (its rules are ignored)."""
        _phase2(config, source, target, set_ or [], log_level, rules=False, break_lock=break_lock)
