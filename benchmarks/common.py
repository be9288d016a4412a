"""Shared pieces of the speed benchmarks: shards, models, the bare loop, timed CLI runs.

Every figure is a whole process timed from the outside (``subprocess`` + ``time.perf_counter``),
so interpreter start, imports, model load and Ray start-up count for the pipeline and the bare
loop alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), RAY_DATA_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1")


def make_shards(out: Path, n_shards: int, per_shard: int) -> list[Path]:
    """Clean img2dataset-style shards (JPEG and PNG photos-like drawings, 160..480 px, captions)."""
    from jobs.sample_data import make_webdataset_shards

    return make_webdataset_shards(out, n_shards=n_shards, samples_per_shard=per_shard, with_bad=False)


# Ray gives its raylet a fixed 30 s to register; on an overloaded machine that start can fail
# before any work. Such a run is repeated (and said so); its time never counts.
RAY_START_FAILURE = "timed out during startup"
RAY_START_ATTEMPTS = 3


def timed_run(cmd: list[str], cwd: Path | None = None) -> float:
    """Seconds a whole subprocess takes; raises with its stderr tail if it fails."""
    for attempt in range(RAY_START_ATTEMPTS):
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
        took = time.perf_counter() - started
        if proc.returncode == 0:
            return took
        if RAY_START_FAILURE not in proc.stderr or attempt == RAY_START_ATTEMPTS - 1:
            break
        print(f"  (Ray did not start within its 30 s on this machine; run repeated, {took:.0f}s not counted)",
              flush=True)
    raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def pipeline_cmd(work: Path, name: str, shards: list[Path], model: str, operators: list[str],
                 clip_extra: dict | None = None) -> list[str]:
    """``mmcurate run`` on ``shards`` into a fresh output, every resource at its default."""
    import yaml

    ops = []
    for op in operators:
        ops.append({"decode": {}} if op == "decode" else {"clip": {"model": model, **(clip_extra or {})}})
    cfg = {"name": name, "input": {"format": "webdataset", "paths": [str(s) for s in shards]},
           "output": {"path": str(work / "out" / f"{name}-{time.time_ns()}")}, "operators": ops}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "jobs.cli", "run", str(path), "--log-level", "WARNING"]


def bare_cmd(model: str, shards: list[Path], out: Path, threads: int = 2, batch: int = 32,
             images_only: bool = False) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--model", model, "--out", str(out),
            "--threads", str(threads), "--batch", str(batch), *(["--images-only"] if images_only else []),
            *[str(s) for s in shards]]


def bare_loop(model: str, shards: list[str], out: str, threads: int, batch: int, images_only: bool) -> int:
    """The single-process reference: tar -> Pillow -> CLIPProcessor -> forward -> Parquet.

    Returns the rows written. ``images_only`` skips the text tower (the overlap benchmark).
    """
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image, ImageOps
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from operators.models.base import embedding_array, processor_backend

    torch.set_num_threads(threads)
    model_obj = AutoModel.from_pretrained(model).eval()
    proc = AutoImageProcessor.from_pretrained(model, backend=processor_backend())
    tok = AutoTokenizer.from_pretrained(model)
    dim = model_obj.config.projection_dim
    Path(out).mkdir(parents=True, exist_ok=True)
    rows = 0
    for n, shard in enumerate(shards):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        keys = [k for k, v in samples.items() if "jpg" in v or "png" in v]
        img_vecs, txt_vecs, scores = {}, {}, []
        for start in range(0, len(keys), batch):
            chunk = keys[start:start + batch]
            images = [ImageOps.exif_transpose(Image.open(io.BytesIO(samples[k].get("jpg") or samples[k]["png"])))
                      .convert("RGB") for k in chunk]
            texts = [samples[k].get("txt", b"").decode() for k in chunk]
            px = proc(images=images, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                iv = model_obj.get_image_features(pixel_values=px)
                iv = torch.nn.functional.normalize((iv if hasattr(iv, "shape") else iv.pooler_output), dim=-1)
                if not images_only:
                    enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
                    tv = model_obj.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                    tv = torch.nn.functional.normalize((tv if hasattr(tv, "shape") else tv.pooler_output), dim=-1)
            for j, k in enumerate(range(start, start + len(chunk))):
                img_vecs[k] = iv[j].numpy()
                if not images_only:
                    txt_vecs[k] = tv[j].numpy()
                    scores.append(float(np.dot(img_vecs[k], txt_vecs[k])))
        table = pa.table({"key": keys, "clip_image_embedding": embedding_array(len(keys), img_vecs, dim),
                          "clip_text_embedding": embedding_array(len(keys), txt_vecs, dim),
                          "clip_score": pa.array(scores or [None] * len(keys), type=pa.float32())})
        pq.write_table(table, f"{out}/{n:05d}.parquet")
        rows += len(keys)
    return rows


def ratio_line(label: str, bare: float, pipe: float) -> str:
    return f"{label}: bare {bare:.1f}s  pipeline {pipe:.1f}s  throughput ratio {bare / pipe:.3f}"


def main() -> None:
    """Entry point of the bare-loop subprocess."""
    import argparse

    ap = argparse.ArgumentParser(description=bare_loop.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images-only", action="store_true")
    ap.add_argument("shards", nargs="+")
    a = ap.parse_args()
    rows = bare_loop(a.model, a.shards, a.out, a.threads, a.batch, a.images_only)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
