"""pHash: robust to re-encode / resize / small crop, far for unrelated pictures; Hamming; LSH bands;
the ``phash`` column the decode operator adds."""

from __future__ import annotations

import hashlib
import io
import itertools

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ground.schema import READER_SCHEMA, hf_features, output_schema
from ground.schema import PHASH_WINDOWS_TYPE
from operators.dedup import graph
from operators.dedup.phash import (WINDOW_COUNT, band_ranges, band_signatures, hamming, phash64,
                                   phash_with_windows)
from operators.image.decode import DecodeConfig, ImageDecoder

# Near-duplicate copies of one picture stay within this many of 64 bits. Measured on scene():
# JPEG q60, 50 % resize and grayscale move 0 bits; a 5 % crop 4-10 bits (a 10 % crop 8-12, pHash
# is crop-sensitive); unrelated scenes are >= 24 bits apart, so 12 separates the two.
NEAR = 12
# Unrelated pictures differ in about half the bits (32 expected); anything below 16 would make
# a dedup threshold of NEAR unsafe.
FAR = 16


def scene(seed: int, size=(320, 240)) -> Image.Image:
    """A photo-like picture with structure at several scales: a smooth random luminance field,
    a few filled shapes and fine noise (flat colours would make every hash alike)."""
    rng = np.random.default_rng(seed)
    w, h = size
    field = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(field)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(30, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=colour)
    arr = np.asarray(field.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
    arr = arr + rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def reencoded(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def cropped(img: Image.Image, fraction: float) -> Image.Image:
    """Cut ``fraction`` of each side off in total (half from each edge)."""
    w, h = img.size
    dx, dy = int(w * fraction / 2), int(h * fraction / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def dist(a: int, b: int) -> int:
    return int(hamming(np.int64(a), np.int64(b)))


@pytest.mark.parametrize("edit", [
    pytest.param(lambda im: reencoded(im, 60), id="jpeg_q60"),
    pytest.param(lambda im: reencoded(im, 95), id="jpeg_q95"),
    pytest.param(lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR), id="resize_50"),
    pytest.param(lambda im: im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.Resampling.BICUBIC), id="resize_150"),
    pytest.param(lambda im: cropped(im, 0.05), id="crop_5pct"),
    pytest.param(lambda im: reencoded(cropped(im.resize((200, 150)), 0.04), 75), id="resize_crop_reencode"),
    pytest.param(lambda im: im.convert("L"), id="grayscale"),
])
def test_edited_copies_stay_within_a_small_distance(edit):
    for seed in range(6):
        original = scene(seed)
        assert dist(phash64(original), phash64(edit(original))) <= NEAR, seed


def test_unrelated_pictures_are_far_apart():
    hashes = [phash64(scene(seed)) for seed in range(12)]
    distances = [dist(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) >= FAR
    # Unrelated hashes behave like coin flips: the mean sits near 32 of 64 bits.
    assert 24 <= np.mean(distances) <= 40


def test_hash_is_int64_deterministic_and_ignores_alpha_on_white_and_orientation_is_the_callers():
    img = scene(3)
    h = phash64(img)
    assert isinstance(h, int) and -2**63 <= h < 2**63
    assert phash64(img.copy()) == h
    rgba = img.convert("RGBA")
    assert phash64(rgba) == h  # fully opaque alpha: same pixels, same hash
    # A rotated picture is a different picture to the hash; decode un-rotates EXIF first.
    assert dist(h, phash64(img.transpose(Image.Transpose.ROTATE_90))) > NEAR


# imagehash 4.3.2 (the reference implementation, read but not a dependency) on Pillow 13 gives
# these hex strings for the pictures below; ours must give the same 64 bits.
IMAGEHASH_PHASH = ["c4e51b9b61731b46", "c4871b987831cb7e", "c6071cd81b639db9"]


# Mirror-symmetric pictures: half the coefficients are exactly zero, a case rounding noise could flip.
IMAGEHASH_PHASH_SYMMETRIC = ["c5001b0065008c00", "c4001b0065008400", "c4001b006500c600"]


def test_bits_equal_the_reference_implementation():
    for i, expected in enumerate(IMAGEHASH_PHASH):
        img = Image.effect_mandelbrot((300 + i * 37, 256), (-2 + i * 0.1, -1.2, 1, 1.7), 100)
        img = img.convert("RGB").rotate(17 * i + 5)
        assert format(phash64(img) & (2**64 - 1), "016x") == expected
    for i, expected in enumerate(IMAGEHASH_PHASH_SYMMETRIC):
        img = Image.effect_mandelbrot((300 + i * 37, 256), (-2 + i * 0.1, -1.5, 1, 1.5), 100).convert("RGB")
        assert format(phash64(img) & (2**64 - 1), "016x") == expected


def test_flat_placeholders_hash_alike_whatever_their_colour_or_mode():
    """Blank placeholder images must not get random bits from float rounding noise."""
    hashes = {phash64(Image.new(mode, size, colour)) for mode, size, colour in [
        ("RGB", (40, 40), (255, 255, 255)), ("RGB", (300, 200), (200, 10, 10)), ("L", (64, 64), 128),
        ("CMYK", (50, 70), (0, 0, 0, 0)), ("RGBA", (33, 90), (0, 128, 255, 255))]}
    assert hashes == {-2**63}  # only the DC bit: everything else equals the median, zero
    assert phash64(Image.new("RGB", (40, 40))) == 0  # black: no bit at all


def test_hamming_is_vectorised_and_handles_the_sign_bit():
    a = np.array([0, -1, 0x0F, np.iinfo(np.int64).min], dtype=np.int64)
    b = np.array([0, 0, 0xF0, 0], dtype=np.int64)
    assert hamming(a, b).tolist() == [0, 64, 8, 1]
    # broadcasting: one hash against many
    assert hamming(a, np.int64(0)).tolist() == [0, 64, 4, 1]
    matrix = hamming(a[:, None], a[None, :])
    assert matrix.shape == (4, 4) and (np.diag(matrix) == 0).all() and (matrix == matrix.T).all()


@pytest.mark.parametrize("k", [0, 1, 3, 6, 10, 15, 63])
def test_bands_are_disjoint_and_cover_all_64_bits(k):
    ranges = band_ranges(k)
    assert len(ranges) == k + 1
    bits = [b for start, stop in ranges for b in range(start, stop)]
    assert sorted(bits) == list(range(64))


@pytest.mark.parametrize("k", [0, 2, 5, 8, 15])
def test_every_pair_within_k_shares_a_band_signature(k):
    """Pigeonhole, checked by flipping exactly k random bits of random hashes (the worst case)."""
    rng = np.random.default_rng(k)
    base = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=300, dtype=np.int64)
    flips = np.zeros(300, dtype=np.uint64)
    for i in range(300):
        for bit in rng.choice(64, size=k, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(bit)
    near = (base.view(np.uint64) ^ flips).view(np.int64)
    assert (hamming(base, near) == k).all()
    sig_a, sig_b = band_signatures(base, k), band_signatures(near, k)
    assert sig_a.shape == (300, k + 1) and sig_a.dtype == np.int64
    assert (sig_a == sig_b).any(axis=1).all()


def test_band_signatures_of_different_bands_never_collide():
    # The all-zero and all-one hashes have equal bits within each band shape; only the band index
    # in the signature keeps band 0 of one from equalling band 1 of another.
    k = 3
    sigs = band_signatures(np.array([0, -1, 0x00000000FFFF0000], dtype=np.int64), k)
    for col_a, col_b in itertools.combinations(range(k + 1), 2):
        assert not np.isin(sigs[:, col_a], sigs[:, col_b]).any()
    # A pair at distance k + 1 spread one bit per band shares no signature: the bound is tight.
    spread = sum(1 << start for start, _ in band_ranges(k))
    far = band_signatures(np.array([0, spread], dtype=np.int64), k)
    assert not (far[0] == far[1]).any()


def test_band_signatures_reject_distances_without_a_pigeonhole():
    with pytest.raises(ValueError, match="max_distance"):
        band_signatures(np.zeros(3, dtype=np.int64), 64)
    with pytest.raises(ValueError, match="max_distance"):
        band_signatures(np.zeros(3, dtype=np.int64), -1)


def _reader_table(images: dict[str, bytes | None], rejected: dict[str, str] | None = None) -> pa.Table:
    rejected = rejected or {}
    rows = [{"key": k, "source_shard": "/in/0.tar",
             "image": None if b is None else {"bytes": b, "path": f"{k}.jpg"},
             "text": "a caption", "meta": None,
             "sha256": None if b is None else hashlib.sha256(b).hexdigest(),
             "reject_reason": rejected.get(k)} for k, b in images.items()]
    return pa.Table.from_pylist(rows, schema=READER_SCHEMA)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_decode_adds_phash_of_the_upright_pixels_and_null_on_rejected_rows():
    img = scene(7)
    # The same picture stored sideways with an EXIF "rotate 90 CW" tag (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = _jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    batch = _reader_table({"plain": _jpeg(img), "exif": sideways, "broken": b"not an image",
                           "earlier": _jpeg(img), "noimage": None},
                          rejected={"earlier": "reader:missing_text"})
    out = ImageDecoder(DecodeConfig(resize_max_side=64))(batch)
    assert out.schema.field("phash").type == pa.int64()
    rows = {r["key"]: r for r in out.to_pylist()}
    assert dist(rows["plain"]["phash"], phash64(img)) <= 2
    assert dist(rows["exif"]["phash"], rows["plain"]["phash"]) <= NEAR
    for key in ("broken", "earlier", "noimage"):
        assert rows[key]["reject_reason"] is not None and rows[key]["phash"] is None, key
        assert rows[key]["phash_windows"] is None, key
    assert out.schema.field("phash_windows").type == PHASH_WINDOWS_TYPE
    assert (rows["plain"]["phash"], rows["plain"]["phash_windows"]) == phash_with_windows(
        Image.open(io.BytesIO(_jpeg(img))))


def test_phash_column_is_described_to_hf_datasets_and_ordered_with_decode_facts():
    batch = ImageDecoder(DecodeConfig())(_reader_table({"a": _jpeg(scene(1))}))
    schema = output_schema(batch.schema, {})
    assert schema.names.index("phash") == schema.names.index("format") + 1
    assert schema.names.index("phash_windows") == schema.names.index("phash") + 1
    assert hf_features(schema)["phash"] == {"dtype": "int64", "_type": "Value"}
    assert hf_features(schema)["phash_windows"] == {"_type": "List", "length": WINDOW_COUNT,
                                                    "feature": {"dtype": "int64", "_type": "Value"}}
    assert len(hf_features(schema)) == len(schema)


def test_window_hashes_bring_crops_within_the_default_distance_where_full_hashes_do_not():
    """On the planted-noise generator's crops (<= 10 % of the area at a random offset), the full
    hash of a crop is within k=6 bits of one of the original's windows (or its full hash) for every
    crop, while full-vs-full alone misses a large share; similar-but-distinct negatives stay apart."""
    from benchmarks.dedup_planted_noise import planted_samples

    samples = planted_samples(40, seed=3)
    hashed = {}
    for s in samples:
        img = Image.open(io.BytesIO(s["image"]))
        hashed[(s["group"] if s["group"] >= 0 else -1 - s["group"], s["kind"])] = phash_with_windows(img)
    k, full_hits, window_hits, negatives_close = 6, 0, 0, 0
    for b in range(40):
        (a, a_win), (c, c_win) = hashed[(b, "original")], hashed[(b, "crop")]
        full_hits += dist(a, c) <= k
        window_hits += min([dist(a, c)] + [dist(a, w) for w in c_win] + [dist(w, c) for w in a_win]) <= k
        (n, n_win) = hashed[(b, "negative")]
        negatives_close += min([dist(a, n)] + [dist(a, w) for w in n_win] + [dist(w, n) for w in a_win]) <= k
    # measured: 37 of 40 crops by full hashes alone, 40 with windows (200 bases: 145 vs 200)
    assert full_hits < window_hits == 40
    assert negatives_close <= 1


def test_window_pairs_link_full_to_window_never_window_to_window():
    h = np.array([0b1111, 0b1111, 0b0111, 0b1111, 1 << 40, 0b1111], np.int64)
    win = np.array([False, True, True, True, False, True])
    u, v = graph.phash_window_pairs(h, win, 1)
    assert sorted(zip(u.tolist(), v.tolist())) == [(0, 1), (0, 2), (0, 3), (0, 5)]
    # only windows (no full hash) in the bucket: nothing pairs, equal or not
    u, v = graph.phash_window_pairs(np.array([5, 5, 4], np.int64), np.array([True, True, True]), 1)
    assert len(u) == 0
    # a window close to (not equal to) a full hash, in a bucket of many equal windows: every one links
    h = np.array([7] + [6] * 50, np.int64)
    u, v = graph.phash_window_pairs(h, np.array([False] + [True] * 50), 1)
    assert set(v.tolist()) == set(range(1, 51)) and set(u.tolist()) == {0}
