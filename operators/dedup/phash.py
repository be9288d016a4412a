"""64-bit DCT perceptual hash (pHash), Hamming distance and LSH band signatures.

The hash is the standard DCT pHash (Zauner 2010; the variant ``imagehash.phash`` computes):

1. convert to 8-bit grayscale, resize to 32x32 (Lanczos);
2. 2-D DCT-II of the 32x32 pixels;
3. keep the top-left 8x8 block of low frequencies, **DC term included**;
4. bit = 1 where the coefficient is above the median of those 64 coefficients (coefficients within
   float rounding of zero count as exactly zero, so flat and symmetric pictures hash deterministically).

Bits are packed row-major from the top-left coefficient, the first bit being the most significant,
so ``format(h & (2**64 - 1), "016x")`` reads like imagehash's hex string. The 64 bits are returned
reinterpreted as a signed int64 so that they fit an Arrow ``int64`` column; Hamming distances do not
care about the sign.

:func:`band_signatures` splits the 64 bits into ``max_distance + 1`` disjoint bands. Two hashes
within Hamming distance ``k`` differ in at most ``k`` bits, so by the pigeonhole principle at least one
of the ``k + 1`` bands is bit-for-bit equal: grouping rows by (band signature) finds every pair within
distance ``k`` without comparing all pairs; candidates are then confirmed with :func:`hamming`.

No Ray, no I/O: pure numpy and Pillow, usable from operators and pipelines alike.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from operators.image.pixels import to_rgb

HASH_BITS = 64
# 32x32 input and 8x8 low-frequency block: the sizes of the reference pHash (Zauner 2010) and
# imagehash.phash (hash_size=8, highfreq_factor=4).
DCT_INPUT_SIDE = 32
LOW_FREQ_SIDE = 8
# Band signatures keep the band index in the top byte and the band's bits in the low 56 bits, so a
# band may hold at most 56 bits; this holds for every band count >= 2. With one band (k = 0) the
# signature is the hash itself (there is no other band to collide with).
_BAND_INDEX_SHIFT = 56
# Pigeonhole needs every band to own at least one bit: k + 1 <= 64.
MAX_BAND_DISTANCE = HASH_BITS - 1


def _dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II matrix ``C`` with ``C @ x == scipy.fft.dct(x, type=2)``.

    ``C[k, j] = 2 cos(pi k (2j + 1) / (2n))``. The 2-D DCT of ``X`` is ``C @ X @ C.T``. Written with
    numpy so the hash needs no scipy; the same scaling as scipy's default (``norm=None``) keeps the
    hashes equal to the reference implementation's.
    """
    k = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(n, dtype=np.float64)[None, :]
    return 2.0 * np.cos(np.pi * k * (2.0 * j + 1.0) / (2.0 * n))


# float64 rounding in the 32x32 DCT of 0..255 pixels is about eps * |DC| * 32 < 1e-8 (DC <= 1.1e6);
# real nonzero coefficients are far larger. See phash64.
_ROUNDING_NOISE = 1e-6
# Only the first 8 rows of the 32-point DCT matrix are needed for the 8x8 low-frequency block.
_DCT_LOW = _dct_matrix(DCT_INPUT_SIDE)[:LOW_FREQ_SIDE]


def _hash_small(small: Image.Image) -> int:
    """The pHash bits of a 32x32 8-bit grayscale image (steps 2-4 of the module docstring)."""
    pixels = np.asarray(small, dtype=np.float64)
    return int(_bits_to_int64((_DCT_LOW @ pixels @ _DCT_LOW.T)[None])[0])


def _gray(img: Image.Image) -> Image.Image:
    if img.mode not in ("L", "RGB"):
        img = to_rgb(img)
    return img.convert("L")


def _full_hash(gray: Image.Image) -> int:
    # reducing_gap lets Pillow shrink large images by fast box reduction before the Lanczos pass;
    # 3.0 is Pillow's documented "indistinguishable from exact" setting, and keeps a 12 MP photo cheap.
    return _hash_small(gray.resize((DCT_INPUT_SIDE, DCT_INPUT_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0))


def phash64(img: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of ``img`` as a signed int64 (bits reinterpreted).

    Args:
        img: any PIL image; modes other than L/RGB (CMYK, palette, alpha, 16-bit) are first
            flattened to 8-bit RGB with :func:`operators.image.pixels.to_rgb` (alpha on white),
            so the hash describes what a viewer sees. The caller applies EXIF orientation.

    Returns:
        A Python int in ``[-2**63, 2**63)``; equal images give equal hashes, re-encoded, resized or
        slightly cropped copies give hashes a few bits apart.
    """
    return _full_hash(_gray(img))


# Window hashes: the pHash of WINDOW_COUNT sub-windows covering WINDOW_SIDE of each side, at the
# offsets WINDOW_OFFSETS (as a share of the side) in x and y. A copy cropped by up to 10 % of its
# area keeps 94.9-100 % of each side at an unknown offset; the full hash of such a crop lands within
# 2 % of one of these windows of the original, where a full-vs-full comparison moves 8-16 bits
# (planted-noise benchmark: crops within 6 bits of a window at 0.96, against up to 16 full-vs-full).
WINDOW_SIDE = 0.96
WINDOW_OFFSETS = (0.0, 0.02, 0.04)
WINDOW_COUNT = len(WINDOW_OFFSETS) ** 2
# Windows are cut from one BASE_SIDE x BASE_SIDE resample of the picture, where the window side and
# the offsets are whole pixels (96 and 0/2/4), and brought to 32x32 by an exact 3x3 box mean (from a
# summed-area table): one resampling pass and one batched DCT for all nine windows.
_BASE_SIDE = 100
_WINDOW_PIXELS = round(WINDOW_SIDE * _BASE_SIDE)
_WINDOW_STEP = _WINDOW_PIXELS // DCT_INPUT_SIDE
_WINDOW_ORIGINS = [round(o * _BASE_SIDE) for o in WINDOW_OFFSETS]
assert _WINDOW_STEP * DCT_INPUT_SIDE == _WINDOW_PIXELS and max(_WINDOW_ORIGINS) + _WINDOW_PIXELS <= _BASE_SIDE


def _bits_to_int64(low: np.ndarray) -> np.ndarray:
    """Median-threshold bits of ``[n, 8, 8]`` DCT blocks, packed as int64 (steps 3-4, one per block)."""
    flat = low.reshape(len(low), -1).copy()
    # Coefficients that are zero in exact arithmetic (flat or mirror-symmetric pictures) come out
    # as +-1e-12 rounding noise; left alone, that noise would set bits at random. Real coefficients
    # of 8-bit pixels are many orders of magnitude larger.
    flat[np.abs(flat) < _ROUNDING_NOISE] = 0.0
    bits = flat > np.median(flat, axis=1, keepdims=True)
    # packbits is MSB-first within each byte, so big-endian bytes put coefficient 0 at bit 63
    return np.packbits(bits, axis=1).view(">i8").reshape(-1).astype(np.int64)


def phash_with_windows(img: Image.Image) -> tuple[int, list[int]]:
    """``(phash64(img), window hashes)``: the full hash plus :data:`WINDOW_COUNT` window hashes.

    Window ``i`` is the pHash of the box at offsets ``(WINDOW_OFFSETS[i // 3], WINDOW_OFFSETS[i % 3])``
    (x, y) of side ``WINDOW_SIDE``. pHash dedup compares one row's full hash with another's windows,
    which finds crops that shift the picture (see :data:`WINDOW_SIDE`).
    """
    gray = _gray(img)
    full = _full_hash(gray)
    base = np.asarray(gray.resize((_BASE_SIDE, _BASE_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0),
                      dtype=np.float64)
    # 3x3 box sums at every pixel from one summed-area table; each window's 32x32 cells are a
    # strided slice of them
    sat = np.zeros((_BASE_SIDE + 1, _BASE_SIDE + 1))
    sat[1:, 1:] = base.cumsum(0).cumsum(1)
    k, side = _WINDOW_STEP, _WINDOW_PIXELS
    box = (sat[k:, k:] - sat[:-k, k:] - sat[k:, :-k] + sat[:-k, :-k]) / (k * k)
    stack = np.stack([box[y:y + side:k, x:x + side:k] for x in _WINDOW_ORIGINS for y in _WINDOW_ORIGINS])
    low = _DCT_LOW @ stack @ _DCT_LOW.T
    return full, _bits_to_int64(low).tolist()


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Element-wise Hamming distance between int64 hashes (broadcasting like numpy).

    Args:
        a: int64 hashes (array or scalar).
        b: int64 hashes, broadcastable against ``a``.

    Returns:
        Distances in ``0..64`` as a uint8 array of the broadcast shape.
    """
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    return np.bitwise_count(x.view(np.uint64))


def band_ranges(max_distance: int) -> list[tuple[int, int]]:
    """The ``max_distance + 1`` disjoint bit ranges ``(start, stop)`` (bit 0 = least significant).

    Bits are shared out as evenly as possible: the first ``64 % bands`` bands get one extra bit.
    """
    if not 0 <= max_distance <= MAX_BAND_DISTANCE:
        raise ValueError(f"max_distance must be in 0..{MAX_BAND_DISTANCE}, got {max_distance}")
    bands = max_distance + 1
    base, extra = divmod(HASH_BITS, bands)
    ranges, start = [], 0
    for band in range(bands):
        width = base + (1 if band < extra else 0)
        ranges.append((start, start + width))
        start += width
    return ranges


def band_signatures(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """LSH band signatures: rows within ``max_distance`` share at least one signature.

    Args:
        hashes: int64 pHashes, shape ``[n]``.
        max_distance: the Hamming distance ``k`` to find (``0..63``). Bands are ``k + 1`` disjoint
            bit ranges of ``64 // (k + 1)`` or one more bits; signature ``b`` of a row is
            ``(b << 56) | bits_of_band_b``, so equal signatures always mean the same band and the
            same bits (exact, never a hashed collision). With ``k = 0`` the single signature is the
            hash itself. Each band of ``w`` bits is shared by unrelated hashes with chance
            ``2**-w``: with ``k = 7`` bands are 8 bits wide; beyond ``k ~ 10`` nearly every pair
            becomes a candidate, so keep ``k`` small (pHash near duplicates sit within 0-10 bits).

    Returns:
        int64 array of shape ``[n, k + 1]``; column ``b`` is the signature of band ``b``. Use each
        column (or all of them flattened) as a group-by key; candidate pairs must still be
        confirmed with :func:`hamming`.
    """
    h = np.asarray(hashes, dtype=np.int64).reshape(-1)
    ranges = band_ranges(max_distance)
    if len(ranges) == 1:
        return h.reshape(-1, 1).copy()
    u = h.view(np.uint64)
    out = np.empty((h.shape[0], len(ranges)), dtype=np.uint64)
    for band, (start, stop) in enumerate(ranges):
        mask = np.uint64((1 << (stop - start)) - 1)
        out[:, band] = ((u >> np.uint64(start)) & mask) | (np.uint64(band) << np.uint64(_BAND_INDEX_SHIFT))
    return out.view(np.int64)
