"""SuperGlobal re-ranking: a hand-computed case, a loop transcription of the released code's
algorithm, missing shortlist members, the streamed search, revisitop rankings and the CLI path."""

import numpy as np
import pytest

from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn, superglobal
from landmark_tf.retrieval.embeddings import save_embeddings
from landmark_tf.retrieval.evaluation import RERANK_METHODS, EvalConfig, evaluate


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_hand_computed_scores():
    # q = e1; a = e1, b = (0.6, 0.8), c = e2; K = 2 (itself + 1), beta = 0.5.
    # d~a = (a + 0.3 b) / 1.3, d~b = (b + 0.4 c) / 1.4, d~c = (c + 0.4 b) / 1.4;
    # q~ = max(d~a, d~b) = (0.907692, 0.857143) -> scores 0.944920, 0.776138, 0.567598.
    db = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    ids, scores = superglobal.rerank_shortlists(
        db[:1], np.array([[0, 1, 2]]), db, neighbours=2, beta=0.5)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    np.testing.assert_allclose(scores, [[0.944920, 0.776138, 0.567598]], atol=1e-5)


def _reference(q, x, k, beta):
    """Per query and per row, as MDescAug + RerankwMDA compute it (stable sorts for ties)."""
    sims = x @ x.T
    refined = np.empty_like(x)
    for i in range(len(x)):
        nbr = np.argsort(-sims[i], kind="stable")[:k]
        w = beta * sims[i, nbr]
        w[0] = 1.0
        refined[i] = (w[:, None] * x[nbr]).sum(0) / w.sum()
    first = refined @ q
    q_tilde = refined[np.argsort(-first, kind="stable")[:k]].max(0)
    scores = (first + refined @ q_tilde) / 2
    order = np.argsort(-scores, kind="stable")
    return order, scores[order]


def test_matches_a_loop_transcription_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(4, 16)))
    db = _unit(centres[rng.integers(0, 4, 60)] + 0.6 * rng.normal(size=(60, 16)))
    queries = _unit(centres[rng.integers(0, 4, 7)] + 0.6 * rng.normal(size=(7, 16)))
    shortlists = np.argsort(-(queries @ db.T), axis=1)[:, :25]
    monkeypatch.setattr(superglobal, "_CHUNK_BYTES", 1)  # one query per chunk
    ids, scores = superglobal.rerank_shortlists(queries, shortlists, db, neighbours=4, beta=0.15)
    for i, q in enumerate(queries):
        order, ref_scores = _reference(q, db[shortlists[i]], 4, 0.15)
        np.testing.assert_array_equal(ids[i], shortlists[i][order])
        np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-5, atol=1e-6)
    assert (ids != shortlists).any()  # the re-ranking did re-order something


def test_missing_members_sort_last_and_change_nothing_else():
    rng = np.random.default_rng(1)
    db = _unit(rng.normal(size=(10, 8)))
    q = db[:1] + 0.0
    full = np.array([[0, 3, 5, 7]])
    holes = np.array([[0, -1, 3, 5, -1, 7]])
    ids_full, s_full = superglobal.rerank_shortlists(q, full, db, neighbours=3)
    ids_holes, s_holes = superglobal.rerank_shortlists(q, holes, db, neighbours=3)
    np.testing.assert_array_equal(ids_holes[0, :4], ids_full[0])
    np.testing.assert_array_equal(ids_holes[0, 4:], [-1, -1])
    np.testing.assert_allclose(s_holes[0, :4], s_full[0], rtol=1e-6)
    assert np.isneginf(s_holes[0, 4:]).all()


def test_neighbours_beyond_the_shortlist_are_clipped():
    db = _unit(np.eye(3) + 0.1)
    ids, scores = superglobal.rerank_shortlists(db[:1], np.array([[0, 1]]), db, neighbours=10)
    assert sorted(ids[0].tolist()) == [0, 1] and np.isfinite(scores).all()


def test_streamed_search_reranks_the_shortlist_and_keeps_the_plain_top_k(monkeypatch):
    rng = np.random.default_rng(2)
    db = _unit(rng.normal(size=(50, 8)))
    queries = _unit(rng.normal(size=(9, 8)))
    searcher = knn.Searcher(db)
    monkeypatch.setattr(superglobal, "_SEARCH_BLOCK", 4)
    ids, plain = superglobal.search(searcher, queries, 5, shortlist=20, neighbours=3)
    _, top20 = searcher.search(queries, 20)
    np.testing.assert_array_equal(plain, top20[:, :5])
    expected, _ = superglobal.rerank_shortlists(queries, top20, db, neighbours=3)
    np.testing.assert_array_equal(ids, expected[:, :5])
    deep, _ = superglobal.search(searcher, queries, 30, shortlist=20, neighbours=3)
    _, top30 = searcher.search(queries, 30)
    np.testing.assert_array_equal(deep[:, 20:], top30[:, 20:])  # beyond M: as searched


def test_full_rankings_are_reordered_like_shortlists():
    rng = np.random.default_rng(3)
    db = _unit(rng.normal(size=(30, 8)))
    queries = _unit(rng.normal(size=(3, 8)))
    db_rows = rng.permutation(30)[:20]  # the gnd's images, in gnd order
    ranks = np.argsort(-(db[db_rows] @ queries.T), axis=0, kind="stable")  # [20, 3]
    out = superglobal.rerank_ranking(ranks, queries, knn.Searcher(db), db_rows, shortlist=8,
                                     neighbours=3)
    expected, _ = superglobal.rerank_shortlists(queries, db_rows[ranks[:8].T], db, neighbours=3)
    np.testing.assert_array_equal(db_rows[out[:8].T], expected)
    np.testing.assert_array_equal(out[8:], ranks[8:])


def test_method_names_combine():
    assert superglobal.split_method("superglobal+dba+aqe") == ("dba+aqe", True)
    assert superglobal.split_method("aqe") == ("aqe", False)
    for name in ("superglobal", "superglobal+dba", "discriminative+superglobal+aqe"):
        assert name in RERANK_METHODS


def test_evaluate_ranks_as_the_library_does_and_combines_with_dba(tmp_path):
    rng = np.random.default_rng(4)
    centres = _unit(rng.normal(size=(6, 16)))
    labels = np.repeat(np.arange(6), 5)
    db = _unit(centres[labels] + 0.3 * rng.normal(size=(30, 16)))
    queries = _unit(centres[:4] + 0.4 * rng.normal(size=(4, 16)))
    paths = {n: str(tmp_path / f"{n}.npz") for n in ("index", "queries")}
    save_embeddings(paths["index"], [f"x{i}" for i in range(30)], db, labels)
    save_embeddings(paths["queries"], [f"q{i}" for i in range(4)], queries, np.arange(4))
    common = dict(queries=paths["queries"], index=paths["index"], k=5)
    sub = str(tmp_path / "sub.csv")
    r = evaluate(EvalConfig(**common, rerank="superglobal", superglobal_shortlist=12,
                            superglobal_neighbours=3, submission=sub))
    assert r["superglobal_shortlist"] == 12 and r["rerank"] == "superglobal"
    expected, plain = superglobal.search(knn.Searcher(db), queries, 5, shortlist=12,
                                         neighbours=3)
    assert (expected != plain).any()
    with open(sub) as f:
        rows = [line.split(",")[1].split() for line in f.read().splitlines()[1:]]
    assert rows == [[f"x{j}" for j in row] for row in expected]
    both = evaluate(EvalConfig(**common, rerank="superglobal+dba", qe_k=2))
    assert 0 < both["map@100"] <= 1
    with pytest.raises(UserError, match="superglobal_shortlist"):
        evaluate(EvalConfig(**common, rerank="superglobal", superglobal_shortlist=0))
