"""What the issue-7 annotations cost, measured in one run on this machine.

* pHash in the spine decode: ``phash64`` against the Pillow decode it rides on, per image size;
* the caption operators (``caption_quality``, ``text_lang``) in captions per second on one core;
* retrieval evaluation: the blockwise exact computation against a full N x N score matrix
  (same ranks; time and the size of the largest score buffer).

    python benchmarks/bench_texteval.py [--eval-rows 8192] [--dim 512] [--block-rows 1024]

Figures on a shared or busy machine are noisy; compare the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from operators.base import registry  # noqa: E402
from operators.dedup.phash import phash64, phash_with_windows  # noqa: E402
from pipelines.eval import TIE_EPS, retrieval_ranks  # noqa: E402


def best_of(fn, repeat: int = 3) -> float:
    """Fastest of ``repeat`` runs, in seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_phash(sizes=((320, 240), (1024, 768), (3000, 2000))) -> None:
    print("pHash vs the decode it rides on (per image, best of 3)")
    rng = np.random.default_rng(0)
    for w, h in sizes:
        # smooth structure plus noise: JPEG-sized like a photo, not a flat colour
        base = Image.fromarray((rng.random((h // 40 + 2, w // 40 + 2, 3)) * 255).astype(np.uint8)).resize((w, h))
        arr = np.clip(np.asarray(base, dtype=np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()

        def decode():
            img = Image.open(io.BytesIO(data))
            img.load()
            return img

        img = decode()
        t_decode = best_of(decode)
        t_hash = best_of(lambda: phash64(img))
        t_all = best_of(lambda: phash_with_windows(img))  # what decode computes: full + 9 windows
        print(f"  {w}x{h}: decode {t_decode * 1e3:7.2f} ms  phash {t_hash * 1e3:6.2f} ms  "
              f"phash/decode {t_hash / t_decode:5.2f}  phash+windows/decode {t_all / t_decode:5.2f}")


def bench_captions(n: int = 2000) -> None:
    print(f"caption operators over {n} captions (one process)")
    texts = ["A golden retriever catching a frisbee on the beach at sunset",
             "Ein roter Doppeldeckerbus fährt über die Tower Bridge", "IMG_1234.jpg", "click to enlarge",
             "buy buy buy buy cheap", "2019 Ford F-150 XLT 4x4 SuperCrew in Oxford White"] * (n // 6 + 1)
    batch = pa.table({"key": [str(i) for i in range(n)], "text": texts[:n],
                      "reject_reason": pa.nulls(n, pa.string())})
    for name in ("caption_quality", "text_lang"):
        cls = registry.get(name)
        op = cls(cls.Config())
        seconds = best_of(lambda: op(batch), repeat=2)
        print(f"  {name:<16} {n / seconds:10.0f} captions/s")


def bench_eval(rows: int, dim: int, block_rows: int) -> None:
    print(f"retrieval eval, {rows} pairs x {dim} dims")
    rng = np.random.default_rng(1)
    image = rng.normal(size=(rows, dim)).astype(np.float32)
    text = (image + 1.5 * rng.normal(size=(rows, dim))).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def full():
        scores = image @ text.T
        true = np.einsum("ij,ij->i", image, text)
        ahead = scores >= true[:, None] - TIE_EPS
        np.fill_diagonal(ahead, False)
        i2t = np.count_nonzero(ahead, axis=1)
        ahead = scores >= true[None, :] - TIE_EPS
        np.fill_diagonal(ahead, False)
        return i2t, np.count_nonzero(ahead, axis=0)

    started = time.perf_counter()
    ref = full()
    t_full = time.perf_counter() - started
    started = time.perf_counter()
    got = retrieval_ranks(image, text, block_rows=block_rows)
    t_block = time.perf_counter() - started
    same = all(np.array_equal(a, b) for a, b in zip(ref, got))
    full_mb = rows * rows * 4 / 2**20
    block_mb = min(rows, block_rows) ** 2 * 4 / 2**20
    print(f"  full matrix   {t_full:7.2f} s  largest score buffer {full_mb:9.1f} MiB")
    print(f"  blockwise     {t_block:7.2f} s  largest score buffer {block_mb:9.1f} MiB  (block {block_rows})")
    print(f"  blockwise/full time {t_block / t_full:5.2f}   memory {block_mb / full_mb:7.4f}   same ranks: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block-rows", type=int, default=1024)
    args = parser.parse_args()
    bench_phash()
    bench_captions()
    bench_eval(args.eval_rows, args.dim, args.block_rows)


if __name__ == "__main__":
    main()
