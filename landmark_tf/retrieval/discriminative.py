"""Two-stage discriminative re-ranking (Yokoo, Ozaki, Simo-Serra, Iizuka, "Two-stage
Discriminative Re-ranking for Large-scale Landmark Retrieval", CVPRW 2020, arXiv:2003.11211),
the Google Landmark Retrieval 2019 winner, as in its released code: we follow
experiments/retrieval_reranking.py of lyakaap/Landmark2019-1st-and-3rd-Place-Solution at commit
215d4adc378b3e1635d37511c64b039b1eb1d1a1 ("First commit", 2019-06-08). The file lives only in
the June 2019 history: that commit added it, no later one changed it, and 9839c9c (2019-06-24)
deleted it, moving the same steps into `reranking_submission` of experiments/submit_retrieval.py
(exp/submit_retrieval.py at the last commit, 3fee857, 2020-06-22).

Label step: every query and every index image gets a landmark by kNN soft-voting against the
labelled train embeddings: its k = 3 nearest train images vote for their landmark with weight
1 - |q - t|^2 = 2 cos(q, t) - 1 (the released code's `1 - dist` on faiss' squared L2 distance of
unit vectors); the landmark with the largest sum wins and that sum is its confidence.
Sort step: in each query's retrieved list the index images predicted to show the query's landmark
move ahead of the others, similarity order kept inside both groups (the code's stable sort).
Insert step: index images predicted to show the query's landmark that similarity did not
retrieve are put right after the retrieved images of that landmark (before the retrieved others),
highest label confidence first, and the list is cut back to k. Confidence enters as the code
uses it: the insert step only runs for a query whose confidence exceeds `threshold` (0 in the
code), and inserts only index images above it.

Deviations from the released code: it cleaned and "supervised-DBA"-ed the train embeddings
before voting (landmark-clean does the cleaning here; no supervised DBA); its insert order is
that of a Python set (arbitrary), ours is the confidence order the paper describes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from landmark_tf.retrieval.knn import Searcher

NAME = "discriminative"
LABEL_K = 3  # train neighbours that vote, as in the released code
_VOTE_CHUNK = 65536  # rows voted at once: bounds the [chunk, k, k] comparison
_RERANK_CHUNK = 1024  # queries re-ranked at once: bounds [chunk, 3k, k] membership tests


@dataclasses.dataclass(frozen=True)
class Labels:
    """Predicted landmark per image: `landmarks` int64[N] (-1: none), `confidence` float32[N]."""

    landmarks: np.ndarray
    confidence: np.ndarray


def soft_vote(scores: np.ndarray, neighbour_landmarks: np.ndarray) -> Labels:
    """Landmark with the largest sum of 2*s - 1 over the neighbours that show it, vectorised.

    Args:
      scores: float32[N, k] cosine similarities to the train neighbours (-inf: missing).
      neighbour_landmarks: int64[N, k] their landmarks (-1: no landmark, never wins).

    Returns:
      Labels; landmark -1 with confidence -inf where no neighbour has a landmark. Ties go to the
      landmark of the nearer neighbour.
    """
    n, k = scores.shape
    landmarks = np.full(n, -1, np.int64)
    confidence = np.full(n, -np.inf, np.float32)
    for s in range(0, n, _VOTE_CHUNK):
        sc, lm = scores[s : s + _VOTE_CHUNK], neighbour_landmarks[s : s + _VOTE_CHUNK]
        valid = (lm >= 0) & np.isfinite(sc)
        weight = np.where(valid, 2.0 * sc - 1.0, 0.0).astype(np.float32)
        same = (lm[:, :, None] == lm[:, None, :]) & valid[:, None, :]  # [m, k, k]
        sums = np.einsum("mij,mj->mi", same, weight)
        sums[~valid] = -np.inf
        best = np.argmax(sums, axis=1)  # first maximum: the nearer neighbour's landmark
        rows = np.arange(len(sc))
        ok = valid[rows, best]
        landmarks[s : s + len(sc)] = np.where(ok, lm[rows, best], -1)
        confidence[s : s + len(sc)] = np.where(ok, sums[rows, best], -np.inf)
    return Labels(landmarks, confidence)


def label(vectors: np.ndarray, train: Searcher, train_landmarks: np.ndarray, *, desc=None):
    """The label step for one set: one batched kNN search against train, then the vote.

    Args:
      vectors: float32[N, D] unit rows (queries or index images).
      train: searcher over the labelled train embeddings.
      train_landmarks: int64[len(train)] landmark of every train row.

    Returns:
      Labels for the N rows. Memory: the [N, 3] search results plus one vote chunk.
    """
    scores, ids = train.search(vectors, LABEL_K, desc=desc)
    neighbour_landmarks = np.where(ids >= 0, train_landmarks[np.maximum(ids, 0)], -1)
    return soft_vote(scores, neighbour_landmarks)


class _LandmarkGroups:
    """Index rows grouped by predicted landmark, best confidence first inside each group (rows
    below `threshold` left out), so a query's insert candidates are one contiguous slice."""

    def __init__(self, index_labels: Labels, threshold: float):
        keep = np.flatnonzero(
            (index_labels.landmarks >= 0) & (index_labels.confidence > threshold)
        )
        order = np.lexsort((-index_labels.confidence[keep], index_labels.landmarks[keep]))
        self.rows = keep[order]
        self.keys = index_labels.landmarks[self.rows]

    def candidates(self, landmarks: np.ndarray, width: int) -> np.ndarray:
        """int64[Q, width]: the first `width` rows of each landmark's group, -1 padded."""
        start = np.searchsorted(self.keys, landmarks, side="left")
        end = np.searchsorted(self.keys, landmarks, side="right")
        pos = start[:, None] + np.arange(width)[None, :]
        inside = pos < end[:, None]
        rows = self.rows[np.minimum(pos, max(len(self.rows) - 1, 0))] if len(self.rows) else pos
        return np.where(inside & (landmarks[:, None] >= 0), rows, -1)


def rerank(
    ids: np.ndarray,
    query_labels: Labels,
    index_labels: Labels,
    *,
    threshold: float = 0.0,
    insert: bool = True,
) -> np.ndarray:
    """The sort and insert steps on retrieved lists.

    Args:
      ids: int64[Q, k] retrieved index rows, best first (-1: missing slot).
      query_labels: Labels of the Q queries; index_labels: Labels of every index row.
      threshold: label confidence a query needs for the insert step, and an index image needs
        to be inserted.
      insert: False runs the sort step only.

    Returns:
      int64[Q, k] re-ranked index rows (-1 where fewer than k are known).
    """
    k = ids.shape[1]
    groups = _LandmarkGroups(index_labels, threshold) if insert else None
    out = np.empty_like(ids)
    for s in range(0, len(ids), _RERANK_CHUNK):
        chunk = ids[s : s + _RERANK_CHUNK]
        q_lm = query_labels.landmarks[s : s + _RERANK_CHUNK]
        q_conf = query_labels.confidence[s : s + _RERANK_CHUNK]
        out[s : s + len(chunk)] = _rerank_chunk(chunk, q_lm, q_conf, index_labels, groups,
                                                threshold, k)  # fmt: skip
    return out


def _rerank_chunk(ids, q_lm, q_conf, index_labels, groups, threshold, k):
    valid = ids >= 0
    retrieved_lm = np.where(valid, index_labels.landmarks[np.maximum(ids, 0)], -1)
    same = valid & (retrieved_lm == q_lm[:, None]) & (q_lm[:, None] >= 0)
    # Priority 0: retrieved, same landmark; 1: inserted; 2: retrieved, other; 3: empty slot.
    parts, priority = [ids], [np.where(same, 0, np.where(valid, 2, 3))]
    if groups is not None:
        # At most k of a group's first 2k rows are already retrieved: 2k always leaves k new.
        cand = groups.candidates(np.where(q_conf > threshold, q_lm, -1), 2 * k)
        seen = (cand[:, :, None] == np.where(same, ids, -2)[:, None, :]).any(axis=2)
        parts.append(cand)
        priority.append(np.where((cand >= 0) & ~seen, 1, 3))
    allrows, allprio = np.concatenate(parts, axis=1), np.concatenate(priority, axis=1)
    order = np.argsort(allprio, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(allrows, order, axis=1)
    return np.where(np.take_along_axis(allprio, order, axis=1) < 3, picked, -1)


def label_chunks(chunks, train: Searcher, train_landmarks: np.ndarray, *, desc=None) -> Labels:
    """The label step over (first row, float32[n, D] unit rows) chunks, e.g. an index streamed
    from its file: one chunk and its [n, 3] results in memory at a time."""
    parts = [label(rows, train, train_landmarks, desc=desc) for _, rows in chunks]
    if not parts:
        return Labels(np.empty(0, np.int64), np.empty(0, np.float32))
    return Labels(np.concatenate([p.landmarks for p in parts]),
                  np.concatenate([p.confidence for p in parts]))


def discriminative_rerank(
    ids: np.ndarray,
    queries: np.ndarray,
    index,
    train: Searcher,
    train_landmarks: np.ndarray,
    *,
    threshold: float = 0.0,
) -> tuple[np.ndarray, Labels]:
    """Label step for queries and index, then sort + insert. Returns (int64[Q, k], query Labels).

    Args:
      ids: int64[Q, k] retrieved index rows (after any alpha-QE/DBA), best first.
      queries: float32[Q, D] and index: float32[N, D] unit rows, before alpha-QE/DBA (the
        released code labels the plain descriptors); `index` may also be an iterable of
        (first row, rows) chunks, so a large index is labelled without holding it whole.
      train: searcher over the labelled train embeddings; train_landmarks: int64[len(train)].
    """
    q_labels = label(queries, train, train_landmarks, desc="label queries")
    if isinstance(index, np.ndarray):
        x_labels = label(index, train, train_landmarks, desc="label index")
    else:
        x_labels = label_chunks(index, train, train_landmarks, desc="label index")
    return rerank(ids, q_labels, x_labels, threshold=threshold), q_labels


def split_method(method: str) -> tuple[str, bool]:
    """'discriminative+dba+aqe' -> ('dba+aqe', True); 'aqe' -> ('aqe', False)."""
    parts = [p for p in method.split("+") if p]
    uses = NAME in parts
    rest = "+".join(p for p in parts if p != NAME)
    return (rest or "none"), uses
