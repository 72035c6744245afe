"""SuperGlobal re-ranking (Shao et al., "Global Features are All You Need for Image Retrieval and
Reranking", ICCV 2023): training-free re-ordering of each query's top-M shortlist by global
descriptors only.

Follows the authors' released code, ShihaoShao-GH/SuperGlobal at commit
86946964b907e6f28a7264add2c15640fae30009, modules/reranking/MDescAug.py and RerankwMDA.py
(M = 400, K = 9 + 1, beta = 0.15):

1. Refinement (MDescAug). X = the query's top-M database vectors in their initial order. Within
   the shortlist, each x_i takes its K nearest shortlist members by x_i . x_j (itself included,
   normally first) with weights 1 for the first and beta * (x_i . x_j) for the other K - 1
   (similarities as they are, negative ones included), and becomes the weighted mean
   d~_i = sum_j w_ij x_j / sum_j w_ij (not re-normalised).
2. Scoring (RerankwMDA). q~ = elementwise max of the K refined vectors d~ with the highest q . d~
   (the query itself is not part of it); each shortlist member scores (q . d~_i + q~ . d~_i) / 2
   and the shortlist is re-sorted by it; the rest of the ranking stays behind it, as it was.
   (RerankwMDA also scales the top-K scores by beta into a variable it never reads: no effect.)

Deviations, each because the released code cannot run there: a shortlist shorter than M (a small
index, IVF misses marked -1) takes what there is, missing members get weight 0 and sort last, and
K is clipped to the shortlist. The code ran all queries at once on a GPU (70 x 400 x 400 x 2048)
with a Python loop over queries; here queries go in blocks through faiss and in chunks through
NumPy, so memory stays bounded at GLDv2 size (100k queries x a 762k index).
"""

from __future__ import annotations

import numpy as np

from landmark_tf.retrieval.knn import Searcher

NAME = "superglobal"
SHORTLIST = 400
NEIGHBOURS = 10  # K + 1 of the code: 9 neighbours + the vector itself
BETA = 0.15
_SEARCH_BLOCK = 8192  # queries per faiss call: large batches keep flat search fast
_CHUNK_BYTES = 256 << 20  # NumPy working set of one chunk of queries


def split_method(method: str) -> tuple[str, bool]:
    """'superglobal+dba+aqe' -> ('dba+aqe', True); 'aqe' -> ('aqe', False)."""
    parts = [p for p in method.split("+") if p]
    rest = "+".join(p for p in parts if p != NAME)
    return (rest or "none"), NAME in parts


def rerank_shortlists(
    queries: np.ndarray, ids: np.ndarray, database, *, neighbours: int = NEIGHBOURS,
    beta: float = BETA,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-orders each query's shortlist; returns (ids int64[Q, M], scores float32[Q, M]).

    Args:
      queries: float32[Q, D], unit rows (the vectors the shortlists were searched with).
      ids: int64[Q, M] database rows, best first; -1 = missing (scored -inf, kept last).
      database: a Searcher (vectors gathered from its faiss index), float32[N, D], or a
        function int64[...] rows -> float32[..., D] (called with -1 masked to 0).
      neighbours: K, the shortlist neighbours of each member (itself included) and the refined
        vectors whose maximum is q~.
      beta: weight factor of the neighbours' similarities.
    """
    if isinstance(database, Searcher):
        gather = database.vectors
    elif callable(database):
        gather = database
    else:
        def gather(rows):
            return np.asarray(database)[np.maximum(rows, 0)]
    q_count, m = ids.shape
    out_ids = np.empty_like(ids)
    out_scores = np.empty((q_count, m), np.float32)
    if q_count == 0 or m == 0:
        return out_ids, out_scores
    dim = queries.shape[1]
    step = max(1, _CHUNK_BYTES // (m * dim * 4 * 2 + m * m * 16))
    for s in range(0, q_count, step):
        e = min(s + step, q_count)
        x = np.asarray(gather(ids[s:e]), np.float32)  # [c, M, D]
        scores = _score_chunk(np.asarray(queries[s:e], np.float32), x, ids[s:e] >= 0,
                              neighbours, beta)
        order = np.argsort(-scores, axis=1, kind="stable")
        out_ids[s:e] = np.take_along_axis(ids[s:e], order, axis=1)
        out_scores[s:e] = np.take_along_axis(scores, order, axis=1)
    return out_ids, out_scores


def _score_chunk(q: np.ndarray, x: np.ndarray, valid: np.ndarray, neighbours: int,
                 beta: float) -> np.ndarray:
    """(q . d~ + q~ . d~) / 2 for one chunk: q [c, D], x [c, M, D], valid bool[c, M] -> [c, M].

    d~ is linear in x, so v . d~_i = sum_j w_ij (v . x_j) / sum_j w_ij: the scores need the
    refined vectors only for the K members that make q~, not all M (M x D per query saved
    twice over; the M x M x D shortlist Gram matrix is the one big product).
    """
    c, m, _ = x.shape
    x[~valid] = 0.0
    k = max(1, min(int(neighbours), m))
    sims = np.matmul(x, x.transpose(0, 2, 1))  # [c, M, M]
    sims[np.broadcast_to(~valid[:, None, :], sims.shape)] = -np.inf
    nbr, nbr_sims = _top(sims, k)  # [c, M, k], best first
    del sims
    weights = np.where(np.isfinite(nbr_sims), beta * nbr_sims, 0.0).astype(np.float32)
    weights[..., 0] = 1.0
    total = weights.sum(axis=-1)
    total = np.where(np.abs(total) > 1e-12, total, 1.0)

    def refined_dot(v):  # v [c, D] -> v . d~_i for every member: [c, M]
        vx = np.einsum("cd,cmd->cm", v, x)
        picked = np.take_along_axis(vx, nbr.reshape(c, -1), axis=1).reshape(c, m, k)
        return np.einsum("cmk,cmk->cm", weights, picked) / total

    first = refined_dot(q)
    first[~valid] = -np.inf
    top, top_scores = _top(first[:, None, :], k)
    top, top_ok = top[:, 0], np.isfinite(top_scores[:, 0])  # [c, k]
    rows = np.arange(c)[:, None, None]
    members = x[rows, np.take_along_axis(nbr, top[..., None], axis=1)]  # [c, k, k, D]
    member_w = np.take_along_axis(weights, top[..., None], axis=1)  # [c, k, k]
    expanded = np.einsum("ckj,ckjd->ckd", member_w, members)
    expanded /= np.take_along_axis(total, top, axis=1)[..., None]
    expanded[~top_ok] = -np.inf
    q_tilde = expanded.max(axis=1)  # [c, D]; at least one member is valid
    second = refined_dot(np.where(np.isfinite(q_tilde), q_tilde, 0.0).astype(np.float32))
    return np.where(valid, (first + second) / 2.0, -np.inf).astype(np.float32)


def _top(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest along the last axis, largest first (ties: lower
    index first, as a stable descending sort gives)."""
    n = values.shape[-1]
    if k < n:
        part = np.argpartition(values, n - k, axis=-1)[..., n - k:]
    else:
        part = np.broadcast_to(np.arange(n), values.shape)
    part_values = np.take_along_axis(values, part, axis=-1)
    order = np.lexsort((part, -part_values), axis=-1)
    idx = np.take_along_axis(part, order, axis=-1)
    return idx, np.take_along_axis(part_values, order, axis=-1)


def search(
    searcher: Searcher, queries: np.ndarray, k: int, *, shortlist: int = SHORTLIST,
    neighbours: int = NEIGHBOURS, beta: float = BETA,
) -> tuple[np.ndarray, np.ndarray]:
    """Searches the top max(k, shortlist) and re-ranks them, query block by query block.

    Returns (re-ranked ids int64[Q, k'], plain top-k ids int64[Q, k']) with k' = min(k, N): the
    second is what the search alone gave (IVF recall checks compare it with exact search).
    Memory: one block's [block, shortlist] results and one chunk's working set, besides the output.
    """
    k = min(int(k), searcher.size)
    depth = max(k, int(shortlist))
    reranked = np.empty((len(queries), k), np.int64)
    plain = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), _SEARCH_BLOCK):
        q = queries[s:s + _SEARCH_BLOCK]
        _, ids = searcher.search(q, depth)
        plain[s:s + len(q)] = ids[:, :k]
        head, _ = rerank_shortlists(q, ids[:, :shortlist], searcher, neighbours=neighbours,
                                    beta=beta)
        reranked[s:s + len(q)] = np.concatenate([head, ids[:, shortlist:]], axis=1)[:, :k]
    return reranked, plain


def rerank_ranking(
    ranks: np.ndarray, queries: np.ndarray, searcher: Searcher, db_rows: np.ndarray, *,
    shortlist: int = SHORTLIST, neighbours: int = NEIGHBOURS, beta: float = BETA,
) -> np.ndarray:
    """The same on full rankings (revisitop's layout): ranks int64[N', Q] of positions into
    `db_rows` (searcher rows); the top `shortlist` of each column are re-ordered, the rest kept."""
    m = min(int(shortlist), len(ranks))
    db_rows = np.asarray(db_rows, np.int64)
    head, _ = rerank_shortlists(queries, np.ascontiguousarray(ranks[:m].T),
                                lambda pos: searcher.vectors(db_rows[np.maximum(pos, 0)]),
                                neighbours=neighbours, beta=beta)
    out = ranks.copy()
    out[:m] = head.T
    return out
