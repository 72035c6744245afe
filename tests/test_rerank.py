"""alpha-QE and DBA: weights by hand, self-exclusion, and a measurable gain on clustered data."""

import numpy as np
import pytest

from landmark_tf.retrieval import knn, metrics, rerank

E = np.eye(3, dtype=np.float32)


def test_expand_weights_neighbours_by_similarity_to_the_alpha():
    scores = np.array([[0.5, -0.2]], np.float32)  # negative similarity gets weight 0
    ids = np.array([[1, 2]])
    out = rerank.expand(E[:1], scores, ids, E, alpha=2.0)
    expected = np.array([1.0, 0.25, 0.0]) / np.linalg.norm([1.0, 0.25, 0.0])
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_expand_skips_missing_neighbours():
    out = rerank.expand(E[:1], np.array([[-np.inf]], np.float32), np.array([[-1]]), E, 3.0)
    np.testing.assert_allclose(out[0], E[0])


def test_alpha_zero_is_average_query_expansion():
    scores = np.array([[0.9, 0.1]], np.float32)
    out = rerank.expand(E[:1], scores, np.array([[1, 2]]), E, alpha=0.0)
    np.testing.assert_allclose(out[0], np.ones(3) / np.sqrt(3), rtol=1e-6)


def test_dba_excludes_each_vector_itself():
    db = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    out = rerank.database_augmentation(knn.Searcher(db), k=1, alpha=1.0)
    # Nearest other vector: 0 -> 1 (0.8), 1 -> 0 (0.8 beats 0.6), 2 -> 1 (0.6).
    expected = db + np.array([0.8, 0.8, 0.6])[:, None] * db[[1, 0, 1]]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_drop_self_falls_back_to_last_column_when_self_is_absent():
    scores = np.array([[1.0, 0.5, 0.4], [0.9, 0.8, 0.7]], np.float32)
    ids = np.array([[0, 5, 6], [7, 8, 9]])  # row 1 did not find itself
    s, i = rerank._drop_self(scores, ids)
    np.testing.assert_array_equal(i, [[5, 6], [7, 8]])
    np.testing.assert_allclose(s, [[0.5, 0.4], [0.9, 0.8]])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="re-ranking"):
        rerank.rerank_vectors(E, knn.Searcher(E), "magic", 2, 3.0)


def _clustered(rng, n, centres, noise):
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + noise * rng.normal(size=(n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _map(queries, searcher, q_labels, x_labels):
    _, ids = searcher.search(queries, 100)
    predictions = {i: ids[i].tolist() for i in range(len(ids))}
    solution = {i: set(np.flatnonzero(x_labels == q_labels[i]).tolist()) for i in range(len(ids))}
    return metrics.mean_average_precision(predictions, solution)


def test_every_method_improves_map_on_clustered_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(100, 32))
    db, db_labels = _clustered(rng, 2000, centres, 1.2)
    queries, q_labels = _clustered(rng, 200, centres, 1.2)
    searcher = knn.Searcher(db)
    base = _map(queries, searcher, q_labels, db_labels)
    for method in ("aqe", "dba", "dba+aqe"):
        q2, s2 = rerank.rerank_vectors(queries, searcher, method, 5, 3.0)
        assert np.allclose(np.linalg.norm(q2, axis=1), 1, atol=1e-5)
        assert _map(q2, s2, q_labels, db_labels) > base + 0.01, method
