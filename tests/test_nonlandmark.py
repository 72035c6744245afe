"""Non-landmark handling: formulas by hand, the classifier, the validation split, and a GAP
gain on data where non-landmark queries sit near a non-landmark set."""

import numpy as np
import pytest

from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn
from landmark_tf.retrieval import nonlandmark as nl


def test_adjusted_confidence_is_p_to_the_g_times_c_minus_lambda_m():
    out = nl.adjusted_confidence([2.0, 1.0], [0.5, 1.0], [0.4, 0.1], 2.0)
    np.testing.assert_allclose(out, [2.0 * 0.5 - 2 * 0.4, 1.0 - 0.2], rtol=1e-6)
    out = nl.adjusted_confidence([2.0], [0.25], [0.4], 1.0, exponent=0.5)
    np.testing.assert_allclose(out, [2.0 * 0.5 - 0.4], rtol=1e-6)
    np.testing.assert_allclose(nl.adjusted_confidence([2.0], None, None), [2.0])


def test_similarity_is_the_mean_of_the_n_nearest():
    bank = knn.Searcher(np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32))
    sim = nl.nonlandmark_similarity(np.array([[1, 0]], np.float32), bank, 2)
    np.testing.assert_allclose(sim, [(1.0 + 0.6) / 2], rtol=1e-6)


def test_classifier_separates_two_clouds_and_balances_classes():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(2000, 8)) + [2, 0, 0, 0, 0, 0, 0, 0]
    neg = rng.normal(size=(50, 8)) - [2, 0, 0, 0, 0, 0, 0, 0]
    clf = nl.LandmarkClassifier().fit(pos.astype(np.float32), neg.astype(np.float32))
    p = clf.predict(np.array([[3, 0, 0, 0, 0, 0, 0, 0], [-3, 0, 0, 0, 0, 0, 0, 0]], np.float32))
    assert p[0] > 0.9 and p[1] < 0.1
    # Balanced weights: the decision boundary sits near the middle, not pushed to the minority.
    assert 0.3 < clf.predict(np.zeros((1, 8), np.float32))[0] < 0.7


def test_validation_split_is_balanced_and_disjoint():
    landmarks = np.array([1, 1, 1, 2, 2, 3, -1, 4, 4, 4])  # 3 has one image, -1 none
    split = nl.validation_split(landmarks, 8, seed=0)
    assert len(split.held_out) == len(split.queries) == 4
    assert set(landmarks[split.held_out]) <= {1, 2, 4}
    assert not set(split.bank) & set(split.queries) and len(split.bank) == 4
    with pytest.raises(UserError, match="2\\+ non-landmark"):
        nl.validation_split(landmarks, 1)


def test_tune_picks_the_weight_that_maximises_gap():
    # Query 0 right (conf 1.0); query 1 a non-landmark predicted wrongly with conf 2.0 but close
    # to the bank. Without a penalty the wrong one ranks first: GAP 1/2; lambda >= 2 fixes it.
    lam, n, _, gap = nl.tune(np.array([5, 6]), np.array([1.0, 2.0]), np.array([5, -1]),
                          {1: np.array([0.0, 0.6])})  # fmt: skip
    assert gap == 1.0 and lam == 2.0 and n == 1
    assert nl.gap_of(np.array([5, 6]), np.array([1.0, 2.0]), np.array([5, -1])) == 0.5


def _world(rng, dim=16):
    """Embeddings share a common direction (as real ones do: neighbours' cosines are positive).
    30 landmarks; a non-landmark region (e15); a fifth of the train images are noise there,
    labelled with landmark 0 or 1, so non-landmark queries get confident wrong predictions."""
    common = 2.5 * np.eye(dim)[0]
    centres = common + np.pad(rng.normal(size=(30, dim - 2)), ((0, 0), (1, 1)))
    region = common + 2.5 * np.eye(dim)[-1]

    def draw(c, n, noise=0.5):
        x = np.repeat(np.atleast_2d(c), n, axis=0)
        x = x + noise * rng.normal(size=x.shape)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    train = np.concatenate([draw(centres, 8, 0.9), draw(region, 60, 0.8)])
    labels = np.concatenate([np.repeat(np.arange(30), 8), rng.integers(0, 2, 60)])
    return centres, region, draw, train, labels


@pytest.mark.parametrize("method", ["penalty", "classifier", "both"])
def test_handling_lifts_gap_on_held_out_queries(method):
    rng = np.random.default_rng(1)
    centres, region, draw, train, t_lab = _world(rng)
    searcher = knn.Searcher(train)
    bank = draw(region, 200, 0.8)
    cal = nl.calibrate(method, searcher, t_lab, bank, k=5, seed=0)
    assert cal.validation_gap > cal.validation_gap_before
    queries = np.concatenate([draw(centres, 2, 0.9), draw(region, 40, 0.8)])
    truth = np.concatenate([np.repeat(np.arange(30), 2), np.full(40, -1)])
    scores, ids = searcher.search(queries, 5)
    lms, conf = knn.vote_landmarks(scores, t_lab[ids])
    before = nl.gap_of(lms, conf, truth)
    after = nl.gap_of(lms, nl.apply(cal, queries, conf, searcher, bank), truth)
    assert after > before + 0.05, (before, after, cal)


def test_a_train_set_smaller_than_the_bank_keeps_rows_for_the_classifier():
    # Two landmarks of two images each, ten non-landmark images: holding out every train image
    # left the classifier no landmark rows (a ZeroDivisionError in its class weights).
    rng = np.random.default_rng(2)
    train = rng.normal(size=(4, 8)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    bank = rng.normal(size=(10, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    split = nl.validation_split(np.array([1, 1, 2, 2]), len(bank), seed=0)
    assert len(split.held_out) == 3
    cal = nl.calibrate("both", knn.Searcher(train), np.array([1, 1, 2, 2]), bank, k=2, seed=0)
    assert cal.validation_queries == 6


def test_tune_switches_a_harmful_classifier_off():
    # The classifier's probabilities rank the wrong prediction first: g = 0 is best.
    lam, n, ex, gap = nl.tune(np.array([5, 6]), np.array([2.0, 1.0]), np.array([5, -1]), None,
                              np.array([0.1, 1.0]))  # fmt: skip
    assert ex == 0.0 and gap == 1.0 and (lam, n) == (0.0, 0)
    lam, n, ex, gap = nl.tune(np.array([5, 6]), np.array([1.0, 2.0]), np.array([5, -1]), None,
                              np.array([1.0, 0.1]))  # fmt: skip
    assert ex > 0 and gap == 1.0


def test_check_set_refuses_empty_and_other_dimension():
    with pytest.raises(UserError, match="empty"):
        nl.check_set("nonlandmark", "x.npz", 4, 4, 0)
    with pytest.raises(UserError, match="8-d embeddings but the queries have 4-d"):
        nl.check_set("nonlandmark", "x.npz", 8, 4, 3)
