"""Per-class similarity graphs and connected components, vectorised (numpy + faiss, no scipy).

Work is bounded per class: a class of n images costs O(n * min(n, k) * D) through faiss' exact
kNN restricted to that class, never a similarity matrix over the whole set. Small classes (the
bulk of GLDv2: median ~10 images) are batched: all classes padded to the same power-of-two size
go through one batched matrix product, so 200k classes cost a few hundred numpy calls.
"""

from __future__ import annotations

import faiss
import numpy as np

# Classes up to this size are handled in padded batches; larger ones one by one with faiss.
DENSE_MAX = 128
# Floats in one batched similarity block (G x P x P): 16M = 64 MiB.
_BLOCK_FLOATS = 1 << 24


def class_segments(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For int[N] labels sorted ascending: (class ids [G], start offsets [G], sizes [G])."""
    if classes.size and np.any(classes[1:] < classes[:-1]):
        raise ValueError("classes must be sorted")
    uniq, starts, sizes = np.unique(classes, return_index=True, return_counts=True)
    return uniq, starts, sizes


def within_class_edges(
    x: np.ndarray, starts: np.ndarray, sizes: np.ndarray, k: int, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges i -> j (i != j, same class) for j among i's k most similar images of its
    class with cosine >= threshold.

    Args:
      x: float32[N, D] unit rows, grouped by class (class g is rows starts[g]:starts[g]+sizes[g]).
      starts, sizes: int[G] class segments.
      k: neighbours per image (within its class).
      threshold: minimum cosine of an edge.

    Returns:
      (src int64[E], dst int64[E]) row indices into x.
    """
    src, dst = [], []
    small = sizes <= DENSE_MAX
    padded = np.maximum(2, 1 << np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64))
    for p in np.unique(padded[small & (sizes >= 2)]):
        members = np.flatnonzero(small & (sizes >= 2) & (padded == p))
        chunk = max(1, _BLOCK_FLOATS // int(p * max(p, x.shape[1])))
        for c in range(0, len(members), chunk):
            s, d = _dense_edges(x, starts[members[c:c + chunk]], sizes[members[c:c + chunk]],
                                int(p), k, threshold)
            src.append(s)
            dst.append(d)
    for g in np.flatnonzero(~small):
        s, d = _faiss_edges(x, int(starts[g]), int(sizes[g]), k, threshold)
        src.append(s)
        dst.append(d)
    if not src:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(src), np.concatenate(dst)


def _dense_edges(x, starts, sizes, p, k, threshold):
    """Classes padded to p rows, similarities by one batched product [G, p, p]."""
    offsets = np.arange(p)[None, :]
    valid = offsets < sizes[:, None]  # [G, p]
    rows = np.where(valid, starts[:, None] + offsets, 0)
    xs = x[rows]  # [G, p, D]
    sims = np.einsum("gpd,gqd->gpq", xs, xs)
    mask = valid[:, :, None] & valid[:, None, :] & ~np.eye(p, dtype=bool)[None]
    sims = np.where(mask, sims, -np.inf)
    kk = min(k, p - 1)
    if kk < p - 1:  # keep only each row's top k; the rest cannot be edges
        top = np.argpartition(-sims, kk - 1, axis=2)[:, :, :kk]
        keep = np.zeros_like(mask)
        np.put_along_axis(keep, top, True, axis=2)
        sims = np.where(keep, sims, -np.inf)
    g, i, j = np.nonzero(sims >= threshold)
    return rows[g, i].astype(np.int64), rows[g, j].astype(np.int64)


def _faiss_edges(x, start, size, k, threshold):
    """One large class: exact kNN within it (faiss, blocked: memory O(size * k))."""
    xc = np.ascontiguousarray(x[start:start + size])
    kk = min(k + 1, size)
    scores, ids = faiss.knn(xc, xc, kk, metric=faiss.METRIC_INNER_PRODUCT)
    i = np.repeat(np.arange(size), kk)
    j, s = ids.ravel(), scores.ravel()
    keep = (j >= 0) & (j != i) & (s >= threshold)
    return i[keep] + start, j[keep] + start


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label (its smallest member) per node, int64[n], edges taken as undirected.

    Shiloach-Vishkin style: hook each root onto the smallest root it touches, then compress
    paths by pointer jumping; O(log n) rounds of vectorised passes over the edges.
    """
    labels = np.arange(n, dtype=np.int64)
    while src.size:
        ls, ld = labels[src], labels[dst]
        low = np.minimum(ls, ld)
        new = labels.copy()
        np.minimum.at(new, ls, low)
        np.minimum.at(new, ld, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def largest_component_mask(classes: np.ndarray, components: np.ndarray) -> np.ndarray:
    """bool[N]: the members of each class's largest component (ties: smallest label).

    classes, components: int[N]; a component never spans two classes.
    """
    sizes = np.bincount(components, minlength=len(components))[components]
    # Per class, the first row in (class, -size, label) order names the winning component.
    order = np.lexsort((components, -sizes, classes))
    first = np.ones(len(order), bool)
    first[1:] = classes[order][1:] != classes[order][:-1]
    winner = np.empty(len(classes), np.int64)
    winner[order] = components[order][first][np.cumsum(first) - 1]
    return components == winner


def cross_class_quantile(
    x: np.ndarray, classes: np.ndarray, quantile: float, samples: int = 200_000, seed: int = 0
) -> float:
    """The `quantile` of cosine similarity between random images of different classes.

    An edge at this threshold means "more alike than `quantile` of pairs of different
    landmarks", which holds for any embedding model without tuning a raw cosine.
    """
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(x), samples)
    j = rng.integers(0, len(x), samples)
    keep = classes[i] != classes[j]
    if not keep.any():
        return 1.0
    sims = np.einsum("nd,nd->n", x[i[keep]], x[j[keep]])
    return float(np.quantile(sims, quantile))
