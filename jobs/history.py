"""``mmcurate runs OUT``: the run history of an output, from ``OUT/_mmcurate/runs/*/stats.json``."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from jobs.clikit import fail, setup_logging


def run_history(output: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run's ``stats.json`` under ``output``, oldest first (by start time, then run id).

    Raises:
        StorageError: the output cannot be listed.
    """
    from ground.layout import RUNS
    from ground.storage import filesystem, join

    fs, root = filesystem(output, storage_options or {})
    runs_dir = join(root, RUNS)
    try:
        folders = fs.ls(runs_dir, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for folder in folders:
        name = folder if isinstance(folder, str) else folder["name"]
        try:
            with fs.open(join(name, "stats.json"), "rb") as f:
                out.append(json.load(f))
        except (FileNotFoundError, ValueError):
            continue  # a run killed before its first stats.json, or a half-written one
    return sorted(out, key=lambda d: (d.get("started_at") or "", d.get("run_id") or ""))


def _short(ts: Optional[str]) -> str:
    """``2026-11-30 21:45:41`` from ``2026-11-30T21:45:41.567Z``."""
    return (ts or "-").replace("T", " ").replace("Z", "").split(".")[0]


def format_history(runs: list[dict[str, Any]]) -> list[str]:
    """One header line and one line per run: id, start, end, status, shards, rows, rows/s."""
    lines = [f"{'run':<28} {'start':<19} {'end':<19} {'status':<9} {'commit':>6} {'damag':>5} {'fail':>4} "
             f"{'quar':>4} {'rows':>10} {'rows/s':>9}"]
    for d in runs:
        s = d.get("shards", {})
        lines.append(f"{d.get('run_id', '?'):<28} {_short(d.get('started_at')):<19} {_short(d.get('ended_at')):<19} "
                     f"{d.get('status', '?'):<9} {s.get('committed', 0):>6} {s.get('damaged', 0):>5} "
                     f"{s.get('failed', 0):>4} {s.get('quarantined', 0):>4} {d.get('rows_in', 0):>10} "
                     f"{d.get('rows_per_s', 0.0):>9.1f}")
    return lines


def register(app: typer.Typer) -> None:
    """Add ``mmcurate runs`` to the CLI."""

    @app.command()
    def runs(output: str = typer.Argument(..., help="output root (local path or URL)"),
             storage_option: Optional[list[str]] = typer.Option(
                 None, "--storage-option", help="fsspec option for the output, key=YAML value (repeatable)"),
             as_json: bool = typer.Option(False, "--json", help="print every stats.json as a JSON list")) -> None:
        """Run history of an output: id, start, end, status, shards committed/damaged/failed, rows, rows/s."""
        import yaml

        setup_logging("WARNING")
        options: dict[str, Any] = {}
        for item in storage_option or []:
            if "=" not in item:
                fail(f"--storage-option {item!r}: expected key=value")
            key, raw = item.split("=", 1)
            options[key] = yaml.safe_load(raw)
        history = run_history(output, options)
        if as_json:
            typer.echo(json.dumps(history, indent=1))
            return
        if not history:
            typer.echo(f"no runs under {output}")
            return
        for line in format_history(history):
            typer.echo(line)
