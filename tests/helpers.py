"""Small helpers shared by integration tests (no fakes: real configs, real Parquet reads)."""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.parquet as pq

from pipelines import config as config_mod

# The ``ray`` section of every in-process test config, and the settings the session's shared
# Ray is started with (tests/conftest.py ray_session): 2 CPUs as the house rules ask, a small
# object store, and a stall limit long enough for a loaded 2-core machine.
TEST_RAY = {"num_cpus": 2, "object_store_memory_mb": 512, "no_progress_timeout_s": 120}

BASIC_OPERATORS = [
    {"decode": {}},
    {"min_side": {"min": 32}},
    {"caption_length": {"min_words": 1}},
]


# Where every process the suite starts keeps its temporary files (tests/conftest.py sets them).
SUITE_TEMP_VARS = ("RAY_TMPDIR", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR")


def suite_temp_env() -> dict[str, str]:
    """The suite's temporary folders, for a child started with a bare environment: without them
    its Ray session folder, multiprocessing folders and torch's cache folder land in /tmp."""
    return {name: os.environ[name] for name in SUITE_TEMP_VARS}


def make_config(paths: list[str], output: str, operators: list[dict] | None = None,
                storage_options: dict | None = None, fmt: str = "webdataset", **extra: Any):
    data = {
        "name": "test",
        "input": {"format": fmt, "paths": paths, "storage_options": storage_options or {}, **extra},
        "output": {"path": output, "storage_options": storage_options or {}, "target_file_size_mb": 8},
        "operators": BASIC_OPERATORS if operators is None else operators,
        "ray": dict(TEST_RAY),
    }
    return config_mod.validate(data, source="<test>")


def read_rows(fs, root: str, kind: str) -> list[dict[str, Any]]:
    """All rows under ``root/kind`` as dicts (without image bytes), read file by file."""
    rows = []
    base = f"{root.rstrip('/')}/{kind}"
    fs.invalidate_cache()
    if not fs.exists(base):
        return rows
    for path in sorted(fs.find(base)):
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                t = pq.read_table(f)
            for r in t.drop_columns(["image"]).to_pylist():
                rows.append(r)
    return rows


def ledger_records(fs, root: str) -> list[dict[str, Any]]:
    base = f"{root.rstrip('/')}/_mmcurate/ledger"
    fs.invalidate_cache()
    out = []
    for path in sorted(fs.find(base)):
        if path.endswith(".json"):
            with fs.open(path, "rb") as f:
                out.append(json.load(f))
    return out


def row_list(fs, root: str) -> list[tuple]:
    """Every output row under ``root`` (data and rejected), sorted, duplicates kept.

    A row is (kind, shard file name, key, reject_reason, width, height, text, sha256 of the
    source image, sha256 of the stored image bytes or None). Comparing two such lists finds
    a lost row, a row written twice, and a row whose stored image changed.
    """
    import hashlib

    fs.invalidate_cache()
    out = []
    for kind in ("data", "rejected"):
        base = f"{root.rstrip('/')}/{kind}"
        if not fs.exists(base):
            continue
        for path in sorted(fs.find(base)):
            if not path.endswith(".parquet"):
                continue
            with fs.open(path, "rb") as f:
                t = pq.read_table(f)
            for r in t.to_pylist():
                stored = (r.get("image") or {}).get("bytes")
                out.append((kind, r["source_shard"].rsplit("/", 1)[-1], r["key"], r["reject_reason"],
                            r.get("width"), r.get("height"), r["text"], r.get("sha256"),
                            hashlib.sha256(stored).hexdigest() if stored is not None else None))
    return sorted(out, key=repr)


def layout_hub_cache(root, models: dict, commit: str) -> None:
    """Lay out local model folders as huggingface_hub's cache does (``models--org--name/snapshots/<commit>``).

    This fakes only the download, not the loading code.
    """
    import shutil
    from pathlib import Path

    root = Path(root)
    for repo_id, path in models.items():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(path, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)


def install_in_hub_cache(root, models: dict, commit: str, monkeypatch) -> None:
    """``layout_hub_cache`` and point this process's hub client at it, offline."""
    from huggingface_hub import constants

    from operators.models import loading

    layout_hub_cache(root, models, commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loading._provenance_cached.cache_clear()


class RecordingHub:
    """An HTTP server on 127.0.0.1 standing in for the HF hub: records every request, answers 500.

    Point ``HF_ENDPOINT`` at ``url`` with offline mode off; ``requests`` then lists every
    fetch the code under test tried.
    """

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                hub.requests.append((self.command, self.path))
                body = b"recording hub: no fetch allowed"
                self.send_response(500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
