"""A bad-input zoo: one WebDataset shard holding every kind of broken or awkward sample we know.

Built from :mod:`jobs.sample_data` helpers so the pictures decode like real files. Used by the
unit tests (reader, decode) and reusable by integration tests that push the zoo through Ray.

Each zoo sample has a fixed key (the constants below) so tests can name the case they check.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.sample_data import bomb_png, draw_image, encode, good_sample, write_tar

# Keys, one per case. Tar members are grouped by key, in this order.
GOOD_JPEG = "good_jpeg"
GOOD_PNG = "good_png"
GOOD_WEBP = "good_webp"
TRUNCATED_JPEG = "truncated_jpeg"
EMPTY_JPEG = "empty_jpeg"
TEXT_AS_JPEG = "text_as_jpeg"
CMYK_JPEG = "cmyk_jpeg"
PNG_16BIT = "png_16bit"
RGBA_PNG = "rgba_png"
PALETTE_PNG = "palette_png"
LA_PNG = "la_png"
EXIF_ROTATED = "exif_rotated"
BOMB_PNG = "bomb_png"
NO_IMAGE = "no_image"
NO_CAPTION = "no_caption"
BAD_UTF8_CAPTION = "bad_utf8_caption"
BAD_JSON = "bad_json"

# (width, height) of the raw pixels of the EXIF sample, and of what users see once the
# orientation tag (6: rotate 90 degrees clockwise to display) is applied: the sides swap.
EXIF_RAW_SIZE = (120, 80)
EXIF_UPRIGHT_SIZE = (80, 120)

# Kept samples that decode must re-encode as 8-bit RGB (odd mode, or EXIF rotation).
NORMALISED_KEYS = (CMYK_JPEG, PNG_16BIT, RGBA_PNG, PALETTE_PNG, LA_PNG, EXIF_ROTATED)

# What each kept sample looks like after `decode` with its default config:
# key -> (width, height, format).
KEPT_DECODED: dict[str, tuple[int, int, str]] = {
    GOOD_JPEG: (160, 120, "jpeg"),
    GOOD_PNG: (96, 64, "png"),
    GOOD_WEBP: (64, 96, "webp"),
    CMYK_JPEG: (72, 48, "jpeg"),
    PNG_16BIT: (64, 48, "png"),
    RGBA_PNG: (50, 40, "png"),
    PALETTE_PNG: (40, 30, "png"),
    LA_PNG: (30, 20, "png"),
    EXIF_ROTATED: (*EXIF_UPRIGHT_SIZE, "jpeg"),
    NO_CAPTION: (100, 100, "jpeg"),
}

# Reject reasons the reader alone writes (every other key leaves the reader with null).
READER_REASONS: dict[str, str] = {
    NO_IMAGE: "webdataset:missing_image",
    BAD_UTF8_CAPTION: "webdataset:text_not_utf8",
    BAD_JSON: "webdataset:invalid_json",
}

# Reject reasons decode adds for rows the reader let through.
DECODE_REASONS: dict[str, str] = {
    TRUNCATED_JPEG: "decode:truncated",
    EMPTY_JPEG: "decode:empty_image",
    TEXT_AS_JPEG: "decode:not_an_image",
    BOMB_PNG: "decode:too_many_pixels",
}


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    return draw_image(random.Random(seed), size)[0]


def _sample(key: str, image: tuple[str, bytes] | None, caption: bytes | None = b"a picture",
            meta: bytes | None = None) -> list[tuple[str, bytes]]:
    members = []
    if image is not None:
        members.append((f"{key}.{image[0]}", image[1]))
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append((f"{key}.json", meta if meta is not None else json.dumps({"key": key}).encode()))
    return members


def exif_rotated_jpeg() -> bytes:
    """A JPEG whose raw pixels are ``EXIF_RAW_SIZE`` with EXIF orientation 6."""
    img = _picture(9, EXIF_RAW_SIZE)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; rotate 90 degrees clockwise to display
    return encode(img, "JPEG", exif=exif.tobytes())


def zoo_members() -> list[tuple[str, bytes]]:
    """The zoo's tar members (name, bytes), grouped by key."""
    members: list[tuple[str, bytes]] = []
    jpeg = encode(_picture(1, (160, 120)))
    members += _sample(GOOD_JPEG, ("jpg", jpeg), b"a good photo")
    members += _sample(GOOD_PNG, ("png", encode(_picture(2, (96, 64)), "PNG")), b"a good drawing")
    members += _sample(GOOD_WEBP, ("webp", encode(_picture(3, (64, 96)), "WEBP", quality=80)), b"a good webp")

    big = encode(_picture(4, (200, 160)))
    members += _sample(TRUNCATED_JPEG, ("jpg", big[: len(big) // 2]), b"half a photo")
    members += _sample(EMPTY_JPEG, ("jpg", b""), b"nothing at all")
    members += _sample(TEXT_AS_JPEG, ("jpg", b"this is plain text, not a picture\n"), b"a text file")

    members += _sample(CMYK_JPEG, ("jpg", encode(_picture(5, (72, 48)).convert("CMYK"))), b"a print-shop jpeg")
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    png16 = Image.fromarray(ramp)  # mode I;16
    members += _sample(PNG_16BIT, ("png", encode(png16, "PNG")), b"a 16-bit scan")
    rgba = _picture(6, (50, 40)).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, rgba.width // 2, rgba.height))  # left half fully transparent
    rgba.putalpha(alpha)
    members += _sample(RGBA_PNG, ("png", encode(rgba, "PNG")), b"a logo with alpha")
    pal = _picture(7, (40, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    members += _sample(PALETTE_PNG, ("png", encode(pal, "PNG", transparency=0)), b"a gif-like icon")
    la = _picture(8, (30, 20)).convert("LA")
    members += _sample(LA_PNG, ("png", encode(la, "PNG")), b"a grey icon with alpha")
    members += _sample(EXIF_ROTATED, ("jpg", exif_rotated_jpeg()), b"a phone photo held upright")

    members += _sample(BOMB_PNG, ("png", bomb_png()), b"a decompression bomb")
    members += [(f"{NO_IMAGE}.txt", b"a caption whose image went missing")]
    members += _sample(NO_CAPTION, ("jpg", encode(_picture(10, (100, 100)))), caption=None)
    members += _sample(BAD_UTF8_CAPTION, ("jpg", jpeg), b"caf\xe9 au lait \xff\xfe")
    members += _sample(BAD_JSON, ("jpg", jpeg), b"a photo with a broken sidecar", meta=b'{"key": "bad_json",')
    return members


def zoo_samples() -> dict[str, dict[str, tuple[str, bytes]]]:
    """The zoo by key: extension -> (member name, bytes), for building tables by hand."""
    out: dict[str, dict[str, tuple[str, bytes]]] = {}
    for name, data in zoo_members():
        key, _, ext = name.partition(".")
        out.setdefault(key, {})[ext] = (name, data)
    return out


def make_zoo_shard(path: Path) -> dict[str, str | None]:
    """Write the zoo as one WebDataset tar at ``path``.

    Returns:
        key -> the ``reject_reason`` a pipeline of reader + ``decode`` (default config) must
        give it, or None where the row must be kept (then ``KEPT_DECODED`` has its size).
    """
    write_tar(Path(path), zoo_members())
    expected: dict[str, str | None] = {key: None for key in KEPT_DECODED}
    expected.update(READER_REASONS)
    expected.update(DECODE_REASONS)
    return expected


def make_truncated_tar(path: Path, n_samples: int = 6, cut_sample: int = 4) -> tuple[int, str, int]:
    """Write a tar of ``n_samples`` good samples cut in the middle of sample ``cut_sample``'s image data.

    Returns:
        (complete samples before the cut, key of the sample cut in half, rows the reader must emit:
        the complete ones plus the cut one as ``webdataset:truncated_sample``).
    """
    rng = random.Random(42)
    members: list[tuple[str, bytes]] = []
    for i in range(n_samples):
        members += good_sample(rng, f"s{i:04d}")
    cut_key = f"s{cut_sample:04d}"
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        cut_at = None
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            if name.startswith(cut_key + ".") and cut_at is None:
                # header is written first: the member's data starts at the current offset + 512
                cut_at = tar.offset + tarfile.BLOCKSIZE + len(data) // 2
            tar.addfile(info, io.BytesIO(data))
    Path(path).write_bytes(full.getvalue()[:cut_at])
    return cut_sample, cut_key, cut_sample + 1
