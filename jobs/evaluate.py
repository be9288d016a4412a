"""``mmcurate eval``: quality yardsticks computed from an output's stored columns (no model runs)."""

from __future__ import annotations

from typing import Optional

import typer

from jobs.clikit import fail, setup_logging, storage_options_option

eval_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Evaluate an annotated output from its stored columns.")


def _table(result) -> list[str]:
    """The recall figures as a small fixed-width table."""
    ks = [k.removeprefix("recall@") for k in result.image_to_text]
    lines = [f"{'direction':<14}" + "".join(f"{'R@' + k:>9}" for k in ks) + f"{'median rank':>14}"]
    for label, name in (("image->text", "image_to_text"), ("text->image", "text_to_image")):
        values = getattr(result, name).values()
        lines.append(f"{label:<14}" + "".join(f"{v:>9.4f}" for v in values)
                     + f"{result.median_rank[name]:>14g}")
    return lines


@eval_app.command("retrieval")
def retrieval(output: str = typer.Argument(..., help="output root (local path or s3://...) of a run"),
              sample: Optional[int] = typer.Option(None, "--sample", min=1,
                                                   help="evaluate this many rows, chosen by key hash"),
              column_prefix: str = typer.Option("clip", "--column-prefix",
                                                help="reads <prefix>_image_embedding and <prefix>_text_embedding"),
              seed: int = typer.Option(0, "--seed", help="changes which rows --sample picks"),
              block_rows: int = typer.Option(4096, "--block-rows", min=1,
                                             help="rows per block (memory: block_rows^2 floats)"),
              storage_options: Optional[str] = typer.Option(
                  None, "--storage-options", help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://..."}\''),
              log_level: str = typer.Option("WARNING", help="DEBUG, INFO, WARNING")) -> None:
    """Image->text and text->image recall@1/5/10 of the kept rows' stored embeddings."""
    setup_logging(log_level)
    from ground.errors import MmcurateError
    from pipelines.eval import RECALL_AT, evaluate_retrieval

    options = storage_options_option(storage_options)
    try:
        result, written = evaluate_retrieval(output, column_prefix, sample, seed, block_rows, options)
    except MmcurateError as exc:
        fail(str(exc))
    info = result.info
    picked = f" (sample of {info['rows_read'] - info['rows_without_both_embeddings']} by key hash, seed {seed})" \
        if sample is not None else ""
    typer.echo(f"retrieval  {output}  prefix={column_prefix}  rows={result.rows}{picked}")
    if info["rows_without_both_embeddings"]:
        typer.echo(f"skipped {info['rows_without_both_embeddings']} kept row(s) without both embeddings")
    for line in _table(result):
        typer.echo(line)
    if result.rows <= max(RECALL_AT):
        typer.echo(f"note: only {result.rows} rows; recall@k is 1 whenever k >= the number of rows")
    for url in written:
        typer.echo(f"written: {url}")


def register(app: typer.Typer) -> None:
    """Add ``mmcurate eval ...`` to the CLI."""
    app.add_typer(eval_app, name="eval")
