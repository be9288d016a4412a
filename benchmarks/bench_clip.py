"""CLIP ViT-B/32-sized throughput: bare model vs the full pipeline, and decode vs bare Pillow.

A script, not a test. Builds a CLIP with the ViT-B/32 architecture (transformers' CLIPConfig
defaults: 224 px, patch 32, 12+12 layers, 512-d projection) and random weights, writes sample
WebDataset shards, and reports in one run on the same images:

* bare model: image+text forward on preprocessed tensors (same batch size, dtype, threads);
* stages in one process: spine decode, in-actor decode + CLIP processor, tokenise, forward,
  Parquet write; their sum is the sequential bound for one pipeline on this machine;
* full pipeline: shards -> decode -> clip (Ray actor) -> Parquet via ``pipelines.runner.run``,
  end to end and in steady state (two runs, one shard and all shards: the difference cancels
  the per-run fixed cost of planning, starting the actor and loading the model);
* decode rows/s of the spine's ImageDecoder against a bare Pillow open+load loop;
* the size of a preprocessed-tensor row against its stored JPEG (the cost of a CPU
  preprocessing stage that ships tensors to the model actor instead).

    python benchmarks/bench_clip.py --images 256 --batch 32 --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_b32(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from jobs.tiny_models import _train_bpe

    vocab, merges = _train_bpe(600, end_of_word_suffix="</w>", specials=["<|startoftext|>", "<|endoftext|>"])
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    cfg = CLIPConfig(text_config=dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))  # defaults = ViT-B/32
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor().save_pretrained(path)  # 224 shortest edge, 224 centre crop, CLIP mean/std
    tok.save_pretrained(path)
    (path / "mmcurate_random_weights.json").write_text('{"random_weights": true}')
    return path


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from jobs.sample_data import make_webdataset_shards
    from operators.image.decode import DecodeConfig, ImageDecoder
    from operators.image.pixels import decode_rgb
    from operators.models.clip import ClipConfig, ClipEmbedder
    from operators.readers import make_reader
    from pipelines import config as config_mod
    from pipelines.runner import run

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_clip_"))
    model_dir = build_b32(work / "clip-b32")
    n_shards = 4
    shards = make_webdataset_shards(work / "shards", n_shards=n_shards, samples_per_shard=args.images // n_shards,
                                    with_bad=False, seed=0)
    reader = make_reader({"format": "webdataset", "paths": [str(s) for s in shards]})
    table = pa.concat_tables([b for s in reader.list_shards() for b in reader.read_blocks(s)])
    n = table.num_rows
    datas = [r["bytes"] for r in table["image"].to_pylist()]

    # decode: spine ImageDecoder vs bare Pillow
    _, t_pil = timed(lambda: [Image.open(io.BytesIO(d)).load() for d in datas])
    decoded, t_decode = timed(ImageDecoder(DecodeConfig()), table)

    cfg = ClipConfig(model=str(model_dir), dtype=args.dtype, cpu_threads=args.threads)
    op = ClipEmbedder(cfg)
    texts = table["text"].to_pylist()
    # stages inside the actor, batch by batch
    t_rgb = t_proc = t_tok = t_img = t_txt = 0.0
    pixel_batches, token_batches = [], []
    for s in range(0, n, args.batch):
        imgs, dt = timed(lambda: [decode_rgb(d) for d in datas[s:s + args.batch]])
        t_rgb += dt
        px, dt = timed(lambda: op.image_processor(images=imgs, return_tensors="pt")["pixel_values"])
        t_proc += dt
        enc, dt = timed(lambda: op.tokenizer(texts[s:s + args.batch], padding=True, truncation=True,
                                             max_length=op.max_tokens, return_tensors="pt"))
        t_tok += dt
        pixel_batches.append(px)
        token_batches.append(enc)
    # bare model on preprocessed tensors (warm-up once)
    with torch.inference_mode():
        op.model.get_image_features(pixel_values=pixel_batches[0].to(op.dtype))
        op.model.get_text_features(input_ids=token_batches[0]["input_ids"],
                                   attention_mask=token_batches[0]["attention_mask"])
        for px, enc in zip(pixel_batches, token_batches):
            _, dt = timed(op.model.get_image_features, pixel_values=px.to(op.dtype))
            t_img += dt
            _, dt = timed(op.model.get_text_features, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            t_txt += dt
    t_bare = t_img + t_txt
    out_tbl, t_op = timed(op, decoded)
    buf = io.BytesIO()
    _, t_write = timed(pq.write_table, out_tbl, buf, compression="zstd")
    stages = {"spine_decode": t_decode, "actor_decode_rgb": t_rgb, "clip_processor": t_proc, "tokenize": t_tok,
              "image_forward": t_img, "text_forward": t_txt, "parquet_write": t_write}
    t_sum = sum(stages.values())

    # full pipeline on local Ray
    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="WARNING")

    def pipeline(paths: list[Path], out: str):
        pcfg = config_mod.validate({
            "name": "bench-clip",
            "input": {"format": "webdataset", "paths": [str(p) for p in paths]},
            "output": {"path": str(work / out)},
            "operators": [{"decode": {}}, {"clip": {"model": str(model_dir), "dtype": args.dtype,
                                                    "cpu_threads": args.threads,
                                                    "resources": {"batch_size": args.batch, "num_cpus": 0.5}}}],
            "ray": {"no_progress_timeout_s": 600},
        }, source="bench")
        return run(pcfg)

    # Each run pays the same fixed costs (plan, actor start, model load). Running one shard and
    # then all shards gives the steady-state rate from the difference, which is what a long
    # job sees; the end-to-end figure of the full run is reported too.
    small = pipeline(shards[:1], "out-one-shard")
    summary = pipeline(shards, "out")
    ray.shutdown()
    assert summary.kept == n, summary.to_dict()
    steady = (summary.rows_in - small.rows_in) / (summary.elapsed_s - small.elapsed_s)
    fixed_s = small.elapsed_s - small.rows_in / steady
    jpeg_bytes = sum(len(d) for d in datas) / n
    tensor_bytes = pixel_batches[0][0].numel() * pixel_batches[0].element_size()

    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {args.threads}, {args.dtype}",
        "rows": n, "batch": args.batch,
        "bare_model_rows_per_s": round(n / t_bare, 1),
        "clip_operator_in_process_rows_per_s": round(n / t_op, 1),
        "pipeline_rows_per_s": round(summary.rows_in / summary.elapsed_s, 1),
        "pipeline_elapsed_s_incl_ray_start_and_model_load": round(summary.elapsed_s, 1),
        "pipeline_over_bare_model": round(t_bare / summary.elapsed_s, 3),
        "sum_of_stages_rows_per_s": round(n / t_sum, 1),
        "pipeline_over_sum_of_stages": round(t_sum / summary.elapsed_s, 3),
        "pipeline_steady_rows_per_s": round(steady, 1),
        "pipeline_fixed_cost_s_per_run": round(fixed_s, 1),
        "steady_pipeline_over_sum_of_stages": round(steady / (n / t_sum), 3),
        "steady_pipeline_over_bare_model": round(steady / (n / t_bare), 3),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "decode_rows_per_s": round(n / t_decode, 1), "bare_pillow_rows_per_s": round(n / t_pil, 1),
        "decode_over_pillow": round(t_pil / t_decode, 3),
        "preprocess_share_of_actor_time": round((t_rgb + t_proc + t_tok) / (t_rgb + t_proc + t_tok + t_bare), 3),
        "stored_jpeg_bytes_per_row": int(jpeg_bytes), "preprocessed_tensor_bytes_per_row": int(tensor_bytes),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
