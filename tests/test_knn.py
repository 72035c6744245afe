"""faiss search against a brute-force numpy search, IVF, recall and landmark voting."""

import numpy as np
import pytest

from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(db, queries, k):
    sims = queries.astype(np.float64) @ db.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("batch_size", [64, 10_000])
def test_flat_search_equals_numpy_brute_force(batch_size):
    rng = np.random.default_rng(0)
    db, queries = _unit(rng, 3000, 32), _unit(rng, 300, 32)
    scores, ids = knn.Searcher(db, batch_size=batch_size).search(queries, 50)
    ref_scores, ref_ids = _brute_force(db, queries, 50)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_inner_product_ranks_as_euclidean_distance():
    rng = np.random.default_rng(1)
    db, queries = _unit(rng, 500, 16), _unit(rng, 20, 16)
    _, ids = knn.Searcher(db).search(queries, 10)
    dists = ((queries[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, np.argsort(dists, axis=1, kind="stable")[:, :10])


def test_k_larger_than_database_is_clamped():
    rng = np.random.default_rng(2)
    scores, ids = knn.Searcher(_unit(rng, 5, 8)).search(_unit(rng, 3, 8), 100)
    assert ids.shape == (3, 5) and sorted(ids[0]) == [0, 1, 2, 3, 4]


def test_ivf_visiting_every_list_is_exact_and_fewer_lists_lose_recall():
    rng = np.random.default_rng(3)
    db, queries = _unit(rng, 4000, 32), _unit(rng, 200, 32)
    _, exact = knn.Searcher(db).search(queries, 20)
    full = knn.Searcher(db, "ivf", nlist=64, nprobe=64)
    np.testing.assert_array_equal(full.search(queries, 20)[1], exact)
    one = knn.Searcher(db, "ivf", nlist=64, nprobe=1)
    assert knn.recall_at_k(one.search(queries, 20)[1], exact) < 0.9


def test_ivf_with_new_database_keeps_centroids_and_searches_new_vectors():
    rng = np.random.default_rng(4)
    db, queries = _unit(rng, 2000, 16), _unit(rng, 50, 16)
    ivf = knn.Searcher(db, "ivf", nlist=32, nprobe=32)
    moved = ivf.with_database(db[::-1].copy())
    np.testing.assert_array_equal(moved.search(queries, 5)[1], 1999 - ivf.search(queries, 5)[1])
    np.testing.assert_array_equal(ivf.database, db)  # original untouched


def test_spherical_kmeans_gives_unit_centroids_and_plain_kmeans_does_not():
    rng = np.random.default_rng(6)
    db = _unit(rng, 3000, 16)
    for spherical in (True, False):
        ivf = knn.Searcher(db, "ivf", nlist=16, spherical=spherical).ivf
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        unit = np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)
        assert unit == spherical


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_streamed_database_lives_only_in_faiss_and_comes_back_exactly(index_type):
    rng = np.random.default_rng(7)
    db, queries = _unit(rng, 2500, 16), _unit(rng, 40, 16)
    chunks = lambda: knn.array_chunks(db, 300)  # noqa: E731
    searcher = knn.Searcher.from_chunks(chunks, len(db), 16, index_type, nlist=16, nprobe=16)
    assert not np.shares_memory(searcher.database, db)
    rows = np.array([[5, 2499], [0, -1]])
    np.testing.assert_array_equal(searcher.vectors(rows), db[np.maximum(rows, 0)])
    np.testing.assert_array_equal(np.concatenate([c for _, c in searcher.chunks(700)]), db)
    _, exact = knn.Searcher(db).search(queries, 30)
    np.testing.assert_array_equal(searcher.exact_search(queries, 30)[1], exact)
    np.testing.assert_array_equal(searcher.search(queries, 30)[1], exact)  # nprobe = nlist


def test_recall_at_k_by_hand_and_missing_slots():
    approx = np.array([[1, 2, 3], [4, -1, -1]])
    exact = np.array([[3, 2, 9], [4, 5, 6]])
    assert knn.recall_at_k(approx, exact) == pytest.approx((2 + 1) / 6)


def test_vote_sums_similarities_per_landmark():
    scores = np.array([[0.9, 0.5, 0.45], [0.9, 0.8, 0.1], [0.7, 0.6, -np.inf]], np.float32)
    lms = np.array([[1, 2, 2], [-1, 3, 3], [-1, -1, 5]])
    landmark, confidence = knn.vote_landmarks(scores, lms)
    # Row 0: landmark 2 (0.95) beats 1 (0.9). Row 1: -1 never wins. Row 2: missing slot only.
    np.testing.assert_array_equal(landmark, [2, 3, -1])
    np.testing.assert_allclose(confidence, [0.95, 0.9, 0.0], atol=1e-6)


def test_dimension_mismatch_and_zero_vectors_are_user_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(UserError, match="dimensions"):
        knn.Searcher(_unit(rng, 10, 8)).search(_unit(rng, 2, 4), 3)
    with pytest.raises(UserError, match="all-zero"):
        knn.l2_normalize(np.zeros((2, 3)))
    x, changed = knn.l2_normalize(np.array([[3.0, 4.0], [0.6, 0.8]]))
    assert changed == 1 and np.allclose(np.linalg.norm(x, axis=1), 1)


def test_default_nlist_keeps_39_points_per_list():
    assert knn.default_nlist(1_000_000) == 4000
    assert knn.default_nlist(1000) == 25 and knn.default_nlist(10) == 1


def test_ivf_fill_lays_out_lists_exactly_as_faiss_add_does():
    rng = np.random.default_rng(8)
    db = _unit(rng, 3000, 16)
    ours = knn.Searcher.from_chunks(lambda: knn.array_chunks(db, 700), 3000, 16, "ivf", nlist=20)
    theirs = ours.empty_like().ivf
    theirs.add(db)
    mine, ref = ours.ivf.invlists, theirs.invlists
    for lst in range(20):
        n = ref.list_size(lst)
        assert mine.list_size(lst) == n
        got = knn.faiss.rev_swig_ptr(mine.get_ids(lst), n)
        np.testing.assert_array_equal(got, knn.faiss.rev_swig_ptr(ref.get_ids(lst), n))
