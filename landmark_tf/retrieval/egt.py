"""Explore-Exploit Graph Traversal (Chang, Yu, Liu, Volkovs, "Explore-Exploit Graph Traversal
for Image Retrieval", CVPR 2019), as in the authors' released code: layer6ai-labs/EGT,
src/main/java/EGTImpl.java `prim` (called by EGT.java as primPaperEfficient(q, p, t, online))
at commit d49eae0d723f8dcf8e6f8eee1ba450ef1b0895fa, and python/egt.py for the graph.

The graph: every index row's k nearest index rows with their similarities (getSubgraph(k) of
the prebuilt lists; knn_graph.py), the query linked to its own top-k index rows; queries are
never neighbours of anything. The traversal from the query builds the ranked list Q (at most p
rows): a candidate's weight is its best edge from an already expanded row. Each round pops the
best candidate (explore), then keeps popping while the next best weight is above t (exploit);
only then are the popped rows expanded, i.e. their edges become candidates. With t = inf every
round pops one row: the order in which Prim's algorithm grows a maximum spanning tree from the
query (the Landmark2019 table's "EGT (t=inf, k=100)").

Vectorised over queries: a batch advances in lock-step, one pop per query per step. Because each
row's list is sorted by similarity, a query's best candidate is the best head among the lists of
its expanded rows, each read from a pointer that skips rows already taken (a k-way merge; no
heap). Work per query is bounded: at most 2p steps, each over at most p + 1 lists, and a pointer
moves at most k times per list: O(p (p + k)) per query. Memory per batch: a [batch, N] bool of
taken rows (kept at <= 64 MB) and [batch, p + 1] pointers.

Deviations: the released getSymmetric (called with skip = number of queries) is meant to add
reverse edges among index rows but stores each one under the wrong key, so at most one survives
per row; the Landmark2019 winners' re-implementation (src/reranking.py `explore_exploit`) uses
the plain directed lists; we use the directed lists too. Ties between equal weights go to the
list of the row expanded first (Java: the entry pushed first). Python egt.py writes weights as
int(cosine * 1e6); we keep the float cosine, so t is a cosine (t = 0.42 there is -t 420000).
"""

from __future__ import annotations

import numpy as np

from landmark_tf.errors import UserError

NAME = "egt"
_TAKEN_BYTES = 1 << 26  # [batch, N] bool of rows already taken, per batch


def check_params(k: int, p: int) -> None:
    if k < 1 or p < 1:
        raise UserError(f"--egt_k and --k (the list length p) must be >= 1, got {k}, {p}")


def traverse(
    query_ids: np.ndarray,
    query_sims: np.ndarray,
    graph_ids: np.ndarray,
    graph_sims: np.ndarray,
    p: int,
    threshold: float = np.inf,
) -> np.ndarray:
    """The EGT ranking of every query.

    Args:
      query_ids: int64[Q, k] each query's top-k index rows, best first (-1: missing).
      query_sims: float32[Q, k] their similarities.
      graph_ids: int[N, k] each index row's top-k index rows sorted by similarity (it may list
        itself; -1: missing); graph_sims: float32[N, k] (memory-mapped arrays are fine).
      p: ranked-list length; threshold: t, the exploit threshold on similarity.

    Returns:
      int64[Q, p]: index rows in the order EGT takes them, -1 padded when the graph runs out.
    """
    q = len(query_ids)
    n = len(graph_ids)
    batch = max(1, min(q, _TAKEN_BYTES // max(n, 1)))
    out = np.full((q, p), -1, np.int64)
    taken = np.zeros((min(batch, max(q, 1)), n), bool)
    for s in range(0, q, batch):
        e = min(s + batch, q)
        out[s:e] = _traverse_batch(query_ids[s:e], query_sims[s:e], graph_ids, graph_sims, p,
                                   threshold, taken[: e - s])  # fmt: skip
        rows = np.repeat(np.arange(e - s), p)
        got = out[s:e].ravel()
        taken[rows[got >= 0], got[got >= 0]] = False  # reset only what this batch set
    return out


def _traverse_batch(qids, qsims, gids, gsims, p, threshold, taken) -> np.ndarray:
    b, kq = qids.shape
    kg = gids.shape[1]
    r = np.arange(b)
    out = np.full((b, p), -1, np.int64)
    count = np.zeros(b, np.int64)
    # Expanded lists per query: slot 0 is the query's own list, slots 1.. the rows taken.
    nodes = np.full((b, p + 1), -1, np.int64)
    ptr = np.zeros((b, p + 1), np.int64)
    live = np.zeros((b, p + 1), bool)  # expanded (its edges are candidates)
    live[:, 0] = True
    exploring = np.ones(b, bool)  # next pop is a round's first (taken whatever its weight)
    done = np.zeros(b, bool)
    while not done.all():
        head_ids, head_w = _heads(qids, qsims, gids, gsims, nodes, ptr, live, taken, kq, kg)
        best = np.argmax(head_w, axis=1)
        w, u = head_w[r, best], head_ids[r, best]
        has = np.isfinite(w)
        done |= exploring & ~has  # a round starts with no candidate: the traversal is over
        pop = ~done & has & (exploring | (w > threshold))
        # Exploit found nothing above t: the round ends, the rows it popped are expanded.
        end_round = ~done & ~pop
        live[end_round] |= nodes[end_round] >= 0
        exploring |= end_round
        rows = np.flatnonzero(pop)
        out[rows, count[rows]] = u[rows]
        taken[rows, u[rows]] = True
        nodes[rows, count[rows] + 1] = u[rows]
        count[rows] += 1
        exploring[rows] = False
        done |= count >= p
    return out


def _heads(qids, qsims, gids, gsims, nodes, ptr, live, taken, kq, kg):
    """Each live list's first row not taken yet (pointers advanced past taken rows in place);
    returns (ids int64[b, p+1], weights float64[b, p+1], -inf where a list is exhausted)."""
    b = len(nodes)
    r = np.arange(b)[:, None]
    is_query = np.zeros(nodes.shape, bool)
    is_query[:, 0] = True
    length = np.where(is_query, kq, kg)
    while True:
        ok = live & (ptr < length)
        at = np.minimum(ptr, length - 1)
        node = np.maximum(nodes, 0)
        ids = np.where(
            is_query,
            qids[r, np.minimum(at, kq - 1)],
            np.asarray(gids[node, np.minimum(at, kg - 1)], np.int64),
        )
        ok &= ids >= 0
        stale = ok & taken[np.broadcast_to(r, ids.shape), np.maximum(ids, 0)]
        if not stale.any():
            break
        ptr += stale
    w = np.where(
        is_query,
        qsims[r, np.minimum(at, kq - 1)],
        np.asarray(gsims[node, np.minimum(at, kg - 1)], np.float64),
    )
    return np.where(ok, ids, -1), np.where(ok, w, -np.inf)
