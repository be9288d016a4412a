"""Pure numpy pieces of deduplication: connected components, candidate pairs, survivor order.

No Ray and no I/O here: ``pipelines/select`` calls these inside its Ray Data stages.
"""

from __future__ import annotations

import numpy as np

from operators.dedup.phash import hamming

# Rows compared at once when finding cosine neighbours: a 2048 x 2048 float32 block is 16 MiB,
# small enough for any worker while keeping numpy's matrix product efficient.
COSINE_BLOCK_ROWS = 2048


def connected_components(num_nodes: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Component label of every node: the smallest node index in its component.

    Min-label propagation with pointer jumping; converges in O(log diameter) rounds per merge,
    a handful of rounds for near-duplicate graphs (mostly small stars and cliques).

    Args:
        num_nodes: nodes are ``0..num_nodes-1``.
        u: int array of edge endpoints.
        v: int array of edge endpoints, same length as ``u``.

    Returns:
        int64 array ``[num_nodes]``; equal labels mean the same component, and the label is
        independent of edge order.
    """
    labels = np.arange(num_nodes, dtype=np.int64)
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    if len(u) == 0:
        return labels
    while True:
        low = np.minimum(labels[u], labels[v])
        before = labels.copy()
        np.minimum.at(labels, u, low)
        np.minimum.at(labels, v, low)
        while True:  # pointer jumping: every node points at its label's label
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(before, labels):
            return labels


def phash_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``(i, j)``, ``i < j``, whose hashes are within ``max_distance`` bits.

    Meant for the members of one LSH bucket (small); equal hashes are chained to their first
    occurrence instead of compared all-pairs, so a bucket of a million identical placeholder
    images costs a million edges, not a trillion comparisons.
    """
    hashes = np.asarray(hashes, dtype=np.int64)
    distinct, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    same_i = first[inverse]
    keep = same_i != np.arange(len(hashes))
    us, vs = [same_i[keep]], [np.arange(len(hashes))[keep]]
    if len(distinct) > 1:
        d = hamming(distinct[:, None], distinct[None, :])
        a, b = np.nonzero(np.triu(d <= max_distance, k=1))
        us.append(first[a])
        vs.append(first[b])
    return np.concatenate(us).astype(np.int64), np.concatenate(vs).astype(np.int64)


def phash_window_pairs(hashes: np.ndarray, is_window: np.ndarray,
                       max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` within ``max_distance`` bits where at least one side is a full hash.

    The entries of one LSH bucket are rows' full hashes (``is_window`` False) and rows' window
    hashes (True, see :func:`operators.dedup.phash.phash_with_windows`). A full hash may match a
    full hash or a window; two windows never match each other (that would link pictures that
    only share a corner region). Like :func:`phash_pairs`, equal hashes are chained through one
    representative instead of compared all-pairs: every class of equal hashes that holds a full
    hash gets the first of them as representative, every member of the class and of each close
    class is linked to it, so the edges describe the same components at O(members) cost.
    """
    hashes = np.asarray(hashes, dtype=np.int64)
    is_window = np.asarray(is_window, dtype=bool)
    n = len(hashes)
    empty = np.empty(0, np.int64)
    if n < 2 or is_window.all():
        return empty, empty
    distinct, inverse = np.unique(hashes, return_inverse=True)
    full_idx = np.nonzero(~is_window)[0]
    # representative of each class: its first full member, or -1 when the class holds only windows
    rep = np.full(len(distinct), -1, dtype=np.int64)
    np.minimum.at(rep.view(np.uint64), inverse[full_idx], full_idx.astype(np.uint64))  # -1 as uint64 is max
    members = np.arange(n, dtype=np.int64)
    us, vs = [], []
    own = rep[inverse]
    link = (own >= 0) & (own != members)
    us.append(own[link])
    vs.append(members[link])
    has_full = np.nonzero(rep >= 0)[0]
    if len(has_full) and len(distinct) > 1:
        d = hamming(distinct[has_full][:, None], distinct[None, :])
        ci, cj = np.nonzero(d <= max_distance)
        c_from = has_full[ci]
        close = c_from != cj
        c_from, c_to = c_from[close], cj[close]
        if len(c_from):
            # every member of class c_to links to the representative of class c_from
            order = np.argsort(inverse, kind="stable")
            starts = np.searchsorted(inverse[order], np.arange(len(distinct) + 1))
            counts = starts[c_to + 1] - starts[c_to]
            src = np.repeat(rep[c_from], counts)
            dst = order[np.concatenate([np.arange(starts[c], starts[c + 1]) for c in c_to])]
            us.append(src)
            vs.append(dst)
    u, v = np.concatenate(us), np.concatenate(vs)
    if not len(u):
        return empty, empty
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def cosine_pairs(emb: np.ndarray, min_cosine: float) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``(i, j)``, ``i < j``, with cosine similarity >= ``min_cosine``.

    Exact, computed block by block (``COSINE_BLOCK_ROWS``) so memory stays bounded for a large
    cluster. ``emb`` must already be L2-normalised.
    """
    n = len(emb)
    us, vs = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for start in range(0, n, COSINE_BLOCK_ROWS):
        block = emb[start:start + COSINE_BLOCK_ROWS]
        sims = block @ emb[start:].T
        a, b = np.nonzero(sims >= min_cosine)
        a = a + start
        b = b + start
        keep = a < b
        us.append(a[keep])
        vs.append(b[keep])
    return np.concatenate(us), np.concatenate(vs)


def survivor_rank(sort_columns: list[tuple[np.ndarray, bool]]) -> np.ndarray:
    """Rank of every row under a lexicographic order; rank 0 is the preferred survivor.

    Args:
        sort_columns: ``(values, descending)`` from most to least significant. Values are
            numeric or string arrays without nulls (the caller fills nulls so they sort last).

    Returns:
        int64 ranks ``0..n-1`` (a permutation: the caller's last column must be unique).
    """
    keys = []
    for values, descending in reversed(sort_columns):
        values = np.asarray(values)
        if descending:
            if values.dtype.kind in "iuf":
                values = -values.astype(np.float64) if values.dtype.kind == "f" else -values.astype(np.int64)
            else:  # strings: rank them, then reverse
                _, inv = np.unique(values, return_inverse=True)
                values = -inv
        keys.append(values)
    order = np.lexsort(keys)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def kmeans_fit(x: np.ndarray, k: int, seed: int, iterations: int = 20) -> np.ndarray:
    """Spherical k-means (cosine) on L2-normalised rows; deterministic for a given input order.

    k-means++ seeding from ``numpy.random.default_rng(seed)``, then Lloyd iterations on the
    unit sphere (SemDeDup clusters CLIP embeddings this way).

    Returns:
        float32 centroids ``[min(k, n), D]``, L2-normalised.
    """
    x = normalise_rows(x)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    dist = 1.0 - x @ centroids[0]
    for _ in range(1, k):
        p = np.clip(dist, 0, None)
        total = p.sum()
        idx = rng.choice(n, p=p / total) if total > 0 else rng.integers(n)
        centroids.append(x[idx])
        dist = np.minimum(dist, 1.0 - x @ x[idx])
    c = np.stack(centroids).astype(np.float32)
    for _ in range(iterations):
        assign = np.argmax(x @ c.T, axis=1)
        new = np.zeros_like(c)
        np.add.at(new, assign, x)
        empty = ~new.any(axis=1)
        new[empty] = c[empty]  # an empty cluster keeps its centroid
        new = normalise_rows(new)
        if np.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c


def kmeans_assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (highest cosine) of every row, int32."""
    x = normalise_rows(x)
    return np.argmax(x @ centroids.T, axis=1).astype(np.int32)
