"""``mmcurate report OUT [--run ID] [--open]``: rebuild a run's report.html and print where it is."""

from __future__ import annotations

from typing import Optional

import typer

from jobs.clikit import fail, setup_logging, storage_options_option


def report(output: str = typer.Argument(..., help="output root of a pipeline (local path or s3://...)"),
           run: Optional[str] = typer.Option(None, "--run", help="run id (default: the latest run)"),
           storage_options: Optional[str] = typer.Option(
               None, "--storage-options", help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://..."}\''),
           open_: bool = typer.Option(False, "--open", help="open the report in a web browser (local outputs)"),
           log_level: str = typer.Option("WARNING", help="DEBUG, INFO, WARNING")) -> None:
    """Rebuild OUT/_mmcurate/runs/<id>/report.html from stats.json and the run's committed files."""
    setup_logging(log_level)
    from pipelines.report import build_report

    options = storage_options_option(storage_options)
    try:
        path = build_report(output, options, run)
    except FileNotFoundError as exc:
        fail(str(exc).strip("'\""))
        return
    typer.echo(path)
    if open_:
        import webbrowser

        if "://" in path:
            typer.echo("mmcurate: --open works for local outputs only", err=True)
        else:
            webbrowser.open(f"file://{path}")


def register(app: typer.Typer) -> None:
    """Add ``report`` to the ``mmcurate`` CLI."""
    app.command("report")(report)
