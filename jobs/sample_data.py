"""Generates real-looking sample shards for the demo and the tests.

Images are drawn with Pillow (gradients, shapes, noise) so they compress like photos and
decode like real files; captions describe what was drawn.
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 40),
          "purple": (130, 50, 160), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "stripe")


def draw_image(rng: random.Random, size: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """An RGB picture of a coloured shape on a gradient, and a caption saying so."""
    w, h = size or (rng.randint(160, 480), rng.randint(160, 480))
    c1, c2 = rng.sample(list(COLORS), 2)
    y = np.linspace(0, 1, h)[:, None, None]
    grad = (1 - y) * np.array(COLORS[c1]) + y * np.array(COLORS[c2])
    arr = np.broadcast_to(grad, (h, w, 3)).copy()
    arr += np.random.default_rng(rng.randint(0, 2**31)).normal(0, 8, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    shape, fill = rng.choice(SHAPES), rng.choice([c for c in COLORS if c not in (c1, c2)])
    x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
    x1, y1 = x0 + rng.randint(w // 4, w // 2), y0 + rng.randint(h // 4, h // 2)
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=COLORS[fill])
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=COLORS[fill])
    elif shape == "triangle":
        d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=COLORS[fill])
    else:
        for k in range(x0, x1, 12):
            d.rectangle([k, 0, k + 5, h], fill=COLORS[fill])
    caption = f"a {fill} {shape} on a {c1} and {c2} background"
    return img, caption


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}) | kw)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge image (decompression-bomb guard test)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


def good_sample(rng: random.Random, key: str, fmt: str = "JPEG") -> list[tuple[str, bytes]]:
    img, caption = draw_image(rng)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    return [(f"{key}.{ext}", encode(img, fmt)), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps({"key": key, "caption": caption, "width": img.width,
                                        "height": img.height}).encode())]


def bad_samples(rng: random.Random, prefix: str) -> dict[str, list[tuple[str, bytes]]]:
    """A few deliberately bad samples, by what is wrong with them."""
    img, caption = draw_image(rng, (200, 160))
    jpeg = encode(img)
    return {
        "truncated_jpeg": [(f"{prefix}t.jpg", jpeg[: len(jpeg) // 2]), (f"{prefix}t.txt", b"half an image")],
        "not_an_image": [(f"{prefix}n.jpg", b"this is plain text, not a picture"), (f"{prefix}n.txt", b"text")],
        "no_image": [(f"{prefix}m.txt", b"a caption whose image went missing")],
        "tiny": [(f"{prefix}s.png", encode(img.resize((12, 10)), "PNG")), (f"{prefix}s.txt", b"a tiny icon")],
    }


def make_webdataset_shards(out_dir: str | Path, n_shards: int = 4, samples_per_shard: int = 24,
                           with_bad: bool = True, seed: int = 0) -> list[Path]:
    """Write img2dataset-style tar shards ``00000.tar`` ... and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for s in range(n_shards):
        members: list[tuple[str, bytes]] = []
        for i in range(samples_per_shard):
            members += good_sample(rng, f"{s:05d}{i:04d}", fmt=rng.choice(["JPEG", "JPEG", "PNG"]))
        if with_bad:
            for group in bad_samples(rng, f"{s:05d}x").values():
                members += group
        path = out / f"{s:05d}.tar"
        write_tar(path, members)
        paths.append(path)
    return paths
