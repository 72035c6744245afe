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

The traversal is inherently sequential per query (each pop depends on the previous ones), so it
is vectorised across queries: a batch advances in lock-step, one pop per query per step.
Because each row's list is sorted by similarity, a query's best candidate is the best head
among the lists of its expanded rows, each read from a pointer that skips rows already taken (a
k-way merge; no heap); heads are kept between steps and moved only where the row just taken was
a head. Work per query is bounded: at most 2p steps (a pop, or the end of an exploit round), each
an argmax over p + 1 heads, and each list's pointer moves at most k times: O(p^2 + p k) per query
(p = k = 100: ~2 10^4 operations). Measured (bench/README.md, graph_rerank; numpy, 2 shared
cores, t = inf, k = p = 100): 0.6 ms per query over a 10k index, 5.8 ms over a 1M one.
Memory per batch: a [batch, N] bool of taken rows (kept at <= 64 MB: 88 queries per batch at
N = 762k) and [batch, p + 1] pointers and heads.

Deviations: the released getSymmetric (called with skip = number of queries) is meant to add
reverse edges among index rows but stores each one under the wrong key, so at most one survives
per row; the Landmark2019 winners' re-implementation (`explore_exploit` in src/reranking.py of
lyakaap/Landmark2019-1st-and-3rd-Place-Solution at 0cb407da429f5bbdb86cd691180a901980ea4bf1) uses
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
    b = len(qids)
    r = np.arange(b)
    out = np.full((b, p), -1, np.int64)
    count = np.zeros(b, np.int64)
    # Expanded lists per query: slot 0 is the query's own list, slots 1.. the rows taken.
    lists = _Lists(qids, qsims, gids, gsims, p, taken)
    exploring = np.ones(b, bool)  # next pop is a round's first (taken whatever its weight)
    done = np.zeros(b, bool)
    while not done.all():
        best = np.argmax(lists.head_w, axis=1)
        w, u = lists.head_w[r, best], lists.head_ids[r, best]
        has = np.isfinite(w)
        done |= exploring & ~has  # a round starts with no candidate: the traversal is over
        pop = ~done & has & (exploring | (w > threshold))
        # Exploit found nothing above t: the round ends, the rows it popped are expanded.
        end_round = ~done & ~pop
        lists.expand(end_round)
        exploring |= end_round
        rows = np.flatnonzero(pop)
        out[rows, count[rows]] = u[rows]
        taken[rows, u[rows]] = True
        lists.nodes[rows, count[rows] + 1] = u[rows]
        count[rows] += 1
        exploring[rows] = False
        lists.advance_past(rows, u[rows])
        done |= count >= p
    return out


class _Lists:
    """Per query, the neighbour lists of its expanded rows, each with a pointer to its first
    row not taken yet ("head"); heads are kept between steps and moved only where a pop or an
    expansion changed them, so a step costs O(lists touched), not O(p) per query."""

    def __init__(self, qids, qsims, gids, gsims, p, taken):
        b = len(qids)
        self.q, self.g, self.taken = (qids, qsims), (gids, gsims), taken
        self.nodes = np.full((b, p + 1), -1, np.int64)  # slot 0: the query itself
        self.ptr = np.zeros((b, p + 1), np.int64)
        self.live = np.zeros((b, p + 1), bool)
        self.head_ids = np.full((b, p + 1), -1, np.int64)
        self.head_w = np.full((b, p + 1), -np.inf)
        self.live[:, 0] = True
        self._refresh(np.arange(b), np.zeros(b, np.int64))

    def expand(self, rows_mask: np.ndarray) -> None:
        """The rows popped in these queries' round become live lists."""
        bi, si = np.nonzero(rows_mask[:, None] & (self.nodes >= 0) & ~self.live)
        self.live[bi, si] = True
        self._refresh(bi, si)

    def advance_past(self, rows: np.ndarray, u: np.ndarray) -> None:
        """Live lists of these queries whose head is the row just taken move on."""
        bi, si = np.nonzero(self.head_ids[rows] == u[:, None])
        self._refresh(rows[bi], si)

    def _refresh(self, bi: np.ndarray, si: np.ndarray) -> None:
        while len(bi):
            ids, w = self._read(bi, si)
            self.head_ids[bi, si], self.head_w[bi, si] = ids, w
            stale = (ids >= 0) & self.taken[bi, np.maximum(ids, 0)]
            bi, si = bi[stale], si[stale]
            self.ptr[bi, si] += 1

    def _read(self, bi, si):
        """(id, weight) at each list's pointer; (-1, -inf) past its end or on a missing id."""
        at = self.ptr[bi, si]
        query = si == 0
        ids = np.full(len(bi), -1, np.int64)
        w = np.full(len(bi), -np.inf)
        for sel, (lid, lw), src in ((query, self.q, bi), (~query, self.g, self.nodes[bi, si])):
            ok = sel & (at < lid.shape[1])
            ids[ok] = np.asarray(lid[src[ok], at[ok]], np.int64)
            w[ok] = np.asarray(lw[src[ok], at[ok]], np.float64)
        w[ids < 0] = -np.inf
        return ids, w
