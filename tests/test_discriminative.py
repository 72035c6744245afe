"""Two-stage discriminative re-ranking: the vote, sort and insert steps by hand, and a gain on
clustered data where similarity alone misses views of the query's landmark."""

import numpy as np
import pytest

from landmark_tf.retrieval import discriminative as dr
from landmark_tf.retrieval import knn, metrics


def _labels(landmarks, confidence):
    return dr.Labels(np.asarray(landmarks, np.int64), np.asarray(confidence, np.float32))


def test_vote_sums_two_cos_minus_one_per_landmark():
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.6, 0.6], [0.9, -np.inf, -np.inf]], np.float32)
    lms = np.array([[5, 7, 7], [5, 7, 7], [-1, -1, -1]])
    out = dr.soft_vote(scores, lms)
    # Row 0: 5 -> 0.8; 7 -> 0.6 + 0.4 = 1.0. Row 1: 5 -> 0.8; 7 -> 0.2 + 0.2 = 0.4.
    np.testing.assert_array_equal(out.landmarks, [7, 5, -1])
    np.testing.assert_allclose(out.confidence[:2], [1.0, 0.8], rtol=1e-6)
    assert out.confidence[2] == -np.inf


def test_vote_tie_goes_to_the_nearer_neighbour():
    out = dr.soft_vote(np.array([[0.75, 0.75]], np.float32), np.array([[9, 3]]))
    assert out.landmarks[0] == 9


def test_sort_moves_same_landmark_ahead_keeping_similarity_order():
    ids = np.array([[0, 1, 2, 3, 4]])
    index = _labels([1, 2, 1, 3, 1], [1, 1, 1, 1, 1])
    out = dr.rerank(ids, _labels([1], [1.0]), index, insert=False)
    np.testing.assert_array_equal(out, [[0, 2, 4, 1, 3]])


def test_insert_adds_unretrieved_images_of_the_landmark_by_confidence_up_to_k():
    ids = np.array([[0, 1, 2, 3]])
    # Rows 5, 6, 7 show landmark 1 but were not retrieved; 7 is the most confident; 8 is below
    # the threshold; row 9 is another landmark.
    index = _labels([1, 2, 1, 3, 4, 1, 1, 1, 1, 2],
                    [1, 1, 1, 1, 1, 0.3, 0.2, 0.9, -0.1, 1])  # fmt: skip
    out = dr.rerank(ids, _labels([1], [1.0]), index, threshold=0.0)
    np.testing.assert_array_equal(out, [[0, 2, 7, 5]])


def test_insert_needs_a_confident_query_and_sort_needs_a_label():
    ids = np.array([[0, 1, 2], [0, 1, 2]])
    index = _labels([2, 1, 1, 1], [1, 1, 1, 1])
    out = dr.rerank(ids, _labels([1, -1], [-0.5, -np.inf]), index)
    np.testing.assert_array_equal(out, [[1, 2, 0], [0, 1, 2]])  # sorted, nothing inserted


def test_missing_slots_stay_last_and_short_groups_pad_with_minus_one():
    ids = np.array([[3, -1, -1]])
    index = _labels([1, 2, 2, 2], [1, 1, 1, 1])
    out = dr.rerank(ids, _labels([1], [1.0]), index)
    np.testing.assert_array_equal(out, [[0, 3, -1]])


def test_split_method():
    assert dr.split_method("discriminative+dba+aqe") == ("dba+aqe", True)
    assert dr.split_method("discriminative") == ("none", True)
    assert dr.split_method("aqe") == ("aqe", False)


def _views(rng, centres, per, noise):
    labels = np.repeat(np.arange(len(centres)), per)
    x = centres[labels] + noise * rng.normal(size=(len(labels), centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _map(ids, q_labels, x_labels):
    preds = {i: ids[i][ids[i] >= 0].tolist() for i in range(len(ids))}
    sol = {i: set(np.flatnonzero(x_labels == q_labels[i]).tolist()) for i in range(len(ids))}
    return metrics.mean_average_precision(preds, sol)


@pytest.mark.parametrize("chunk", [1024, 7])
def test_reranking_lifts_map_when_similarity_misses_views(monkeypatch, chunk):
    monkeypatch.setattr(dr, "_RERANK_CHUNK", chunk)
    monkeypatch.setattr(dr, "_VOTE_CHUNK", chunk)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, 32))
    train, t_lab = _views(rng, centres, 10, 0.9)
    index, x_lab = _views(rng, centres, 12, 0.9)
    queries, q_lab = _views(rng, centres, 2, 0.9)
    k = 10  # shorter than the 12 relevant images: only the insert step can reach them all
    _, ids = knn.Searcher(index).search(queries, k)
    base = _map(ids, q_lab, x_lab)
    new, q_labels = dr.discriminative_rerank(ids, queries, index, knn.Searcher(train), t_lab)
    assert (q_labels.landmarks == q_lab).mean() > 0.8
    assert _map(new, q_lab, x_lab) > base + 0.05
    # Each list stays a set of distinct index rows.
    assert all(len(set(r[r >= 0].tolist())) == (r >= 0).sum() for r in new)
