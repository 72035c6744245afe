"""Diffusion re-ranking (Iscen, Tolias, Avrithis, Furon, Chum, "Efficient Diffusion on Region
Manifolds: Recovering Small Objects with Compact CNN Representations", CVPR 2017), global-
descriptor form, as in the authors' released Matlab code: ahmetius/diffusion-retrieval at commit
d54df9690d841d78c04042f8ffe7feddeba2391c (run_test.m, knngraph.m, transition_matrix.m,
trunclap.m, findtrunc.m, ymake.m, dfs.m).

Offline (knn_graph.py, cached): the index's k-NN lists (k = 50 for global descriptors in
run_test.m) and the reciprocal graph A: a_ij = max(s_ij, 0)^gamma when i and j are in each
other's lists, zero diagonal (knngraph.m). Online, per query (the large-scale "truncation" of
run_test.m, trunclap.m): the query's top-n index rows (n = `truncation`) are the sub-graph; its
transition matrix S = D^-1/2 A_sub D^-1/2 uses the sub-graph's own degrees; the seed vector y holds
max(s, 0)^gamma on the query's top-kq rows (ymake.m; kq = 10 for global descriptors); the ranking
is f solving (I - alpha S) f = y by conjugate gradients from f = 0, stopping after `iterations`
steps or at relative residual `tol` (dfs.m: Matlab pcg(A, y, 1e-6, 20), alpha 0.99, gamma 3).
n >= N is the released code's untruncated solve on the whole graph; run_test.m truncates at
n = 10,000 for its 105k-image sets, the default here (1000) is the truncation size of the
Landmark2019 winners' diffusion, which keeps a query's solve in milliseconds.

Vectorised: a batch of queries is one block-diagonal sparse system (scipy.sparse), and CG runs on
all blocks at once with each block's own step sizes and stopping test, so every query gets
exactly the iterates of its own CG; no Python loop over queries.

Deviations: Matlab's pcg returns its minimum-residual iterate when it stops without converging,
we return the last one (as scipy's cg, which the Landmark2019 winners' diffusion code used);
ymake.m takes max(s^gamma, 0), we take max(s, 0)^gamma (the same for odd gamma, the default);
rows that a query's shortlist does not reach keep their search order after the diffused ones.
The Landmark2019 winners' code (src/reranking.py of lyakaap/Landmark2019-1st-and-3rd-Place-
Solution at 0cb407da429f5bbdb86cd691180a901980ea4bf1, from fyang93/diffusion) differs from the
authors' in two ways we do not follow: it diffuses offline from every index image over its
own truncated graph and scores a query as the sum of its kq rows' results, and it slices the
full graph's normalised Laplacian instead of normalising the sub-graph (trunclap.m).

Cost per query: the sub-graph has n rows of at most k neighbours (n k entries gathered and
matched), CG does `iterations` sparse products over them: O(iterations n k); memory per batch
is bounded by `_ENTRY_BUDGET` gathered entries. Measured (bench/README.md, graph_rerank; 2
shared cores, n = 1000): 3-8 ms per query at k = 50 (10k index), 12.7 ms at k = 100 (1M index),
85-106 ms at k = 1000 (10k index: sub-graphs of up to 10^6 edges).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from landmark_tf.errors import UserError
from landmark_tf.retrieval.knn_graph import MutualGraph

NAME = "diffusion"
TOL = 1e-6  # relative residual of dfs.m's pcg
_ENTRY_BUDGET = 1 << 21  # graph entries gathered per batch of queries


def check_params(
    k: int, kq: int, truncation: int, gamma: float, alpha: float, iterations: int
) -> None:
    """UserError naming the flag when a parameter is out of range."""
    if k < 1 or kq < 1 or iterations < 1:
        raise UserError(
            f"--diffusion_k, --diffusion_kq and --diffusion_iterations must be >= 1, "
            f"got {k}, {kq}, {iterations}"
        )
    if truncation < kq:
        raise UserError(f"--diffusion_truncation ({truncation}) must be >= --diffusion_kq ({kq})")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"--diffusion_alpha must be in (0, 1), got {alpha}")
    if not gamma > 0:
        raise UserError(f"--diffusion_gamma must be > 0, got {gamma}")


def diffuse(
    graph: MutualGraph,
    shortlist: np.ndarray,
    sims: np.ndarray,
    *,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    iterations: int = 20,
    tol: float = TOL,
) -> np.ndarray:
    """Re-orders each query's shortlist by diffusion on its sub-graph.

    Args:
      graph: reciprocal k-NN graph of the index (raw cosine on its edges).
      shortlist: int64[Q, n] the query's top-n index rows, best first (-1: missing).
      sims: float32[Q, n] their similarities to the query.

    Returns:
      int64[Q, n]: the shortlist sorted by diffusion score f (descending; ties and rows with
      f = 0 keep search order), -1 slots last.
    """
    q, n = shortlist.shape
    if q == 0 or n == 0:
        return shortlist.copy()
    degree = np.diff(graph.indptr)
    compact = np.full(graph.size, -1, np.int64)
    # The [batch, batch * n] slot table of `subgraph` stays within the entry budget too.
    max_batch = max(1, int(np.sqrt(_ENTRY_BUDGET / n)))
    out = np.empty_like(shortlist)
    b = 0
    while b < q:
        # Queries per batch: their shortlists' neighbour entries stay within the budget.
        counts = degree[np.maximum(shortlist[b : b + max_batch], 0)].sum(axis=1)
        size = max(1, int(np.searchsorted(np.cumsum(counts), _ENTRY_BUDGET, side="right")))
        e = b + size
        f = _solve_batch(graph, shortlist[b:e], sims[b:e], kq, gamma, alpha, iterations, tol,
                         compact)  # fmt: skip
        f = np.where(shortlist[b:e] >= 0, f, -np.inf)
        order = np.argsort(-f, axis=1, kind="stable")
        out[b:e] = np.take_along_axis(shortlist[b:e], order, axis=1)
        b = e
    return out


def seed_vector(sims: np.ndarray, valid: np.ndarray, kq: int, gamma: float) -> np.ndarray:
    """float64[B, n]: max(s, 0)^gamma on each row's first kq valid slots (ymake.m), else 0."""
    rank = np.cumsum(valid, axis=1) - 1
    top = valid & (rank < kq)
    return np.where(top, np.maximum(np.where(valid, sims, 0.0), 0.0), 0.0) ** gamma


def subgraph(
    graph: MutualGraph, shortlist: np.ndarray, gamma: float, compact: np.ndarray | None = None
) -> sp.csr_matrix:
    """Block-diagonal [B n, B n] sparse S = D^-1/2 A D^-1/2 of each query's sub-graph (A's
    entries max(s, 0)^gamma among the shortlist's rows, degrees D of the sub-graph itself).
    `compact`: int64[N] of -1 to reuse between batches (left as it was given)."""
    bsz, n = shortlist.shape
    size = graph.size
    flat = shortlist.ravel()
    local = np.flatnonzero(flat >= 0)  # slot b*n + t of each valid shortlist entry
    rows = flat[local]
    start, length = graph.indptr[rows], np.diff(graph.indptr)[rows]
    first = np.repeat(np.cumsum(length) - length, length)
    pos = np.repeat(start, length) + (np.arange(int(length.sum())) - first)
    cols = np.asarray(graph.indices[pos], np.int64)
    src = np.repeat(local, length)  # nondecreasing: the entries come out in CSR row order
    # Which slot of the same query holds column `cols`: index rows of the batch renumbered
    # 0..u-1 (`compact`, a dense [N] map reset afterwards), then a [B, u] table of slots.
    compact = np.full(size, -1, np.int64) if compact is None else compact
    uniq = np.unique(rows)
    compact[uniq] = np.arange(len(uniq))
    table = np.full((bsz, len(uniq)), -1, np.int64)
    table[local // n, compact[rows]] = local
    cu = compact[cols]
    compact[uniq] = -1
    col = np.full(len(cols), -1, np.int64)
    inside = cu >= 0
    col[inside] = table[src[inside] // n, cu[inside]]
    hit = col >= 0
    src, col = src[hit], col[hit]
    w = np.maximum(np.asarray(graph.sims[pos[hit]], np.float64), 0.0) ** gamma
    deg = np.bincount(src, weights=w, minlength=bsz * n)
    inv = np.zeros_like(deg)
    np.divide(1.0, np.sqrt(deg), out=inv, where=deg > 0)  # isolated rows: no edges, S row 0
    indptr = np.zeros(bsz * n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=bsz * n), out=indptr[1:])
    return sp.csr_matrix((w * inv[src] * inv[col], col, indptr), shape=(bsz * n, bsz * n))


def _solve_batch(graph, shortlist, sims, kq, gamma, alpha, iterations, tol, compact):
    bsz, n = shortlist.shape
    s = subgraph(graph, shortlist, gamma, compact)
    y = seed_vector(sims, shortlist >= 0, kq, gamma).ravel()
    return batched_cg(lambda v: v - alpha * (s @ v), y, bsz, iterations, tol).reshape(bsz, n)


def batched_cg(matvec, y: np.ndarray, blocks: int, iterations: int, tol: float) -> np.ndarray:
    """Conjugate gradients on a block-diagonal SPD system with `blocks` equal blocks: each block
    has its own step sizes and stops on its own relative residual (as one pcg per block).

    Args:
      matvec: float64[B n] -> float64[B n], the block-diagonal product.
      y: float64[B n] right-hand sides, block after block.

    Returns:
      float64[B n]: x after at most `iterations` steps from x = 0.
    """
    per = lambda v: v.reshape(blocks, -1)  # noqa: E731
    x = np.zeros_like(y)
    r = y.copy()
    p = r.copy()
    rs = (per(r) ** 2).sum(axis=1)
    target = tol * np.sqrt(rs)
    active = rs > 0
    for _ in range(iterations):
        if not active.any():
            break
        ap = matvec(p)
        pap = (per(p) * per(ap)).sum(axis=1)
        step = np.zeros(blocks)
        np.divide(rs, pap, out=step, where=active & (pap > 0))
        per(x)[:] += step[:, None] * per(p)
        per(r)[:] -= step[:, None] * per(ap)
        rs_new = (per(r) ** 2).sum(axis=1)
        active &= np.sqrt(rs_new) > target
        beta = np.zeros(blocks)
        np.divide(rs_new, rs, out=beta, where=active & (rs > 0))
        per(p)[:] = per(r) + beta[:, None] * per(p)
        p = np.where(np.repeat(active, len(y) // blocks), p, 0.0)
        rs = rs_new
    return x
