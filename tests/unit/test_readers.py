"""Readers without Ray: shard files in tmp_path, blocks from ``read_blocks``."""

from __future__ import annotations

import gzip
import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.sample_data import draw_image, encode, write_tar
from operators.readers import make_reader
from operators.readers.base import BLOCK_SCHEMA
from ground.schema import SHARD_DAMAGE, SHARD_ROWS
from pipelines.config import InputConfig
from ground.errors import ConfigError
from tests import zoo


def reader(fmt: str, paths: list[str], **options):
    """A reader built the way the planner builds it: from a validated ``input`` section."""
    return make_reader(InputConfig(format=fmt, paths=paths, **options).model_dump())


def read(r, url: str) -> tuple[pa.Table, list[pa.Table]]:
    blocks = list(r.read_blocks(url))
    for b in blocks:
        assert b.schema.equals(BLOCK_SCHEMA)
    return pa.concat_tables(blocks), blocks


def rows_by_key(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    out = {r["key"]: r for r in rows}
    assert len(out) == len(rows), "keys must be unique within a shard"
    return out


def assert_digests(table: pa.Table) -> None:
    for r in table.to_pylist():
        if r["image"] is None:
            assert r["sha256"] is None
        else:
            assert r["sha256"] == hashlib.sha256(r["image"]["bytes"]).hexdigest()


def jpeg(seed: int, size=(64, 48)) -> bytes:
    return encode(draw_image(random.Random(seed), size)[0])


# -- WebDataset -----------------------------------------------------------------------------

def test_webdataset_zoo_reader_reasons_text_meta_and_provenance(tmp_path):
    url = str(tmp_path / "zoo.tar")
    expected = zoo.make_zoo_shard(tmp_path / "zoo.tar")
    table, _ = read(reader("webdataset", [url]), url)
    rows = rows_by_key(table)

    assert list(rows) == list(zoo.zoo_samples())  # tar order
    assert set(rows) == set(expected)
    for key, row in rows.items():
        assert row["reject_reason"] == zoo.READER_REASONS.get(key), key
        assert row["source_shard"] == url
        assert row[SHARD_ROWS] == len(rows) and row[SHARD_DAMAGE] is None
    assert_digests(table)

    good = rows[zoo.GOOD_JPEG]
    assert good["text"] == "a good photo"
    assert json.loads(good["meta"]) == {"key": zoo.GOOD_JPEG}
    assert good["image"]["path"] == "good_jpeg.jpg"
    assert good["image"]["bytes"] == zoo.zoo_samples()[zoo.GOOD_JPEG]["jpg"][1]
    # The reader does not judge image bytes: broken images reach decode with their bytes.
    assert rows[zoo.EMPTY_JPEG]["image"]["bytes"] == b""
    assert rows[zoo.TRUNCATED_JPEG]["reject_reason"] is None
    # A missing caption is kept as null, not "" and not a reject.
    assert rows[zoo.NO_CAPTION]["text"] is None and rows[zoo.NO_CAPTION]["reject_reason"] is None
    assert rows[zoo.NO_IMAGE]["image"] is None
    assert rows[zoo.NO_IMAGE]["text"] == "a caption whose image went missing"
    # A non-UTF-8 caption stays readable (replacement characters) for whoever inspects rejects.
    assert rows[zoo.BAD_UTF8_CAPTION]["text"].startswith("caf\ufffd au lait")
    assert isinstance(json.loads(rows[zoo.BAD_JSON]["meta"]), str)  # the broken text, kept as a JSON string


def test_webdataset_caption_bom_and_whitespace_are_stripped(tmp_path):
    url = str(tmp_path / "s.tar")
    write_tar(tmp_path / "s.tar", [("a.jpg", jpeg(1)), ("a.txt", b"\xef\xbb\xbf  a red circle \n"),
                                   ("b.jpg", jpeg(2)), ("b.caption", b"a blue square")])
    rows = rows_by_key(read(reader("webdataset", [url]), url)[0])
    assert rows["a"]["text"] == "a red circle"
    assert rows["b"]["text"] == "a blue square"
    assert rows["a"]["meta"] is None and rows["a"]["reject_reason"] is None


def test_webdataset_keys_keep_their_folder(tmp_path):
    url = str(tmp_path / "s.tar")
    write_tar(tmp_path / "s.tar", [("part1/0001.jpg", jpeg(1)), ("part1/0001.txt", b"one"),
                                   ("part2/0001.jpg", jpeg(2)), ("part2/0001.txt", b"two")])
    rows = rows_by_key(read(reader("webdataset", [url]), url)[0])
    assert list(rows) == ["part1/0001", "part2/0001"]
    assert rows["part1/0001"]["text"] == "one" and rows["part2/0001"]["text"] == "two"


@pytest.mark.parametrize("block_rows", [2, 100])
def test_truncated_tar_keeps_samples_before_the_cut_and_rejects_the_cut_one(tmp_path, block_rows):
    url = str(tmp_path / "cut.tar")
    n_complete, cut_key, n_rows = zoo.make_truncated_tar(tmp_path / "cut.tar")
    table, blocks = read(reader("webdataset", [url], block_rows=block_rows), url)

    keys = table["key"].to_pylist()
    assert len(keys) == n_rows == n_complete + 1
    assert keys[-1] == cut_key
    assert table["reject_reason"].to_pylist() == [None] * n_complete + ["webdataset:truncated_sample"]
    assert all(r["image"] is not None and r["text"] for r in table.slice(0, n_complete).to_pylist())
    assert_digests(table)

    last = blocks[-1]
    damage = set(last[SHARD_DAMAGE].to_pylist())
    assert len(damage) == 1
    (message,) = damage
    assert message and f"after {n_complete} complete samples" in message
    assert set(last[SHARD_ROWS].to_pylist()) == {n_rows}
    for b in blocks[:-1]:
        assert b[SHARD_DAMAGE].null_count == b.num_rows and b[SHARD_ROWS].null_count == b.num_rows


def test_gzipped_shard_reads_like_the_plain_one_and_a_cut_one_is_damaged(tmp_path):
    zoo.make_zoo_shard(tmp_path / "zoo.tar")
    raw = gzip.compress((tmp_path / "zoo.tar").read_bytes(), mtime=0)
    (tmp_path / "zoo.tar.gz").write_bytes(raw)
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) * 2 // 3])
    r = reader("webdataset", [str(tmp_path / "zoo.tar")])
    plain = read(r, str(tmp_path / "zoo.tar"))[0]
    gz = read(r, str(tmp_path / "zoo.tar.gz"))[0]
    assert gz.drop_columns(["source_shard"]).equals(plain.drop_columns(["source_shard"]))

    cut = read(r, str(tmp_path / "cut.tar.gz"))[0]
    assert 0 < cut.num_rows < plain.num_rows
    assert cut["reject_reason"][-1].as_py() == "webdataset:truncated_sample"
    assert cut[SHARD_DAMAGE][-1].as_py().startswith("tar damaged")
    assert cut["key"].to_pylist()[:-1] == plain["key"].to_pylist()[: cut.num_rows - 1]


@pytest.mark.parametrize("block_rows", [1, 5, 17, 100])
def test_block_rows_split_and_only_the_last_block_carries_the_shard_total(tmp_path, block_rows):
    url = str(tmp_path / "zoo.tar")
    total = len(zoo.make_zoo_shard(tmp_path / "zoo.tar"))
    table, blocks = read(reader("webdataset", [url], block_rows=block_rows), url)
    assert [b.num_rows for b in blocks[:-1]] == [block_rows] * (len(blocks) - 1)
    assert 1 <= blocks[-1].num_rows <= block_rows
    assert table.num_rows == total
    assert table["key"].to_pylist() == list(zoo.zoo_samples())
    assert blocks[-1][SHARD_ROWS].to_pylist() == [total] * blocks[-1].num_rows
    for b in blocks[:-1]:
        assert b[SHARD_ROWS].null_count == b.num_rows


def test_empty_tar_yields_only_an_end_marker(tmp_path):
    # An empty tar is a complete shard with 0 rows: the driver hears it through one marker row.
    write_tar(tmp_path / "empty.tar", [])
    blocks = list(reader("webdataset", [str(tmp_path / "empty.tar")]).read_blocks(str(tmp_path / "empty.tar")))
    assert len(blocks) == 1 and blocks[0].num_rows == 1
    marker = blocks[0].to_pylist()[0]
    assert marker["_shard_marker"] == "end" and marker["_shard_rows"] == 0 and marker["_shard_damage"] is None


def test_shards_from_brace_ranges_and_globs_are_each_readable(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", [(f"k{i}.jpg", jpeg(i)), (f"k{i}.txt", f"shard {i}".encode())])
    (tmp_path / "notes.md").write_text("not a shard")
    braces = reader("webdataset", [str(tmp_path / "{00000..00002}.tar")]).list_shards()
    globbed = reader("webdataset", [str(tmp_path / "*.tar")]).list_shards()
    assert braces == globbed == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    r = reader("webdataset", [str(tmp_path / "*.tar")])
    for i, url in enumerate(globbed):
        row = read(r, url)[0].to_pylist()[0]
        assert (row["key"], row["text"], row["source_shard"]) == (f"k{i}", f"shard {i}", url)


# -- Parquet ----------------------------------------------------------------------------------

def test_parquet_hf_image_struct_with_id_text_and_extras_in_meta(tmp_path):
    images = [jpeg(1), jpeg(2), None, b""]
    table = pa.table({
        "image": pa.array([None if b is None else {"bytes": b, "path": f"img{i}.jpg"}
                           for i, b in enumerate(images)],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "caption": ["a red circle", "a blue square", "lost", "empty"],
        "uid": [101, 102, 103, 104],
        "url": ["http://x/1", "http://x/2", "http://x/3", "http://x/4"],
        "similarity": [0.31, 0.29, 0.1, 0.2],
        "thumbnail": [b"\x00\x01"] * 4,
        "tags": [["red"], [], None, ["x", "y"]],
    })
    pq.write_table(table, tmp_path / "part-0.parquet")
    url = str(tmp_path / "part-0.parquet")
    r = reader("parquet", [url], text_column="caption", id_column="uid")
    out, _ = read(r, url)
    rows = rows_by_key(out)

    assert list(rows) == ["101", "102", "103", "104"]
    assert rows["101"]["text"] == "a red circle"
    assert rows["101"]["image"] == {"bytes": images[0], "path": "img0.jpg"}
    meta = json.loads(rows["101"]["meta"])
    assert meta["url"] == "http://x/1" and meta["similarity"] == pytest.approx(0.31) and meta["tags"] == ["red"]
    assert meta.get("thumbnail") is None  # binary extras are not copied into JSON
    assert "caption" not in meta and "uid" not in meta and "image" not in meta
    assert rows["101"]["reject_reason"] is None and rows["102"]["reject_reason"] is None
    assert rows["103"]["reject_reason"] == "parquet:missing_image"
    assert rows["104"]["reject_reason"] == "parquet:missing_image"
    assert rows["103"]["image"] is None and rows["104"]["image"] is None
    assert_digests(out)
    assert out[SHARD_ROWS].to_pylist() == [4] * 4


def test_parquet_plain_binary_column_keys_by_row_number_across_batches(tmp_path):
    data = [jpeg(i) for i in range(5)]
    pq.write_table(pa.table({"jpg": pa.array(data, type=pa.binary()), "text": [f"c{i}" for i in range(5)]}),
                   tmp_path / "shard.parquet", row_group_size=2)
    url = str(tmp_path / "shard.parquet")
    out, blocks = read(reader("parquet", [url], image_column="jpg", block_rows=2), url)
    assert out["key"].to_pylist() == [f"shard/{i:09d}" for i in range(5)]
    assert out["text"].to_pylist() == [f"c{i}" for i in range(5)]
    assert [r["image"] for r in out.to_pylist()] == [{"bytes": d, "path": None} for d in data]
    assert out["meta"].null_count == 5  # no extra columns: no meta
    assert [b.num_rows for b in blocks] == [2, 2, 1]
    assert blocks[-1][SHARD_ROWS].to_pylist() == [5]
    assert_digests(out)


def test_parquet_without_text_column_gives_null_text(tmp_path):
    pq.write_table(pa.table({"image": pa.array([jpeg(1)], type=pa.binary())}), tmp_path / "p.parquet")
    url = str(tmp_path / "p.parquet")
    out, _ = read(reader("parquet", [url], text_column=None), url)
    assert out["text"].to_pylist() == [None] and out["reject_reason"].to_pylist() == [None]


@pytest.mark.parametrize("option", [{"image_column": "img"}, {"text_column": "caption"}, {"id_column": "uid"}])
def test_parquet_missing_configured_column_is_a_config_error_naming_file_and_column(tmp_path, option):
    pq.write_table(pa.table({"image": pa.array([jpeg(1)], type=pa.binary()), "text": ["t"]}),
                   tmp_path / "p.parquet")
    url = str(tmp_path / "p.parquet")
    with pytest.raises(ConfigError) as exc:
        list(reader("parquet", [url], **option).read_blocks(url))
    (column,) = option.values()
    assert url in str(exc.value) and repr(column) in str(exc.value)


# -- Image folders --------------------------------------------------------------------------------

def test_imagefolder_groups_files_by_stem_with_reasons(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cat, dog, bird = jpeg(1), encode(draw_image(random.Random(2), (50, 40))[0], "PNG"), jpeg(3)
    (folder / "cat.jpg").write_bytes(cat)
    (folder / "cat.txt").write_text("a cat on a mat\n")
    (folder / "cat.json").write_text('{"source": "camera"}')
    (folder / "dog.png").write_bytes(dog)
    (folder / "dog.txt").write_bytes(b"a d\xf6g")
    (folder / "BIRD.JPG").write_bytes(bird)
    (folder / "orphan.txt").write_text("my image went missing")
    (folder / "fish.jpg").write_bytes(jpeg(4))
    (folder / "fish.json").write_text("{not json")
    (folder / "notes.md").write_text("not a sample")
    (folder / "README").write_text("not a sample either")
    url = str(folder)
    out, _ = read(reader("imagefolder", [url]), url)
    rows = rows_by_key(out)

    assert set(rows) == {"cat", "dog", "BIRD", "orphan", "fish"}
    assert rows["cat"]["text"] == "a cat on a mat"
    assert json.loads(rows["cat"]["meta"]) == {"source": "camera"}
    assert rows["cat"]["image"] == {"bytes": cat, "path": "cat.jpg"}
    assert rows["cat"]["reject_reason"] is None
    assert rows["dog"]["image"]["path"] == "dog.png"
    assert rows["dog"]["reject_reason"] == "imagefolder:text_not_utf8"
    assert rows["BIRD"]["image"] == {"bytes": bird, "path": "BIRD.JPG"}
    assert rows["BIRD"]["text"] is None and rows["BIRD"]["reject_reason"] is None
    assert rows["orphan"]["reject_reason"] == "imagefolder:missing_image" and rows["orphan"]["image"] is None
    assert rows["fish"]["reject_reason"] == "imagefolder:invalid_json"
    assert all(r["source_shard"] == url for r in rows.values())
    assert out[SHARD_ROWS].to_pylist() == [5] * 5
    assert_digests(out)


def test_imagefolder_shards_are_the_matching_folders_only(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(jpeg(1))
    (tmp_path / "stray.jpg").write_bytes(jpeg(2))
    shards = reader("imagefolder", [str(tmp_path / "*")]).list_shards()
    assert shards == [str(tmp_path / "a"), str(tmp_path / "b")]


# -- COCO captions -----------------------------------------------------------------------------

def _coco(tmp_path, n_extra_images: int = 0) -> tuple[str, str, dict[str, bytes]]:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    files = {f"{i:012d}.jpg": jpeg(i) for i in (1, 2, 3, 4)}
    for name, data in files.items():
        (images_dir / name).write_bytes(data)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in (1, 2, 3, 4, 5)]
    images += [{"id": 1000 + i, "file_name": f"extra{i}.jpg"} for i in range(n_extra_images)]
    annotations = [
        {"id": 10, "image_id": 1, "caption": "A man riding a horse. "},
        {"id": 11, "image_id": 1, "caption": "Someone on horseback."},
        {"id": 12, "image_id": 2, "caption": "A bowl of fruit."},
        {"id": 13, "image_id": 3, "caption": "A red bus."},
        {"id": 14, "image_id": 3, "caption": "A bus in the street."},
        {"id": 15, "image_id": 3, "caption": "A double-decker."},
        {"id": 16, "image_id": 5, "caption": "A photo whose file is gone."},
        # image 4 has no caption
    ]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(tmp_path / "captions.json"), str(images_dir), files


def test_coco_per_caption_rows_missing_image_and_uncaptioned_image(tmp_path):
    url, prefix, files = _coco(tmp_path)
    r = reader("coco", [url], images_prefix=prefix)
    (shard,) = r.list_shards()
    assert shard == f"{url}#images=0-999"  # a shard is named by its capacity (stable under append)
    out, _ = read(r, shard)
    rows = rows_by_key(out)

    assert list(rows) == ["1/0", "1/1", "2/0", "3/0", "3/1", "3/2", "4", "5/0"]
    assert rows["1/0"]["text"] == "A man riding a horse."
    assert rows["1/1"]["text"] == "Someone on horseback."
    assert rows["1/0"]["image"] == {"bytes": files["000000000001.jpg"], "path": "000000000001.jpg"}
    assert rows["1/0"]["sha256"] == rows["1/1"]["sha256"]
    assert json.loads(rows["1/0"]["meta"]) == {"id": 1, "width": 64, "height": 48}
    assert rows["4"]["text"] is None and rows["4"]["reject_reason"] is None
    assert rows["5/0"]["reject_reason"] == "coco:missing_image" and rows["5/0"]["image"] is None
    assert [k for k, v in rows.items() if v["reject_reason"]] == ["5/0"]
    assert all(v["source_shard"] == shard for v in rows.values())
    assert out[SHARD_ROWS].to_pylist() == [8] * 8
    assert_digests(out)


def test_coco_per_image_rows_keep_every_caption_in_meta(tmp_path):
    url, prefix, _ = _coco(tmp_path)
    r = reader("coco", [url], images_prefix=prefix, coco_rows="per_image")
    (shard,) = r.list_shards()
    rows = rows_by_key(read(r, shard)[0])
    assert list(rows) == ["1", "2", "3", "4", "5"]
    assert rows["3"]["text"] == "A red bus."
    assert json.loads(rows["3"]["meta"])["captions"] == ["A red bus.", "A bus in the street.", "A double-decker."]
    assert rows["4"]["text"] is None and json.loads(rows["4"]["meta"])["captions"] == []
    assert rows["5"]["reject_reason"] == "coco:missing_image"


def test_coco_virtual_shards_cover_every_image_once(tmp_path):
    url, prefix, _ = _coco(tmp_path, n_extra_images=996)  # 1001 images in all
    default = reader("coco", [url], images_prefix=prefix)
    assert default.list_shards() == [f"{url}#images=0-999", f"{url}#images=1000-1999"]

    r = reader("coco", [url], images_prefix=prefix, coco_rows="per_image", coco_images_per_shard=400)
    shards = r.list_shards()
    assert shards == [f"{url}#images=0-399", f"{url}#images=400-799", f"{url}#images=800-1199"]
    keys: list[str] = []
    for shard in shards:
        t = read(r, shard)[0]
        assert t[SHARD_ROWS][-1].as_py() == t.num_rows
        keys += t["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 1001
    assert {"1", "2", "3", "4", "5", "1000", "1995"} <= set(keys)


def test_coco_without_images_prefix_is_a_config_error(tmp_path):
    url, _, _ = _coco(tmp_path)
    r = reader("coco", [url])
    (shard,) = r.list_shards()
    with pytest.raises(ConfigError, match="images_prefix"):
        list(r.read_blocks(shard))


# -- A shard of another format than input.format -----------------------------------------

def test_a_shard_of_the_other_format_is_a_config_error_naming_the_format_to_set(tmp_path):
    zoo.make_zoo_shard(tmp_path / "zoo.tar")
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "part.parquet")
    (tmp_path / "zoo.tar.gz").write_bytes(gzip.compress((tmp_path / "zoo.tar").read_bytes(), mtime=0))
    (tmp_path / "page.tar").write_bytes(b"<html>503 Slow Down</html>" * 40)
    (tmp_path / "empty.tar").write_bytes(b"")

    with pytest.raises(ConfigError) as err:
        reader("parquet", [str(tmp_path / "zoo.tar")]).check_formats([str(tmp_path / "zoo.tar")])
    assert str(err.value) == (f"{tmp_path}/zoo.tar is a tar archive (WebDataset), but input.format is 'parquet' "
                              "(set input.format: webdataset)")
    with pytest.raises(ConfigError, match=r"part\.parquet is a Parquet file, but input.format is 'webdataset' "
                                          r"\(set input.format: parquet\)"):
        reader("webdataset", [str(tmp_path / "part.parquet")]).check_formats([str(tmp_path / "part.parquet")])
    # Each format accepts its own shards, and what it does not recognise is left to reading,
    # where garbage and empty objects are damaged shards (data), not config errors.
    wds = reader("webdataset", [str(tmp_path / "zoo.tar")])
    for name in ("zoo.tar", "zoo.tar.gz", "page.tar", "empty.tar", "missing.tar"):
        wds.check_formats([str(tmp_path / name)])
    pqr = reader("parquet", [str(tmp_path / "part.parquet")])
    for name in ("part.parquet", "zoo.tar.gz", "page.tar", "empty.tar"):
        pqr.check_formats([str(tmp_path / name)])


def test_paths_that_mix_formats_are_refused_at_the_first_shard_of_the_odd_extension(tmp_path):
    for i in range(3):
        zoo.make_zoo_shard(tmp_path / f"{i:05d}.tar")
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "stray.parquet")
    (tmp_path / "notes.txt").write_text("not a shard of either format")
    shards = [str(tmp_path / n) for n in ("00000.tar", "00001.tar", "00002.tar", "notes.txt", "stray.parquet")]
    wds = reader("webdataset", shards)
    with pytest.raises(ConfigError) as err:
        wds.check_formats(shards)
    assert str(err.value) == (f"{tmp_path}/stray.parquet is a Parquet file, but input.format is 'webdataset', the "
                              f"format of {tmp_path}/00000.tar: input.paths mixes two formats; narrow it to one "
                              "format's files")
    # The same when the odd file comes first: it is named, and the advice is to narrow the paths.
    with pytest.raises(ConfigError, match=r"stray\.parquet is a Parquet file, .*: input.paths mixes two formats"):
        wds.check_formats(shards[-1:] + shards[:-1])
    # Under the other format the tars are the odd ones, named the same way.
    with pytest.raises(ConfigError, match=r"00000\.tar is a tar archive \(WebDataset\), but input.format is "
                                          r"'parquet', the format of .*stray\.parquet: input.paths mixes"):
        reader("parquet", shards).check_formats(shards)
    # One format's files (and files that show no known format, left to reading) pass.
    wds.check_formats(shards[:4])
    # Only the other format's files: the advice is to set input.format.
    with pytest.raises(ConfigError, match=r"00000\.tar is a tar archive \(WebDataset\), but input.format is "
                                          r"'parquet' \(set input.format: webdataset\)$"):
        reader("parquet", shards[:4]).check_formats(shards[:4])
    # Formats without single-file shards are not judged.
    reader("coco", [str(tmp_path / "notes.txt")]).check_formats(shards)


@pytest.mark.parametrize("column, type_name", [
    (pa.array(["http://example.com/a.jpg"]), "string"),
    (pa.array([[1, 2, 3]], type=pa.list_(pa.uint8())), "list<element: uint8>"),
    (pa.array([{"path": "a.jpg"}]), "struct<path: string>")])
def test_an_image_column_that_holds_no_bytes_is_a_config_error_naming_file_column_and_type(tmp_path, column,
                                                                                           type_name):
    # e.g. an img2dataset URL list given as input: one clear line instead of a TypeError in hashing
    pq.write_table(pa.table({"image": column, "text": ["t"]}), tmp_path / "p.parquet")
    url = str(tmp_path / "p.parquet")
    with pytest.raises(ConfigError) as exc:
        list(reader("parquet", [url]).read_blocks(url))
    assert str(exc.value).startswith(f"{url}: column 'image' holds {type_name}, not image bytes")
    # an all-null image column is not a config error: every row is a missing image
    pq.write_table(pa.table({"image": pa.array([None], type=pa.null()), "text": ["t"]}), tmp_path / "n.parquet")
    out, _ = read(reader("parquet", [url]), str(tmp_path / "n.parquet"))
    assert out["reject_reason"].to_pylist() == ["parquet:missing_image"]
