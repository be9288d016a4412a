"""Retrieval evaluation: blockwise recall equals a brute-force reference; sampling by key hash;
the figures land next to the run's stats; ``mmcurate eval retrieval`` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.models.base import embedding_array
from pipelines.eval import TIE_EPS, evaluate_retrieval, load_pairs, retrieval_ranks, retrieval_recall

REPO = Path(__file__).resolve().parents[2]


def planted(n: int = 300, dim: int = 16, matched: int = 200, noise: float = 0.3, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``< matched`` have a caption embedding near their image's (a planted pair); the rest
    are unrelated random vectors. Stored and compared after a float16 round trip, like real output."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, dim))
    text = rng.normal(size=(n, dim))
    matched = min(matched, n)
    text[:matched] = image[:matched] + noise * rng.normal(size=(matched, dim))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    return unit(image), unit(text)


def reference_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Brute force from the definition, written independently: score every pair with a plain
    float64 dot product and count, per query, the other candidates scoring at least the true
    partner's score minus the tie tolerance (ties are pessimistic)."""
    q = queries.astype(np.float64)
    c = candidates.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        true = float(np.dot(q[i], c[i]))
        ranks.append(sum(1 for j in range(len(c)) if j != i and float(np.dot(q[i], c[j])) >= true - TIE_EPS))
    return np.array(ranks)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 300, 1000])
def test_blockwise_ranks_equal_the_brute_force_reference(block_rows):
    image, text = planted()
    i2t, t2i = retrieval_ranks(image, text, block_rows=block_rows)
    assert i2t.tolist() == reference_ranks(image, text).tolist()
    assert t2i.tolist() == reference_ranks(text, image).tolist()


def test_recall_separates_planted_pairs_from_random_ones():
    image, text = planted(n=300, matched=200)
    result = retrieval_recall(image, text, block_rows=64)
    i2t, t2i = retrieval_ranks(image, text, block_rows=64)
    for k in (1, 5, 10):
        assert result.image_to_text[f"recall@{k}"] == pytest.approx(np.mean(i2t < k))
        assert result.text_to_image[f"recall@{k}"] == pytest.approx(np.mean(t2i < k))
    # planted pairs are found first; unrelated rows (a third) almost never are
    assert np.mean(i2t[:200] == 0) > 0.95 and np.mean(i2t[200:] < 10) < 0.2
    assert 0.6 < result.image_to_text["recall@1"] < 0.7
    assert result.image_to_text["recall@1"] <= result.image_to_text["recall@5"] <= result.image_to_text["recall@10"]


def test_ties_count_against_the_query_whatever_the_order_or_block():
    image, text = planted(n=50, matched=50, noise=0.0)
    # Rows 1 and 2 share an image and their captions are identical too (a duplicate pair).
    image[2], text[2] = image[1], text[1]
    i2t_a, t2i_a = retrieval_ranks(image, text, block_rows=1)
    perm = np.random.default_rng(1).permutation(50)
    i2t_b, t2i_b = retrieval_ranks(image[perm], text[perm], block_rows=16)
    assert (i2t_b == i2t_a[perm]).all() and (t2i_b == t2i_a[perm]).all()
    # Each of the pair has a rival that scores exactly as well: neither is counted as found first.
    assert i2t_a[1] == i2t_a[2] == 1 and t2i_a[1] == t2i_a[2] == 1
    assert i2t_a[0] == 0
    # A model that maps everything to one vector retrieves nothing, not 1/n by luck.
    flat = np.ones((20, 8), dtype=np.float32)
    assert retrieval_recall(flat, flat).image_to_text["recall@10"] == 0.0


def test_mismatched_shapes_are_errors():
    with pytest.raises(ValueError, match="must both be"):
        retrieval_ranks(np.zeros((3, 4)), np.zeros((3, 5)))


# ----------------------------------------------------------------------- on an output folder

RUNS = ["20261129T010000Z-aaaaaa", "20261130T010000Z-bbbbbb"]


def write_output(root: Path, image: np.ndarray, text: np.ndarray, files: int = 3, missing_text: tuple = (),
                 prefix: str = "clip") -> list[str]:
    """An mmcurate output as phase 1 leaves it: data/ Parquet files with key and embeddings, runs/."""
    n, dim = image.shape
    keys = [f"sample-{i:05d}" for i in range(n)]
    (root / "data").mkdir(parents=True)
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        img = {j: image[r] for j, r in enumerate(rows)}
        txt = {j: text[r] for j, r in enumerate(rows) if r not in missing_text}
        table = pa.table({"key": [keys[r] for r in rows],
                          f"{prefix}_image_embedding": embedding_array(len(rows), img, dim),
                          f"{prefix}_text_embedding": embedding_array(len(rows), txt, dim)})
        pq.write_table(table, root / "data" / f"shard{f}-0123456789ab-00000.parquet")
    for run in RUNS:
        (root / "_mmcurate" / "runs" / run).mkdir(parents=True)
        (root / "_mmcurate" / "runs" / run / "stats.json").write_text("{}")
    return keys


def test_load_pairs_skips_rows_without_a_caption_and_samples_by_key_hash(tmp_path):
    image, text = planted(n=120)
    keys = write_output(tmp_path / "a", image, text, files=3, missing_text=(5, 77))
    everything = load_pairs(str(tmp_path / "a"))
    assert (everything.rows_read, everything.rows_without_pair, len(everything.keys)) == (120, 2, 118)
    assert set(everything.keys) == set(keys) - {keys[5], keys[77]}
    # The same rows split into other files, listed in another order, give the same sample.
    write_output(tmp_path / "b", image, text, files=7, missing_text=(5, 77))
    a = load_pairs(str(tmp_path / "a"), sample=40, seed=3)
    b = load_pairs(str(tmp_path / "b"), sample=40, seed=3)
    assert a.keys == b.keys and len(a.keys) == 40 and np.array_equal(a.image, b.image)
    # each row keeps its own pair
    index = {k: i for i, k in enumerate(keys)}
    rows = [index[k] for k in a.keys]
    assert np.allclose(a.image, image[rows], atol=1e-3) and np.allclose(a.text, text[rows], atol=1e-3)
    # another seed picks other rows
    assert set(load_pairs(str(tmp_path / "a"), sample=40, seed=4).keys) != set(a.keys)


def test_evaluate_writes_figures_to_eval_and_the_latest_run(tmp_path):
    image, text = planted(n=150, matched=100)
    out = tmp_path / "out"
    write_output(out, image, text)
    result, written = evaluate_retrieval(str(out), block_rows=32)
    expected = retrieval_recall(image, text)
    assert result.image_to_text == pytest.approx(expected.image_to_text)
    assert result.text_to_image == pytest.approx(expected.text_to_image)
    eval_files = list((out / "_mmcurate" / "eval").glob("retrieval-*.json"))
    assert len(eval_files) == 1 and str(eval_files[0]) in written
    in_run = out / "_mmcurate" / "runs" / RUNS[-1] / "eval_retrieval.json"
    assert in_run.exists() and not (out / "_mmcurate" / "runs" / RUNS[0] / "eval_retrieval.json").exists()
    for path in (eval_files[0], in_run):
        doc = json.loads(path.read_text())
        assert doc["rows_evaluated"] == 150 and doc["run_id"] == RUNS[-1] and doc["column_prefix"] == "clip"
        assert doc["image_to_text"] == pytest.approx(expected.image_to_text)


def test_evaluate_reads_an_output_on_s3(s3, tmp_path):
    fs, opts, bucket = s3
    image, text = planted(n=60, matched=40)
    local = tmp_path / "out"
    write_output(local, image, text, files=2)
    fs.put(str(local) + "/", f"{bucket}/out/", recursive=True)
    result, written = evaluate_retrieval(f"s3://{bucket}/out", storage_options=opts)
    assert result.rows == 60
    assert result.image_to_text == pytest.approx(retrieval_recall(image, text).image_to_text)
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/out/_mmcurate/runs/{RUNS[-1]}/eval_retrieval.json")
    assert all(w.startswith(f"s3://{bucket}/out/_mmcurate/") for w in written)


def mmcurate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_prints_a_table_and_writes_json(tmp_path):
    image, text = planted(n=200, matched=150)
    out = tmp_path / "out"
    write_output(out, image, text, missing_text=(3,))
    proc = mmcurate("eval", "retrieval", str(out), "--sample", "120", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"retrieval  {out}  prefix=clip  rows=120 (sample of 199")
    assert "skipped 1 kept row(s) without both embeddings" in proc.stdout
    i2t_line = next(line for line in lines if line.startswith("image->text"))
    doc = json.loads((out / "_mmcurate" / "runs" / RUNS[-1] / "eval_retrieval.json").read_text())
    printed = [float(v) for v in i2t_line.split()[1:4]]
    assert printed == pytest.approx([doc["image_to_text"][f"recall@{k}"] for k in (1, 5, 10)], abs=1e-4)
    assert (doc["sample"], doc["seed"], doc["rows_evaluated"]) == (120, 7, 120)
    # the sampled figures are the figures of exactly those rows
    pairs = load_pairs(str(out), sample=120, seed=7)
    assert doc["text_to_image"] == pytest.approx(retrieval_recall(pairs.image, pairs.text).text_to_image)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    image, text = planted(n=20)
    out = tmp_path / "out"
    write_output(out, image, text, prefix="siglip")
    for args, needle in (((str(out),), "no column(s) ['clip_image_embedding'"),
                         ((str(tmp_path / "nothing"),), "no Parquet files under data/"),
                         ((str(out), "--column-prefix", "siglip", "--storage-options", "{oops"), "not JSON")):
        proc = mmcurate("eval", "retrieval", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmcurate: error:") and needle in err[0], err
    ok = mmcurate("eval", "retrieval", str(out), "--column-prefix", "siglip")
    assert ok.returncode == 0 and "note: only 20 rows" not in ok.stdout
