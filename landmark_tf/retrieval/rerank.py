"""Re-ranking by descriptor expansion: alpha-weighted query expansion (alpha-QE) and
database-side augmentation (DBA), as used by the Google Landmark Retrieval 2019 winners.

Both replace a vector v by normalise(v + sum_j max(s_j, 0)^alpha x_j) over its k nearest
database neighbours x_j with similarities s_j (Radenovic et al., "Fine-tuning CNN image retrieval
with no human annotation", 2018). alpha-QE expands the queries; DBA expands every database vector
with its neighbours inside the database (itself excluded: its own weight is the leading 1).
"""

from __future__ import annotations

import numpy as np

from landmark_tf.retrieval.knn import Searcher

METHODS = ("none", "aqe", "dba", "dba+aqe")
_CHUNK = 4096  # rows expanded at once: bounds the [chunk, k, D] gather in memory


def expand(
    vectors: np.ndarray,
    neighbour_scores: np.ndarray,
    neighbour_ids: np.ndarray,
    database: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """normalise(v + sum_j max(s_j, 0)^alpha database[id_j]) for every row v.

    Args:
      vectors: float32[M, D] rows to expand (unit length).
      neighbour_scores: float32[M, k] similarities; -inf (missing) or <= 0 get weight 0.
      neighbour_ids: int64[M, k] rows of `database`; -1 for missing neighbours.
      database: float32[N, D].
      alpha: exponent; 0 weights every positive neighbour equally (average QE).

    Returns:
      float32[M, D], L2-normalised.
    """
    out = np.empty_like(vectors, dtype=np.float32)
    for s in range(0, len(vectors), _CHUNK):
        e = s + _CHUNK
        ids = neighbour_ids[s:e]
        weights = np.where(ids >= 0, np.clip(neighbour_scores[s:e], 0.0, None), 0.0)
        weights = np.where(weights > 0, weights**alpha, 0.0).astype(np.float32)
        gathered = database[np.maximum(ids, 0)]  # [m, k, D]; masked rows carry weight 0
        out[s:e] = vectors[s:e] + np.einsum("mk,mkd->md", weights, gathered)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def alpha_query_expansion(
    queries: np.ndarray, searcher: Searcher, k: int, alpha: float
) -> np.ndarray:
    """Expands each query with its top-k database neighbours; returns float32[Q, D] unit rows."""
    if k <= 0:
        return queries
    scores, ids = searcher.search(queries, k, desc="alpha-QE search")
    return expand(queries, scores, ids, searcher.database, alpha)


def database_augmentation(searcher: Searcher, k: int, alpha: float) -> np.ndarray:
    """Expands each database vector with its top-k other database vectors; float32[N, D]."""
    db = searcher.database
    if k <= 0:
        return db
    scores, ids = searcher.search(db, k + 1, desc="DBA search")
    scores, ids = _drop_self(scores, ids)
    return expand(db, scores, ids, db, alpha)


def _drop_self(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Removes each row's own index (or, if absent, its last neighbour) from k+1 results."""
    rows = np.arange(len(ids))[:, None]
    is_self = ids == rows
    # Rows that did not find themselves (approximate search, exact duplicates) drop their last.
    is_self[~is_self.any(axis=1), -1] = True
    first = np.argmax(is_self, axis=1)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), first] = False
    k = ids.shape[1] - 1
    return scores[keep].reshape(-1, k), ids[keep].reshape(-1, k)


def rerank_vectors(
    queries: np.ndarray, searcher: Searcher, method: str, k: int, alpha: float
) -> tuple[np.ndarray, Searcher]:
    """Applies `method` (one of METHODS); returns (queries to search, searcher to search in)."""
    if method not in METHODS:
        raise ValueError(f"unknown re-ranking {method!r}; expected one of {METHODS}")
    if "dba" in method:
        searcher = searcher.with_database(database_augmentation(searcher, k, alpha))
    if "aqe" in method:
        queries = alpha_query_expansion(queries, searcher, k, alpha)
    return queries, searcher
