"""Small pieces every CLI command module shares (logging setup, one-line failures)."""

from __future__ import annotations

import json
import logging
from typing import Any

import typer

NOISY_LOGGERS = ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "filelock")


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; third-party storage clients stay at WARNING."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(msg: str, code: int = 2) -> None:
    """Print ``mmcurate: error: msg`` on stderr and exit with ``code``."""
    typer.echo(f"mmcurate: error: {msg}", err=True)
    raise typer.Exit(code)


def storage_options_option(text: str | None) -> dict[str, Any]:
    """Parse a ``--storage-options`` JSON object (exit 2 with one line when it is not one)."""
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        fail(f"--storage-options is not JSON: {exc}")
    if not isinstance(options, dict):
        fail("--storage-options must be a JSON object")
    return options


def echo_counts(label: str, units: dict[str, Any], d: dict[str, Any]) -> None:
    """The summary lines a run and a select share: units (``shards``/``files``) found, skipped and
    committed; rows in, kept, rejected with the rate; then the rejects by reason, aligned."""
    width = len(label) + 2
    typer.echo(f"{label}: {units['found']} found, {units['skipped_committed']} already committed, "
               f"{units['committed']} committed now")
    typer.echo(f"{'rows:':<{width}}{d['rows_in']} in, {d['kept']} kept, {d['rejected']} rejected "
               f"({d['rows_per_s']:.1f} rows/s over {d['elapsed_s']:.1f}s)")
    for reason, n in d["rejected_by_reason"].items():
        typer.echo(f"{'':<{width}}{n:>8}  {reason}")
