"""Small pieces every CLI command module shares (logging setup, one-line failures)."""

from __future__ import annotations

import logging

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
