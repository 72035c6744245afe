"""Re-ranking by descriptor expansion: alpha-weighted query expansion (alpha-QE) and
database-side augmentation (DBA), as used by the Google Landmark Retrieval 2019 winners.

Both replace a vector v by normalise(v + sum_j max(s_j, 0)^alpha x_j) over its k nearest
database neighbours x_j with similarities s_j (Radenovic et al., "Fine-tuning CNN image retrieval
with no human annotation", 2018). alpha-QE expands the queries; DBA expands every database vector
with its neighbours inside the database (itself excluded: its own weight is the leading 1).
Neighbours are found by the same index as the main search (flat or IVF) and their vectors are
gathered back out of it, so no second copy of the database is needed.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from landmark_tf.retrieval.knn import Searcher

METHODS = ("none", "aqe", "dba", "dba+aqe")
_CHUNK = 4096  # rows expanded at once: bounds the [chunk, k, D] gather in memory
_DBA_CHUNK = 16384  # database rows searched, expanded and written per step


def expand(
    vectors: np.ndarray,
    neighbour_scores: np.ndarray,
    neighbour_ids: np.ndarray,
    database,
    alpha: float,
) -> np.ndarray:
    """normalise(v + sum_j max(s_j, 0)^alpha database[id_j]) for every row v.

    Args:
      vectors: float32[M, D] rows to expand (unit length).
      neighbour_scores: float32[M, k] similarities; -inf (missing) or <= 0 get weight 0.
      neighbour_ids: int64[M, k] rows of `database`; -1 for missing neighbours.
      database: float32[N, D], or a Searcher (its stored vectors are gathered from faiss).
      alpha: exponent; 0 weights every positive neighbour equally (average QE).

    Returns:
      float32[M, D], L2-normalised.
    """
    gather = database.vectors if isinstance(database, Searcher) else (lambda r: database[r])
    out = np.empty_like(vectors, dtype=np.float32)
    for s in range(0, len(vectors), _CHUNK):
        e = s + _CHUNK
        ids = neighbour_ids[s:e]
        weights = np.where(ids >= 0, np.clip(neighbour_scores[s:e], 0.0, None), 0.0)
        weights = np.where(weights > 0, weights**alpha, 0.0).astype(np.float32)
        gathered = gather(np.maximum(ids, 0))  # [m, k, D]; masked rows carry weight 0
        out[s:e] = vectors[s:e] + np.einsum("mk,mkd->md", weights, gathered)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def alpha_query_expansion(
    queries: np.ndarray, searcher: Searcher, k: int, alpha: float
) -> np.ndarray:
    """Expands each query with its top-k database neighbours (found by `searcher`, flat or IVF,
    and gathered from its index); returns float32[Q, D] unit rows."""
    if k <= 0:
        return queries
    scores, ids = searcher.search(queries, k, desc="alpha-QE search")
    return expand(queries, scores, ids, searcher, alpha)


def augment_database(searcher: Searcher, k: int, alpha: float, *, in_place: bool = False,
                     scratch_dir: str | None = None) -> Searcher:
    """DBA: every database vector expanded with its top-k other database vectors.

    The neighbour search goes through `searcher` itself (IVF stays IVF: no exact N^2 pass) one
    chunk of rows at a time; expanded rows go to a scratch file on disk (N x D float32), then
    replace the index contents (in_place) or fill a new index with the same settings. Peak
    memory: the index, plus a second one only when not in place, plus one chunk.
    """
    if k <= 0:
        return searcher
    with tempfile.TemporaryDirectory(prefix="landmark-dba-", dir=scratch_dir) as tmp:
        path = os.path.join(tmp, "dba.f32")
        with open(path, "wb") as f:
            for s, rows in searcher.chunks(_DBA_CHUNK):
                scores, ids = searcher.search(rows, k + 1)
                scores, ids = _drop_self(scores, ids, first_row=s)
                f.write(expand(rows, scores, ids, searcher, alpha).tobytes())
        n, dim = searcher.size, searcher.dim
        target = searcher if in_place else searcher.empty_like()
        if in_place:
            target.index.reset()
        target.fill(lambda: _file_chunks(path, dim), n)
    return target


def _file_chunks(path: str, dim: int):
    with open(path, "rb") as f:
        start = 0
        while True:
            chunk = np.fromfile(f, np.float32, _DBA_CHUNK * dim)
            if chunk.size == 0:
                return
            yield start, chunk.reshape(-1, dim)
            start += len(chunk) // dim


def database_augmentation(searcher: Searcher, k: int, alpha: float) -> np.ndarray:
    """Expands each database vector with its top-k other database vectors; float32[N, D]."""
    if k <= 0:
        return searcher.database
    return augment_database(searcher, k, alpha).database


def _drop_self(scores: np.ndarray, ids: np.ndarray,
               first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Removes each row's own index (or, if absent, its last neighbour) from k+1 results;
    row r of the arrays is database row first_row + r."""
    rows = first_row + np.arange(len(ids))[:, None]
    is_self = ids == rows
    # Rows that did not find themselves (approximate search, exact duplicates) drop their last.
    is_self[~is_self.any(axis=1), -1] = True
    first = np.argmax(is_self, axis=1)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), first] = False
    k = ids.shape[1] - 1
    return scores[keep].reshape(-1, k), ids[keep].reshape(-1, k)


def rerank_vectors(
    queries: np.ndarray, searcher: Searcher, method: str, k: int, alpha: float,
    *, in_place: bool = False,
) -> tuple[np.ndarray, Searcher]:
    """Applies `method` (one of METHODS); returns (queries to search, searcher to search in).

    in_place=True lets DBA overwrite `searcher`'s index instead of building a second one.
    """
    if method not in METHODS:
        raise ValueError(f"unknown re-ranking {method!r}; expected one of {METHODS}")
    if "dba" in method:
        searcher = augment_database(searcher, k, alpha, in_place=in_place)
    if "aqe" in method:
        queries = alpha_query_expansion(queries, searcher, k, alpha)
    return queries, searcher
