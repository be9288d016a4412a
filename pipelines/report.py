"""The per-run report: ``OUT/_mmcurate/runs/<id>/report.html``, one self-contained file.

Built on the driver after a run (:func:`write_run_artifacts`) or again later by
``mmcurate report`` (:func:`build_report`). Everything comes from what the run left behind:
``stats.json`` (summary, shard outcomes, operator counters), the ledger records of a sample of
the shards it committed, and those shards' published ``data/`` and ``rejected/`` Parquet files.
The data is never read whole: a uniform sample of shards (``stats.json`` ``sample_shards``),
only the score columns, at most :data:`MAX_SCORE_ROWS` rows, and a few row groups for thumbnails.

Self-contained means no external URL, script or stylesheet: thumbnails are base64 JPEG and plots
base64 PNG from matplotlib, so the file can be mailed, attached to a ticket or opened offline.
All files are written with the output's fsspec filesystem (local or object storage).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ground.layout import DATA, LEDGER, REJECTED, RUNS
from ground.schema import MMCURATE_METADATA_KEY
from ground.storage import join, to_url
from operators.base import REJECT_REASON, Resources
from pipelines import stats as stats_mod
from pipelines.ledger import Ledger
from pipelines.plan import cluster_node_shape, light_share, operator_steps, resolve_resources

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
STATS_NAME = "stats.json"
# Score values read per run for the histograms: 200k float32 values are under 1 MB per column
# and give smooth 40-bin histograms; beyond that more rows only cost read time.
MAX_SCORE_ROWS = 200_000
# Without sample_shards in stats.json (a run from before they were recorded) the report finds
# this run's shards by reading ledger records, at most this many (one small GET each).
LEDGER_SCAN_CAP = 2_000
KEPT_SAMPLES = 12          # one row of a 6-wide grid, twice
REJECTED_SAMPLES_PER_REASON = 6
MAX_REASONS_SHOWN = 20
# Row groups read for thumbnails; writers cap row groups at 1,024 rows, so this bounds the
# image bytes pulled to a few thousand rows however large the run.
MAX_SAMPLE_ROW_GROUPS = 8
THUMBNAIL_PX = 128
HISTOGRAM_BINS = 40


@dataclass
class ReportData:
    """What the HTML is made from (computed once, rendered once)."""

    run_id: str
    stats: dict[str, Any]
    previous: dict[str, Any] | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    score_rows_read: int = 0
    shards_sampled: int = 0
    rejected_image_bytes: bool = False
    kept_samples: list[dict[str, Any]] = field(default_factory=list)
    rejected_samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- run artifacts


def write_run_artifacts(cfg, run_id: str, stats: dict[str, Any]) -> dict[str, Any]:
    """End of a run: merge operator counters into ``stats.json``, write it, then ``report.html``.

    ``stats.json`` is written whatever happens to the report; a report that cannot be built is
    logged as a warning (the data is committed; ``mmcurate report`` can rebuild it). A run that
    ended in an error (``stats["status"] == "error"``, Ctrl-C included) writes ``stats.json`` with
    the counters it has, without waiting for late ones and without a report.

    Args:
        cfg: the run's ``PipelineConfig`` (its operators name and order the counters).
        stats: the run summary (``RunSummary.to_dict()``), extended in place.
    Returns:
        The stats written to ``stats.json``.
    """
    try:
        steps, writer = _run_resources(cfg)
        stats.update(stats_mod.collect(run_id, steps, int(stats.get("rows_in") or 0), writer,
                                       wait=stats.get("status") != "error"))
    except Exception as exc:  # noqa: BLE001 - counters are a view; the summary must still be written
        logger.warning("run %s: operator counters not collected (%s)", run_id, exc, exc_info=True)
    ledger = Ledger(cfg.output.path, cfg.output.storage_options)
    if stats.get("status") == "error":  # stopped (an error, Ctrl-C): record it and get out of the way
        ledger.write_json(f"{RUNS}/{run_id}/{STATS_NAME}", stats)
        return stats
    # No shards written, nothing to sample (and no reason to scan the ledger for this run's shards).
    stats.setdefault("sample_shards", [])
    data: ReportData | None = None
    try:
        data = gather(ledger, run_id, stats, cfg.output.rejected_image_bytes)
        stats["scores"] = score_summary(data.scores)
    except Exception as exc:  # noqa: BLE001 - the report is a view of committed data, never a reason to fail
        logger.warning("run %s: cannot sample scores for the report (%s)", run_id, exc, exc_info=True)
    ledger.write_json(f"{RUNS}/{run_id}/{STATS_NAME}", stats)
    if data is not None:
        try:
            ledger.write_text(f"{RUNS}/{run_id}/{REPORT_NAME}", render(data))
        except Exception as exc:  # noqa: BLE001
            logger.warning("run %s: report.html not written (%s); rebuild it with `mmcurate report`",
                           run_id, exc, exc_info=True)
    return stats


def _run_resources(cfg) -> tuple[list, Resources | None]:
    """The operator steps with the resources the run gave them (resolved for the connected cluster's
    node shape, as ``build_dataset`` does), and the writer's; unresolved when Ray is not up."""
    import sys

    steps = operator_steps(cfg)
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return steps, None
    node = cluster_node_shape()
    return resolve_resources(steps, node), Resources(num_cpus=light_share(node))


def _ls(ledger: Ledger, *parts: str) -> list[str]:
    try:
        return [p if isinstance(p, str) else p["name"] for p in ledger.fs.ls(join(ledger.root, *parts), detail=False)]
    except FileNotFoundError:
        return []


def run_ids(ledger: Ledger) -> list[str]:
    """Ids of the runs under ``_mmcurate/runs``, oldest first (ids start with a UTC timestamp).

    One LIST; whether a run wrote ``stats.json`` is checked only for the runs a caller reads.
    """
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in _ls(ledger, RUNS))


def _latest_stats(ledger: Ledger, candidates: list[str]) -> tuple[str, dict[str, Any]] | None:
    """(run id, ``stats.json``) of the newest run among ``candidates`` that has a readable one."""
    for run in reversed(candidates):
        try:
            return run, read_stats(ledger, run)
        except FileNotFoundError:
            continue
        except json.JSONDecodeError as exc:
            logger.warning("run %s: stats.json unreadable (%s)", run, exc)
    return None


def read_stats(ledger: Ledger, run_id: str) -> dict[str, Any]:
    with ledger.fs.open(join(ledger.root, RUNS, run_id, STATS_NAME), "rb") as f:
        return json.load(f)


def build_report(output_path: str, storage_options: dict[str, Any] | None = None,
                 run_id: str | None = None) -> str:
    """Rebuild ``report.html`` of ``run_id`` (default: the latest run); return its URL/path.

    Raises:
        FileNotFoundError: the output has no run with a ``stats.json`` (or not ``run_id``).
    """
    ledger = Ledger(output_path, storage_options or {})
    ledger.fs.invalidate_cache()
    if run_id is None:
        latest = _latest_stats(ledger, run_ids(ledger))
        if latest is None:
            raise FileNotFoundError(f"{output_path}: no run has written {RUNS}/<id>/{STATS_NAME}")
        run_id, stats = latest
    else:
        try:
            stats = read_stats(ledger, run_id)
        except FileNotFoundError:
            raise FileNotFoundError(f"{output_path}: run {run_id!r} has no {STATS_NAME}") from None
    data = gather(ledger, run_id, stats, _rejected_image_bytes(ledger, run_id))
    ledger.write_text(f"{RUNS}/{run_id}/{REPORT_NAME}", render(data))
    return to_url(ledger.fs, join(ledger.root, RUNS, run_id, REPORT_NAME))


def _rejected_image_bytes(ledger: Ledger, run_id: str) -> bool:
    import yaml

    try:
        with ledger.fs.open(join(ledger.root, RUNS, run_id, "config.yaml"), "rb") as f:
            cfg = yaml.safe_load(f) or {}
        return bool((cfg.get("output") or {}).get("rejected_image_bytes", False))
    except (FileNotFoundError, yaml.YAMLError):
        return False


# --------------------------------------------------------------------------- gathering


def gather(ledger: Ledger, run_id: str, stats: dict[str, Any], rejected_image_bytes: bool) -> ReportData:
    """Read what the report shows: previous run's stats, score samples and thumbnails."""
    data = ReportData(run_id=run_id, stats=stats, rejected_image_bytes=rejected_image_bytes)
    data.previous = _previous_stats(ledger, run_id)
    records = _sample_records(ledger, run_id, stats)
    data.shards_sampled = len(records)
    files = {kind: [join(ledger.root, kind, name) for r in records for name in (r.get("files") or {}).get(kind, [])]
             for kind in (DATA, REJECTED)}
    _read_scores(ledger.fs, files[DATA] + files[REJECTED], data)
    _read_samples(ledger.fs, files, data)
    return data


def _previous_stats(ledger: Ledger, run_id: str) -> dict[str, Any] | None:
    found = _latest_stats(ledger, [r for r in run_ids(ledger) if r < run_id])
    return found[1] if found else None


def _read_record(ledger: Ledger, path: str) -> dict[str, Any] | None:
    try:
        with ledger.fs.open(path, "rb") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _sample_records(ledger: Ledger, run_id: str, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Ledger records of a uniform sample of the shards this run committed."""
    tags = stats.get("sample_shards")
    if tags is None:  # older stats.json: find this run's shards in the ledger, bounded
        names = sorted(p for p in _ls(ledger, LEDGER) if p.endswith(".json"))
        mine = []
        for p in names[:LEDGER_SCAN_CAP]:
            rec = _read_record(ledger, p)
            if rec and rec.get("run_id") == run_id:
                mine.append(rec)
        keep = set(stats_mod.bottom_k_shards([r["tag"] for r in mine]))
        return [r for r in mine if r["tag"] in keep]
    out = []
    for tag in tags:
        rec = _read_record(ledger, join(ledger.root, LEDGER, f"{tag}.json"))
        # A shard written but then failed (not committed), or redone by a later run, is not this run's.
        if rec and rec.get("run_id") == run_id:
            out.append(rec)
    return out


def score_columns(schema: pa.Schema) -> list[str]:
    """Float columns ending in ``_score`` plus numeric scalar columns a model produced."""
    models: dict[str, Any] = {}
    raw = (schema.metadata or {}).get(MMCURATE_METADATA_KEY)
    if raw:
        try:
            models = json.loads(raw).get("models") or {}
        except (ValueError, AttributeError):
            models = {}
    out = []
    for f in schema:
        numeric = pa.types.is_floating(f.type) or pa.types.is_integer(f.type)
        if (f.name.endswith("_score") and pa.types.is_floating(f.type)) or (numeric and f.name in models):
            out.append(f.name)
    return out


def _read_scores(fs, paths: list[str], data: ReportData) -> None:
    values: dict[str, list[np.ndarray]] = {}
    rows = 0
    for path in paths:
        if rows >= MAX_SCORE_ROWS:
            break
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = score_columns(pf.schema_arrow)
            if not cols:
                continue
            table = pf.read(columns=cols).slice(0, MAX_SCORE_ROWS - rows)
        rows += table.num_rows
        for col in cols:
            arr = pc.drop_null(table[col]).to_numpy().astype("float64")
            values.setdefault(col, []).append(arr[np.isfinite(arr)])
    data.score_rows_read = rows
    data.scores = {c: np.concatenate(v) for c, v in sorted(values.items())}


def score_summary(scores: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """``stats.json`` ``scores``: count, mean, std, min, max of each sampled score column."""
    out = {}
    for col, v in scores.items():
        if len(v) == 0:
            continue
        out[col] = {"count": int(len(v)), "mean": round(float(v.mean()), 6), "std": round(float(v.std()), 6),
                    "min": round(float(v.min()), 6), "max": round(float(v.max()), 6)}
    return out


def _thumbnail(image_bytes: bytes | None) -> tuple[str | None, str | None]:
    """(base64 JPEG thumbnail, None) or (None, why there is none)."""
    if not image_bytes:
        return None, "no image bytes"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # JPEG: decode at reduced size
            im = im.convert("RGB")
            im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode("ascii"), None
    except Exception as exc:  # noqa: BLE001 - rejected rows are often undecodable on purpose
        return None, f"image does not decode ({exc.__class__.__name__})"


def _sample_row(row: dict[str, Any], no_bytes_reason: str | None) -> dict[str, Any]:
    image = row.get("image") or {}
    thumb, why = _thumbnail(image.get("bytes"))
    if thumb is None and not image.get("bytes") and no_bytes_reason:
        why = no_bytes_reason
    return {"key": row.get("key"), "text": row.get("text"), "reject_reason": row.get(REJECT_REASON),
            "thumbnail": thumb, "why_no_thumbnail": why}


def _read_samples(fs, files: dict[str, list[str]], data: ReportData) -> None:
    cols = ["key", "text", "image", REJECT_REASON]
    budget = MAX_SAMPLE_ROW_GROUPS
    for path in files[DATA]:
        if len(data.kept_samples) >= KEPT_SAMPLES or budget <= 0:
            break
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                if len(data.kept_samples) >= KEPT_SAMPLES or budget <= 0:
                    break
                budget -= 1
                rows = pf.read_row_group(rg, columns=[c for c in cols if c in pf.schema_arrow.names])
                for row in rows.slice(0, KEPT_SAMPLES - len(data.kept_samples)).to_pylist():
                    data.kept_samples.append(_sample_row(row, None))
    no_bytes = None if data.rejected_image_bytes else \
        "image bytes not kept for rejected rows (output.rejected_image_bytes: false)"
    budget = MAX_SAMPLE_ROW_GROUPS
    by_reason = data.rejected_samples
    for path in files[REJECTED]:
        if budget <= 0:
            break
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                if budget <= 0:
                    break
                # Read the reasons first, image bytes only for rows a grid still needs.
                reasons = pf.read_row_group(rg, columns=[REJECT_REASON])[REJECT_REASON].to_pylist()
                wanted: Counter = Counter({r: len(v) for r, v in by_reason.items()})
                want = []
                for i, reason in enumerate(reasons):
                    if reason not in wanted and len(wanted) >= MAX_REASONS_SHOWN:
                        continue
                    if wanted[reason] < REJECTED_SAMPLES_PER_REASON:
                        wanted[reason] += 1
                        want.append(i)
                if not want:
                    continue
                budget -= 1
                rows = pf.read_row_group(rg, columns=[c for c in cols if c in pf.schema_arrow.names])
                for row in rows.take(pa.array(want)).to_pylist():
                    by_reason.setdefault(row[REJECT_REASON], []).append(_sample_row(row, no_bytes))


# --------------------------------------------------------------------------- figures


def funnel(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Stages in order with rows in, out and rejected by reason, starting with the reader.

    The reader's line comes from the run summary: rows read, and the reasons it set itself
    (everything the operators did not reject). Empty when the run has no operator counters.
    """
    ops = stats.get("operators") or {}
    if not ops:
        return []
    stages = sorted(ops.items(), key=lambda kv: kv[1].get("position", 0))
    op_reasons: Counter = Counter()
    for _, op in stages:
        op_reasons.update(op.get("rejected_by_reason") or {})
    read_reasons = Counter(stats.get("rejected_by_reason") or {})
    read_reasons.subtract(op_reasons)
    read_reasons = Counter({k: v for k, v in read_reasons.items() if v > 0})
    rows_read = int(stats.get("rows_in") or 0)
    rows = [{"stage": "read", "rows_in": rows_read, "rows_out": rows_read - sum(read_reasons.values()),
             "rejected": sum(read_reasons.values()), "rejected_by_reason": dict(sorted(read_reasons.items()))}]
    for name, op in stages:
        rows.append({"stage": name, "rows_in": op["rows_in"], "rows_out": op["rows_out"],
                     "rejected": op["rejected"], "rejected_by_reason": op.get("rejected_by_reason") or {}})
    return rows


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def funnel_png(stages: list[dict[str, Any]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.45 * len(stages) + 1.0))
    ax = fig.add_subplot()
    names = [s["stage"] for s in stages][::-1]
    kept = [s["rows_out"] for s in stages][::-1]
    rej = [s["rejected"] for s in stages][::-1]
    ax.barh(names, kept, color="#3b7dd8", label="passed")
    ax.barh(names, rej, left=kept, color="#d8573b", label="rejected here")
    ax.set_xlabel("rows")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("rows into each stage")
    return _png(fig)


def histogram_png(column: str, values: np.ndarray) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.6))
    ax = fig.add_subplot()
    ax.hist(values, bins=HISTOGRAM_BINS, color="#3b7dd8")
    ax.set_title(column, fontsize=10)
    ax.set_xlabel("value", fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def changes(stats: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """Reject rates (overall and per reason) and score means, this run against the previous."""
    if not previous:
        return {"reject_rates": [], "score_means": []}

    def rate(s: dict[str, Any], n: int | None) -> float | None:
        rows = s.get("rows_in") or 0
        return None if not rows or n is None else n / rows

    reasons = sorted(set(stats.get("rejected_by_reason") or {}) | set(previous.get("rejected_by_reason") or {}))
    rates = [{"what": "all rejects", "now": rate(stats, stats.get("rejected", 0)),
              "before": rate(previous, previous.get("rejected", 0))}]
    for r in reasons:
        rates.append({"what": r, "now": rate(stats, (stats.get("rejected_by_reason") or {}).get(r, 0)),
                      "before": rate(previous, (previous.get("rejected_by_reason") or {}).get(r, 0))})
    now_scores, before_scores = stats.get("scores") or {}, previous.get("scores") or {}
    means = [{"what": c, "now": (now_scores.get(c) or {}).get("mean"), "before": (before_scores.get(c) or {}).get("mean")}
             for c in sorted(set(now_scores) | set(before_scores))]
    return {"reject_rates": rates, "score_means": means}


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:16px 0 6px} .sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .bad{color:#b3261e;font-weight:600} .ok{color:#1e7b34}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px} .grid{display:flex;flex-wrap:wrap;gap:8px}
figure.s{margin:0;width:140px;font-size:11px;word-break:break-all} figure.s img,.noimg{width:128px;height:128px;object-fit:contain;background:#f4f4f4;display:block}
.noimg{display:flex;align-items:center;justify-content:center;text-align:center;color:#888;font-size:10px;padding:4px;box-sizing:border-box}
.hists{display:flex;flex-wrap:wrap;gap:8px} .note{background:#fff7e0;border:1px solid #f0d890;padding:6px 10px;font-size:13px}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _n(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _table(headers: list[str], rows: list[list[str]], left: int = 1, text_last: bool = False) -> str:
    """An HTML table; the first ``left`` columns (and the last if ``text_last``) are left-aligned text."""
    def is_text(i: int) -> bool:
        return i < left or (text_last and i == len(headers) - 1)

    head = "".join(f'<th class="l">{h}</th>' if is_text(i) else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if is_text(i) else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _shard_list(value: Any) -> list[tuple[str, str]]:
    """Shard outcome lists come as {shard: message} or [shard | {shard, ...}] (tolerate both)."""
    if not value:
        return []
    if isinstance(value, dict):
        return [(str(k), str(v)) for k, v in value.items()]
    out = []
    for item in value:
        if isinstance(item, dict):
            shard = item.get("shard") or item.get("url") or json.dumps(item)
            out.append((str(shard), str(item.get("error") or item.get("reason") or item.get("message") or "")))
        else:
            out.append((str(item), ""))
    return out


def _sample_grid(samples: list[dict[str, Any]]) -> str:
    cells = []
    for s in samples:
        if s["thumbnail"]:
            img = f'<img alt="{_e(s["key"])}" src="data:image/jpeg;base64,{s["thumbnail"]}">'
        else:
            img = f'<div class="noimg">{_e(s["why_no_thumbnail"])}</div>'
        text = (s["text"] or "")[:80]
        cells.append(f'<figure class="s">{img}<figcaption><b>{_e(s["key"])}</b><br>{_e(text)}</figcaption></figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def render(data: ReportData) -> str:
    """The report as one HTML string (no external resources)."""
    st = data.stats
    parts: list[str] = []
    shards = st.get("shards") or {}
    parts.append(f"<h1>mmcurate run {_e(data.run_id)}</h1><div class='sub'>pipeline <b>{_e(st.get('pipeline'))}</b>"
                 f" · config {_e(st.get('config_hash'))} · mmcurate {_e(st.get('mmcurate_version'))}</div>")
    rows_in, kept, rejected = st.get("rows_in") or 0, st.get("kept") or 0, st.get("rejected") or 0
    cards = [("rows in", _n(rows_in)), ("kept", _n(kept)), ("rejected", _n(rejected)),
             ("reject rate", _pct(rejected / rows_in if rows_in else None)),
             ("shards committed", _n(shards.get("committed"))), ("elapsed", f"{_n(st.get('elapsed_s'), 1)} s"),
             ("rows/s", _n(st.get("rows_per_s"), 1))]
    parts.append('<section id="summary"><h2>Summary</h2><div class="cards">' +
                 "".join(f'<div class="card">{k}<b>{v}</b></div>' for k, v in cards) + "</div>")
    if st.get("operators") and not st.get("stats_complete", True):
        parts.append('<p class="note">Operator counters are incomplete: some workers\' last counts did not reach '
                     'the collector in time. Row totals from the ledger are exact.</p>')
    parts.append("</section>")

    # Shards
    parts.append('<section id="shards"><h2>Shards</h2>')
    parts.append(_table(["found", "already committed (skipped)", "committed now"],
                        [[_n(shards.get("found")), _n(shards.get("skipped_committed")), _n(shards.get("committed"))]],
                        left=0))
    for key, title in (("damaged_shards", "Damaged (committed with their damage recorded)"),
                       ("failed_shards", "Failed (not committed; retried next run)"),
                       ("quarantined_shards", "Quarantined (skipped until --retry-quarantined)")):
        items = _shard_list(st.get(key))
        cls = "bad" if items else "ok"
        parts.append(f'<h3 id="{key}">{title}: <span class="{cls}">{len(items)}</span></h3>')
        if items:
            parts.append(_table(["shard", "why"], [[_e(s), _e(m)] for s, m in items], left=2))
    parts.append("</section>")

    # Funnel
    stages = funnel(st)
    parts.append('<section id="funnel"><h2>Funnel</h2>')
    if stages:
        parts.append('<p class="sub">Rows in = rows no earlier stage rejected; rejected = rows this stage rejected '
                     '(rejected rows travel on to rejected/ but get no more work).</p>')
        parts.append(f'<img alt="funnel" src="data:image/png;base64,{funnel_png(stages)}">')
        table_rows = []
        for s in stages:
            reasons = "<br>".join(f"{_e(r)}: {_n(n)}" for r, n in s["rejected_by_reason"].items())
            table_rows.append([_e(s["stage"]), _n(s["rows_in"]), _n(s["rows_out"]), _n(s["rejected"]), reasons])
        table_rows.append(["<b>kept</b>", "", _n(kept), "", ""])
        parts.append(_table(["stage", "rows in", "rows out", "rejected", "by reason"], table_rows, text_last=True))
    else:
        parts.append("<p>No operator counters for this run (nothing was pending, or it ran before they existed).</p>")
        if st.get("rejected_by_reason"):
            parts.append(_table(["reason", "rows"], [[_e(r), _n(n)] for r, n in st["rejected_by_reason"].items()]))
    parts.append("</section>")

    # Throughput and cost
    parts.append('<section id="throughput"><h2>Throughput and cost per stage</h2>')
    ops = sorted((st.get("operators") or {}).items(), key=lambda kv: kv[1].get("position", 0))
    if st.get("writer"):
        ops.append(("writer", st["writer"]))
    if ops:
        parts.append('<p class="sub">rows/s: rows through the stage per second of work of one worker. '
                     'Per 1,000 rows: every row that passed through the stage. GPU-seconds: num_gpus x '
                     'each actor\'s life from load to its last batch (tasks: x seconds in the call). Token '
                     'padding: text positions computed per real token (1.000: no padding).</p>')
        parts.append(_table(
            ["stage", "workers", "rows", "s in call", "rows/s", "CPU-s / 1k rows", "GPU-s / 1k rows",
             "model s / 1k rows", "load s", "token padding"],
            [[_e(n), _n(o.get("workers")), _n(o.get("rows_seen")), _n(o.get("seconds"), 2), _n(o.get("rows_per_s"), 1),
              _n(o.get("cpu_seconds_per_1k_rows")), _n(o.get("gpu_seconds_per_1k_rows")),
              _n(o.get("model_seconds_per_1k_rows")), _n(o.get("init_seconds"), 2), _n(o.get("token_padding"))]
             for n, o in ops]))
    else:
        parts.append("<p>No per-stage timers for this run.</p>")
    parts.append("</section>")

    # Scores
    parts.append('<section id="scores"><h2>Score histograms</h2>')
    if data.scores:
        parts.append(f'<p class="sub">Non-null values among {_n(data.score_rows_read)} rows (kept and rejected) '
                     f'read from {data.shards_sampled} sampled shard(s) of this run; rows rejected before a '
                     'model ran have no score.</p><div class="hists">')
        for col, values in data.scores.items():
            if len(values):
                parts.append(f'<img alt="{_e(col)}" src="data:image/png;base64,{histogram_png(col, values)}">')
        parts.append("</div>")
    else:
        parts.append("<p>No score columns in this run's output.</p>")
    parts.append("</section>")

    # Samples
    parts.append('<section id="samples"><h2>Samples</h2><h3>Kept</h3>')
    parts.append(_sample_grid(data.kept_samples) if data.kept_samples else "<p>No kept rows sampled.</p>")
    if data.rejected_samples:
        if not data.rejected_image_bytes:
            parts.append('<p class="note">Rejected rows have no thumbnails: this run kept no image bytes for them '
                         '(set <code>output.rejected_image_bytes: true</code> to keep them).</p>')
        for reason, samples in sorted(data.rejected_samples.items()):
            parts.append(f'<h3>Rejected: {_e(reason)}</h3>{_sample_grid(samples)}')
    else:
        parts.append("<h3>Rejected</h3><p>No rejected rows sampled.</p>")
    parts.append("</section>")

    # Change against previous run
    parts.append('<section id="change"><h2>Change against the previous run</h2>')
    if data.previous:
        ch = changes(st, data.previous)
        parts.append(f'<p class="sub">previous run: {_e(data.previous.get("run_id"))}</p>')

        def delta(now, before, pct):
            if now is None or before is None:
                return "–"
            d = now - before
            return f"{d * 100:+.2f} pp" if pct else f"{d:+.4f}"

        parts.append("<h3>Reject rates</h3>" + _table(["", "this run", "previous", "change"], [
            [_e(r["what"]), _pct(r["now"]), _pct(r["before"]), delta(r["now"], r["before"], True)]
            for r in ch["reject_rates"]]))
        if ch["score_means"]:
            parts.append("<h3>Score means</h3>" + _table(["", "this run", "previous", "change"], [
                [_e(r["what"]), _n(r["now"], 4), _n(r["before"], 4), delta(r["now"], r["before"], False)]
                for r in ch["score_means"]]))
    else:
        parts.append("<p>No earlier run of this output to compare with.</p>")
    parts.append("</section>")

    title = f"mmcurate run {_e(data.run_id)}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
