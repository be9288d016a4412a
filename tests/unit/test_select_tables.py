"""Unit tests for phase-2 block logic and dedup algorithms (no Ray): hand-built Arrow tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from operators.dedup import graph
from pipelines.select import tables as T
from pipelines.select.config import SelectConfig


def _narrow(rows: list[dict], cfg: SelectConfig, fid: int = 0) -> pa.Table:
    t = pa.Table.from_pylist(rows)
    return T.narrow(t, fid, cfg, ["key", "sha256", "phash", "clip_score", "text_lang"])


def _rows():
    return [
        {"key": "a", "sha256": "s1", "phash": 0, "clip_score": 0.9, "text_lang": "en", "width": 10, "height": 10},
        {"key": "b", "sha256": "s1", "phash": 1, "clip_score": 0.1, "text_lang": "de", "width": 10, "height": 10},
        {"key": "c", "sha256": "s2", "phash": 3, "clip_score": None, "text_lang": "fr", "width": 99, "height": 99},
    ]


def test_comparison_rules_reject_with_first_failing_rule_and_nulls_fail():
    cfg = SelectConfig.model_validate({"rules": ["clip_score >= 0.28", "text_lang in [en, de]"]})
    t = _narrow(_rows(), cfg)
    assert t[T.REASON].to_pylist() == [None, "select:clip_score>=0.28", "select:clip_score>=0.28"]
    cfg = SelectConfig.model_validate({"rules": ["text_lang not in [fr]", "width < 50"]})
    assert _narrow(_rows(), cfg)[T.REASON].to_pylist() == [None, None, "select:text_lang_not_in_[fr]"]


def test_row_ids_are_unique_across_files_and_stable():
    cfg = SelectConfig()
    a, b = _narrow(_rows(), cfg, fid=0), _narrow(_rows(), cfg, fid=1)
    ids = a[T.RID].to_pylist() + b[T.RID].to_pylist()
    assert len(set(ids)) == 6
    assert b[T.RID].to_pylist()[2] == (1 << 32) | 2


def test_exact_group_keeps_the_highest_clip_score_then_key():
    cfg = SelectConfig()  # survivor order: -clip_score, -pixels
    t = _narrow(_rows()[:2], cfg)
    t = t.append_column(T.XKEY, t["sha256"]).append_column(T.INDEXED, pa.array([False, False]))
    out = T.exact_groups(t, len(cfg.order()))
    assert out[T.DUP_OF].to_pylist() == [None, "a"]
    assert out[T.REASON].to_pylist() == [None, "dedup:exact"]
    assert T.XKEY not in out.column_names


def test_exact_group_defers_to_an_index_entry_from_an_earlier_run():
    cfg = SelectConfig()
    t = _narrow(_rows()[:1], cfg)
    t = t.append_column(T.XKEY, t["sha256"]).append_column(T.INDEXED, pa.array([False]))
    idx = T.conform(pa.table({"key": ["old"], T.XKEY: ["s1"], T.RID: pa.array([-1], pa.int64()),
                              T.INDEXED: [True]}), t.schema)
    out = T.exact_groups(pa.concat_tables([idx, t]), len(cfg.order()))
    assert out.num_rows == 1  # the index entry is not a row of this run
    assert out[T.DUP_OF].to_pylist() == ["old"]


def test_exact_groups_settle_many_keys_in_one_call_as_each_key_alone():
    cfg = SelectConfig()
    rng = np.random.default_rng(3)
    rows = [{"key": f"k{i:03d}", "sha256": f"s{rng.integers(0, 40)}", "phash": 0,
             "clip_score": float(rng.uniform()), "text_lang": "en", "width": 1, "height": 1} for i in range(200)]
    t = _narrow(rows, cfg)
    t = t.append_column(T.XKEY, t["sha256"]).append_column(T.INDEXED, pa.array([False] * 200))
    together = T.exact_groups(t, len(cfg.order()))
    alone = {}
    for sha in set(t["sha256"].to_pylist()):
        g = T.exact_groups(t.filter(pa.compute.equal(t["sha256"], sha)), len(cfg.order()))
        alone.update(zip(g["key"].to_pylist(), g[T.DUP_OF].to_pylist()))
    assert dict(zip(together["key"].to_pylist(), together[T.DUP_OF].to_pylist())) == alone
    assert sum(d is not None for d in alone.values()) == 200 - len(set(t["sha256"].to_pylist()))


def test_survivor_choice_does_not_depend_on_row_order():
    cfg = SelectConfig(survivor_order=["-clip_score"])
    rows = [{"key": k, "sha256": "s", "phash": 0, "clip_score": 0.5, "text_lang": "en", "width": 1, "height": 1}
            for k in ("z", "m", "a")]
    winners = set()
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        t = _narrow([rows[i] for i in perm], cfg)
        t = t.append_column(T.XKEY, t["sha256"]).append_column(T.INDEXED, pa.array([False] * 3))
        out = T.exact_groups(t, 1)
        winners.add(tuple(k for k, r in zip(out["key"].to_pylist(), out[T.REASON].to_pylist()) if r is None))
    assert winners == {("a",)}  # equal scores: the smallest key wins, whatever the order


def test_connected_components_merge_chains_and_ignore_edge_order():
    u, v = np.array([3, 1, 5]), np.array([4, 2, 4])
    labels = graph.connected_components(7, u, v)
    assert labels.tolist() == [0, 1, 1, 3, 3, 3, 6]
    assert graph.connected_components(7, v[::-1], u[::-1]).tolist() == labels.tolist()


def test_phash_pairs_find_every_pair_within_k_and_no_other():
    rng = np.random.default_rng(0)
    hashes = rng.integers(-2**63, 2**63 - 1, size=40, dtype=np.int64)
    hashes[5] = hashes[4] ^ 0b111  # 3 bits apart
    hashes[6] = hashes[4]          # identical
    a, b = graph.phash_pairs(hashes, 3)
    brute = {(i, j) for i in range(40) for j in range(i + 1, 40)
             if bin((int(hashes[i]) ^ int(hashes[j])) & (2**64 - 1)).count("1") <= 3}
    labels = graph.connected_components(40, a, b)
    assert all(labels[i] == labels[j] for i, j in brute)  # identical hashes are chained, not paired
    assert labels[4] == labels[5] == labels[6]
    assert len(set(labels.tolist())) == 40 - 2


def test_phash_signatures_put_near_hashes_in_a_shared_bucket():
    cfg = SelectConfig()
    rows = [{"key": k, "sha256": k, "phash": h, "clip_score": 0.5, "text_lang": "en", "width": 1, "height": 1}
            for k, h in (("a", 0x00FF00FF00FF00FF), ("b", 0x00FF00FF00FF00FE ^ (1 << 40)), ("c", -1))]
    sigs = T.phash_signatures(_narrow(rows, cfg), 4)
    by_sig: dict[int, set[int]] = {}
    for s, r in zip(sigs["_sig"].to_pylist(), sigs[T.RID].to_pylist()):
        by_sig.setdefault(s, set()).add(r)
    assert any(g == {0, 1} for g in by_sig.values())
    assert not any(2 in g and len(g) > 1 for g in by_sig.values())


def _bucket_edges(t: pa.Table, k: int) -> set[tuple[int, int]]:
    """Signatures -> group by ``_sig`` -> confirmed pairs, as the select stage does on Ray."""
    sigs = T.phash_signatures(t, k)
    edges = set()
    for sig in set(sigs["_sig"].to_pylist()):
        group = sigs.filter(pa.compute.equal(sigs["_sig"], sig))
        e = T.phash_bucket(group, k)
        edges |= set(zip(e["u"].to_pylist(), e["v"].to_pylist()))
    return edges


def test_phash_window_hashes_link_a_crop_to_its_original_but_never_two_windows():
    cfg = SelectConfig()
    far = [(1 << 63) - 1 - i * 0x0F0F0F0F0F for i in range(9)]
    rows = [
        # "orig": its second window is 2 bits from the crop's full hash
        {"key": "orig", "sha256": "o", "phash": 0x0F0F, "phash_windows": [far[0], 0x00FF_00FF, *far[2:]]},
        {"key": "crop", "sha256": "c", "phash": 0x00FF_00FF ^ 0b11, "phash_windows": far},
        # shares a window with "crop" exactly, but its full hash is far from everything
        {"key": "corner", "sha256": "x", "phash": 0x5555_5555_5555, "phash_windows": [far[0]] * 9},
        {"key": "old", "sha256": "y", "phash": 0x0F0F ^ 0b1, "phash_windows": None},  # annotated without windows
    ]
    for r in rows:
        r.update(clip_score=0.5, width=8, height=8)
    t = T.narrow(pa.Table.from_pylist(rows), 0, cfg, ["key", "sha256", "phash", T.WINDOWS])
    rid = dict(zip(t["key"].to_pylist(), t[T.RID].to_pylist()))
    edges = _bucket_edges(t, 6)
    assert edges == {(rid["orig"], rid["crop"]), (rid["orig"], rid["old"])}
    # without the window column only full hashes meet: the crop is missed
    assert _bucket_edges(t.drop_columns([T.WINDOWS]), 6) == {(rid["orig"], rid["old"])}


def test_components_decisions_choose_one_survivor_per_group():
    cfg = SelectConfig(survivor_order=["-clip_score"])
    nodes = pa.table({T.RID: pa.array([10, 11, 12, 20, 21], pa.int64()), "key": ["k10", "k11", "k12", "k20", "k21"],
                      "_o0": [-0.1, -0.9, -0.5, -0.2, -0.2], T.INDEXED: [False] * 5})
    edges = pa.table({"u": pa.array([10, 11, 20], pa.int64()), "v": pa.array([11, 12, 21], pa.int64())})
    dec = T.components_decisions(edges, nodes, "phash", len(cfg.order()))
    assert dict(zip(dec[T.RID].to_pylist(), dec[T.DUP_OF].to_pylist())) == {10: "k11", 12: "k11", 21: "k20"}


def test_top_fraction_cut_is_exact_per_group_across_blocks():
    # Two sorted blocks of one language group: 10 alive rows, top 30% keeps exactly 3.
    def block(keys):
        return pa.table({"g": ["en"] * len(keys), "key": keys, T.REASON: pa.nulls(len(keys), pa.string())})

    b1, b2 = block([f"k{i}" for i in range(4)]), block([f"k{i}" for i in range(4, 10)])
    counts = [T.top_fraction_counts(b, "g") for b in (b1, b2)]
    assert counts == [[("en", 4)], [("en", 6)]]
    keep = {"en": T.top_fraction_keep(10, 0.3)}
    out1 = T.top_fraction_cut(b1, "g", {"en": 0}, keep, "select:top")
    out2 = T.top_fraction_cut(b2, "g", {"en": 4}, keep, "select:top")
    kept = [k for o in (out1, out2) for k, r in zip(o["key"].to_pylist(), o[T.REASON].to_pylist()) if r is None]
    assert kept == ["k0", "k1", "k2"]


def test_semantic_group_links_near_identical_embeddings_only():
    cfg = SelectConfig(survivor_order=["-clip_score"])
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.array(
        [[1, 0, 0], [0.999, 0.04, 0], [0, 1, 0]], dtype=np.float16).reshape(-1)), 3)
    t = pa.table({"key": ["a", "b", "c"], "_o0": [-0.2, -0.9, -0.5], T.RID: pa.array([0, 1, 2], pa.int64()),
                  T.REASON: pa.nulls(3, pa.string()), T.DUP_OF: pa.nulls(3, pa.string()),
                  T.METHOD: pa.nulls(3, pa.string()), "emb": emb, T.CLUSTER: pa.array([0, 0, 0], pa.int32()),
                  T.INDEXED: [False] * 3})
    out = T.semantic_group(t, "semantic", "emb", 0.01, len(cfg.order()))
    assert out[T.DUP_OF].to_pylist() == ["b", None, None]
    assert out[T.METHOD].to_pylist() == ["semantic", None, None]


def test_kmeans_is_deterministic_and_assigns_to_nearest():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal([5, 0], 0.1, (50, 2)), rng.normal([0, 5], 0.1, (50, 2))])
    c1, c2 = graph.kmeans_fit(x, 2, seed=3), graph.kmeans_fit(x, 2, seed=3)
    assert np.array_equal(c1, c2)
    a = graph.kmeans_assign(x, c1)
    assert len(set(a[:50].tolist())) == 1 and len(set(a[50:].tolist())) == 1 and a[0] != a[50]


def test_apply_decisions_touches_only_alive_rows():
    cfg = SelectConfig()
    t = _narrow(_rows(), SelectConfig.model_validate({"rules": ["clip_score >= 0.5"]}))
    dec = pa.table({T.RID: pa.array([0, 1], pa.int64()), T.DUP_OF: ["x", "y"], T.METHOD: ["phash", "phash"]})
    out = T.apply_decisions(t, dec)
    assert out[T.REASON].to_pylist() == ["dedup:phash", "select:clip_score>=0.5", "select:clip_score>=0.5"]
    assert out[T.DUP_OF].to_pylist() == ["x", None, None]
    assert cfg.order()  # default order exists


def test_phash_buckets_in_one_call_give_the_components_of_each_bucket_alone():
    # Many LSH buckets in one shuffle bucket: small ones are paired by array offsets, large ones
    # (over SMALL_BUCKET, here a cluster of equal and near hashes) one by one; the components
    # must be those of calling phash_bucket on each bucket separately.
    cfg = SelectConfig()
    rng = np.random.default_rng(11)
    base = rng.integers(-2**63, 2**63 - 1, size=60, dtype=np.int64)
    rows = []
    for i in range(300):
        h = int(base[i % 60]) ^ int(1 << int(rng.integers(0, 63))) if i >= 60 else int(base[i])
        if i % 3 == 0:
            h = int(base[0])  # a large bucket of one picture
        wins = [int(x) for x in rng.integers(-2**63, 2**63 - 1, size=9, dtype=np.int64)]
        if i % 5 == 0:
            wins[3] = int(base[(i + 1) % 60]) ^ 0b101  # a window near another picture
        if i % 11 == 0:
            wins[5] = 0x1234_5678_9ABC ^ i  # windows near each other only: must never link
        rows.append({"key": f"k{i:03d}", "sha256": f"s{i}", "phash": h, "phash_windows": wins,
                     "clip_score": 0.5, "width": 8, "height": 8})
    t = T.narrow(pa.Table.from_pylist(rows), 0, cfg, ["key", "sha256", "phash", T.WINDOWS])
    k = 6
    sigs = T.phash_signatures(t, k)
    sizes = pa.compute.value_counts(sigs["_sig"]).field("counts").to_numpy()
    assert sizes.max() > T.SMALL_BUCKET and ((sizes >= 2) & (sizes <= T.SMALL_BUCKET)).any()
    together = T.phash_buckets(sigs, k)
    rids = np.sort(t[T.RID].to_numpy())

    def components(u, v):
        labels = graph.connected_components(len(rids), np.searchsorted(rids, u), np.searchsorted(rids, v))
        return {frozenset(rids[labels == lab].tolist()) for lab in set(labels.tolist())}

    alone = _bucket_edges(t, k)
    au, av = (np.array(x, np.int64) for x in zip(*alone))
    assert components(together["u"].to_numpy(), together["v"].to_numpy()) == components(au, av)
    assert len(components(au, av)) < len(rids) - 50  # plenty of links to compare
