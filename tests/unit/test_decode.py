"""ImageDecoder on hand-built reader tables: the zoo, normalisation, EXIF, resizing, bombs."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.sample_data import bomb_png, draw_image, encode
from operators.image.decode import DecodeConfig, ImageDecoder
from ground.schema import READER_SCHEMA
from tests import zoo


def table(rows: list[dict]) -> pa.Table:
    """A reader-shaped table; each row gives key and image bytes (None: no image) and optionally more."""
    cols: dict[str, list] = {f.name: [] for f in READER_SCHEMA}
    for r in rows:
        data = r.get("bytes")
        cols["key"].append(r["key"])
        cols["source_shard"].append("/data/00000.tar")
        cols["image"].append(None if data is None else {"bytes": data, "path": r.get("path", f"{r['key']}.jpg")})
        cols["text"].append(r.get("text", "a caption"))
        cols["meta"].append(None)
        cols["sha256"].append(None if data is None else hashlib.sha256(data).hexdigest())
        cols["reject_reason"].append(r.get("reject_reason"))
    return pa.table(cols, schema=READER_SCHEMA)


def zoo_table() -> pa.Table:
    rows = []
    for key, members in zoo.zoo_samples().items():
        image = next(((name, data) for ext, (name, data) in members.items() if ext not in ("txt", "json")), None)
        rows.append({"key": key, "bytes": None if image is None else image[1],
                     "path": None if image is None else image[0],
                     "reject_reason": zoo.READER_REASONS.get(key)})
    return table(rows)


def decode(batch: pa.Table, **config) -> dict[str, dict]:
    out = ImageDecoder(DecodeConfig(**config))(batch)
    assert out.num_rows == batch.num_rows
    return {r["key"]: r for r in out.to_pylist()}


def stored(row: dict) -> Image.Image:
    img = Image.open(io.BytesIO(row["image"]["bytes"]))
    img.load()
    return img


def jpeg(size=(160, 120), seed=1) -> bytes:
    return encode(draw_image(random.Random(seed), size)[0])


def test_every_zoo_case_gets_its_reason_or_is_kept_with_its_size(tmp_path):
    expected = zoo.make_zoo_shard(tmp_path / "zoo.tar")
    rows = decode(zoo_table())
    assert set(rows) == set(expected)
    for key, reason in expected.items():
        row = rows[key]
        assert row["reject_reason"] == reason, key
        if reason is None:
            assert (row["width"], row["height"], row["format"]) == zoo.KEPT_DECODED[key], key
            img = stored(row)
            assert img.size == (row["width"], row["height"]), key
            assert img.format.lower() == row["format"], key
        else:
            assert row["width"] is None and row["height"] is None and row["format"] is None, key


def test_exif_orientation_is_applied_to_sizes_and_to_the_stored_pixels():
    raw = zoo.exif_rotated_jpeg()
    original = Image.open(io.BytesIO(raw))
    assert original.size == zoo.EXIF_RAW_SIZE
    row = decode(table([{"key": "phone", "bytes": raw}]))["phone"]
    assert (row["width"], row["height"]) == zoo.EXIF_UPRIGHT_SIZE
    upright = stored(row)
    assert upright.size == zoo.EXIF_UPRIGHT_SIZE
    # Viewers must not rotate it a second time.
    assert upright.getexif().get(0x0112, 1) == 1
    # Orientation 6 means "rotate 90 degrees clockwise to display".
    pixels = np.asarray(upright, dtype=np.float64)
    clockwise = np.asarray(original.convert("RGB").transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    counter = np.asarray(original.convert("RGB").transpose(Image.Transpose.ROTATE_90), dtype=np.float64)
    assert np.abs(pixels - clockwise).mean() < 8 < np.abs(pixels - counter).mean()


def test_normalised_images_are_stored_as_8bit_rgb_and_keep_the_source_digest():
    rows = decode(zoo_table())
    source = {r["key"]: r for r in zoo_table().to_pylist()}
    for key in zoo.NORMALISED_KEYS:
        row = rows[key]
        img = stored(row)
        assert img.mode == "RGB", key
        assert row["image"]["bytes"] != source[key]["image"]["bytes"], key
        assert row["sha256"] == source[key]["sha256"] == hashlib.sha256(source[key]["image"]["bytes"]).hexdigest()
        assert row["image"]["path"] == source[key]["image"]["path"]
    # 16-bit: scaled to 8 bits, not clipped (a clip would turn almost everything white).
    grey = np.asarray(stored(rows[zoo.PNG_16BIT]))[..., 0]
    assert grey[0, 0] == 0 and 245 <= grey[-1, -1] <= 255 and 100 < grey.mean() < 150
    # Transparent pixels are flattened onto white; opaque ones keep their colour.
    flat = stored(rows[zoo.RGBA_PNG])
    original = Image.open(io.BytesIO(source[zoo.RGBA_PNG]["image"]["bytes"]))
    assert flat.getpixel((0, 0)) == (255, 255, 255) and flat.getpixel((24, 39)) == (255, 255, 255)
    assert flat.getpixel((49, 39)) == original.getpixel((49, 39))[:3] != (255, 255, 255)
    # Plain RGB and greyscale images keep their exact bytes.
    for key in (zoo.GOOD_JPEG, zoo.GOOD_PNG, zoo.GOOD_WEBP, zoo.NO_CAPTION):
        assert rows[key]["image"] == source[key]["image"], key


def test_normalize_off_keeps_the_original_bytes_of_odd_modes():
    rows = decode(zoo_table(), normalize=False)
    source = {r["key"]: r for r in zoo_table().to_pylist()}
    for key in (zoo.CMYK_JPEG, zoo.RGBA_PNG, zoo.PNG_16BIT, zoo.PALETTE_PNG, zoo.LA_PNG):
        assert rows[key]["reject_reason"] is None
        assert rows[key]["image"] == source[key]["image"], key
        assert (rows[key]["width"], rows[key]["height"], rows[key]["format"]) == zoo.KEPT_DECODED[key]


def test_too_many_pixels_is_decided_from_the_header_alone():
    # Both files declare more pixels than the default limit and carry 64 bytes of pixel data.
    # 100 megapixels is under Pillow's own bomb error (2x its limit, where it only warns): a
    # decoder that loaded first would allocate 300 MB, then find the data truncated. The
    # reason says the header check came first.
    rows = decode(table([{"key": "bomb", "bytes": bomb_png(100_000, 100_000)},
                         {"key": "just_over", "bytes": bomb_png(10_000, 10_000)}]))
    assert 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    assert rows["bomb"]["reject_reason"] == "decode:too_many_pixels"
    assert rows["just_over"]["reject_reason"] == "decode:too_many_pixels"
    # A truncated file over the limit is rejected as too big: its pixels were never decoded.
    half = jpeg((200, 160))[:2000]
    rows = decode(table([{"key": "cut", "bytes": half}, {"key": "exact", "bytes": jpeg((100, 80))},
                         {"key": "over", "bytes": jpeg((101, 80))}]), max_pixels=100 * 80)
    assert rows["cut"]["reject_reason"] == "decode:too_many_pixels"
    assert rows["exact"]["reject_reason"] is None and rows["exact"]["width"] == 100
    assert rows["over"]["reject_reason"] == "decode:too_many_pixels"


def test_resize_max_side_downscales_keeping_aspect_and_format():
    rows = decode(table([{"key": "big", "bytes": jpeg((160, 120))},
                         {"key": "small", "bytes": jpeg((40, 30))},
                         {"key": "tall_png", "bytes": encode(draw_image(random.Random(3), (50, 200))[0], "PNG"),
                          "path": "tall.png"},
                         {"key": "phone", "bytes": zoo.exif_rotated_jpeg()}]), resize_max_side=64)
    assert (rows["big"]["width"], rows["big"]["height"], rows["big"]["format"]) == (64, 48, "jpeg")
    assert stored(rows["big"]).size == (64, 48) and stored(rows["big"]).format == "JPEG"
    assert (rows["small"]["width"], rows["small"]["height"]) == (40, 30)
    assert rows["small"]["image"]["bytes"] == jpeg((40, 30))  # nothing to do: untouched
    assert (rows["tall_png"]["width"], rows["tall_png"]["height"], rows["tall_png"]["format"]) == (16, 64, "png")
    assert stored(rows["tall_png"]).format == "PNG"
    assert (rows["phone"]["width"], rows["phone"]["height"]) == (43, 64)  # rotated first, then fitted


@pytest.mark.parametrize("fmt", ["webp", "png", "jpeg"])
def test_reencode_format_stores_every_kept_image_in_that_format(fmt):
    rows = decode(zoo_table(), reencode_format=fmt)
    for key, (w, h, _) in zoo.KEPT_DECODED.items():
        row = rows[key]
        assert row["reject_reason"] is None and row["format"] == fmt, key
        img = stored(row)
        assert img.format.lower() == fmt and img.size == (w, h) and img.mode == "RGB", key


def test_mpo_phone_photos_count_as_jpeg():
    first, second = draw_image(random.Random(1), (40, 30))[0], draw_image(random.Random(2), (40, 30))[0]
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    row = decode(table([{"key": "mpo", "bytes": buf.getvalue()}]))["mpo"]
    assert (row["reject_reason"], row["format"], row["width"]) == (None, "jpeg", 40)


def test_rows_rejected_upstream_are_left_alone_and_the_input_is_not_mutated():
    good, empty = jpeg(), b""
    batch = table([{"key": "a", "bytes": good, "reject_reason": "webdataset:invalid_json"},
                   {"key": "b", "bytes": empty, "reject_reason": "webdataset:text_not_utf8"},
                   {"key": "c", "bytes": None, "reject_reason": "webdataset:missing_image"},
                   {"key": "d", "bytes": good},
                   {"key": "e", "bytes": zoo.exif_rotated_jpeg(), "reject_reason": "upstream:nope"}])
    before = batch.to_pylist()
    out = ImageDecoder(DecodeConfig())(batch)
    rows = {r["key"]: r for r in out.to_pylist()}
    for key, reason in (("a", "webdataset:invalid_json"), ("b", "webdataset:text_not_utf8"),
                        ("c", "webdataset:missing_image"), ("e", "upstream:nope")):
        assert rows[key]["reject_reason"] == reason
        assert rows[key]["width"] is None and rows[key]["height"] is None and rows[key]["format"] is None
    assert rows["e"]["image"]["bytes"] == zoo.exif_rotated_jpeg()  # not normalised either
    assert (rows["d"]["width"], rows["d"]["reject_reason"]) == (160, None)
    assert batch.to_pylist() == before and batch.column_names == READER_SCHEMA.names
    assert out.column_names[: len(READER_SCHEMA)] == READER_SCHEMA.names
    assert out.schema.field("width").type == pa.int32() and out.schema.field("height").type == pa.int32()


def test_chunked_batches_and_batches_without_reject_reason_decode_the_same():
    whole = zoo_table()
    chunked = pa.concat_tables([whole.slice(0, 5), whole.slice(5)])
    assert decode(chunked) == decode(whole)
    fresh = table([{"key": "a", "bytes": jpeg()}, {"key": "b", "bytes": b"not an image"}]).drop_columns(["reject_reason"])
    rows = decode(fresh)
    assert rows["a"]["reject_reason"] is None and rows["b"]["reject_reason"] == "decode:not_an_image"


def test_truncated_png_is_truncated_and_garbage_after_a_valid_header_is_corrupt():
    png = encode(draw_image(random.Random(5), (120, 90))[0], "PNG")
    jpg = jpeg()
    garbage = jpg[:600] + bytes(random.Random(0).randrange(256) for _ in range(3000))
    rows = decode(table([{"key": "cut_png", "bytes": png[: len(png) // 2]},
                         {"key": "garbage", "bytes": garbage}]))
    assert rows["cut_png"]["reject_reason"] == "decode:truncated"
    assert rows["garbage"]["reject_reason"] == "decode:corrupt"


def test_config_is_validated():
    for bad in ({"resize_max_side": 4}, {"reencode_format": "gif"}, {"quality": 0}, {"max_pixel": 10}):
        with pytest.raises(ValueError):
            DecodeConfig(**bad)


def test_reencoded_images_get_a_path_extension_that_matches_their_bytes():
    img = draw_image(random.Random(3), (64, 48))[0]
    rows = decode(table([
        {"key": "g", "bytes": encode(img.convert("P"), "GIF"), "path": "anim.gif"},
        {"key": "w", "bytes": jpeg(), "path": "photo.jpg"},
    ]), reencode_format=None)
    assert (rows["g"]["format"], rows["g"]["image"]["path"]) == ("jpeg", "anim.jpg")
    assert stored(rows["g"]).format == "JPEG"
    assert rows["w"]["image"]["path"] == "photo.jpg"  # untouched bytes keep their name
    webp = decode(table([{"key": "w", "bytes": jpeg(), "path": "photo.jpg"}]), reencode_format="webp")
    assert webp["w"]["image"]["path"] == "photo.webp" and stored(webp["w"]).format == "WEBP"


def test_probe_upright_reads_the_shape_viewers_see_from_the_header():
    from operators.image.pixels import probe_upright

    raw = draw_image(random.Random(1), (56, 40))[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 56 x 40, shown turned a quarter clockwise
    assert probe_upright(encode(raw, "JPEG", exif=exif.tobytes())) == (40, 56)
    assert probe_upright(encode(raw, "JPEG")) == (56, 40)
    assert probe_upright(encode(raw, "PNG")) == (56, 40)
