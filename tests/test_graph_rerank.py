"""Graph re-rankers: EGT against hand-checked traversals and a line-by-line transcription of the
authors' Java `prim`; diffusion against hand-built graphs and a dense solve; the k-NN graph
cache (built once, keyed by vectors and k, mutual edges by definition)."""

import heapq
import itertools
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from landmark_tf.errors import UserError
from landmark_tf.retrieval import diffusion, egt, graph_rerank, knn, knn_graph
from landmark_tf.retrieval.embeddings import save_embeddings
from landmark_tf.retrieval.evaluation import EvalConfig, evaluate

INF = np.inf


def _prim_reference(qids, qsims, gids, gsims, p, t):
    """EGTImpl.prim (layer6ai-labs/EGT) transcribed: heap of (score, push order), E = best edge
    seen per node, S = visited; the query is node -1 and never a neighbour."""
    heap, order, out = [], itertools.count(), []
    best, seen, frontier = {}, {-1}, [-1]

    def nbrs(v):
        return zip(*((qids, qsims) if v == -1 else (gids[v], gsims[v])), strict=True)

    while len(out) < p and (heap or frontier):
        for v in frontier:
            for u, w in nbrs(v):
                if u >= 0 and u not in seen and best.get(u, -INF) < w:
                    heapq.heappush(heap, (-w, next(order), u))
                    best[u] = w
        frontier = []
        if not heap:
            break
        while True:
            _, _, u = heapq.heappop(heap)
            if u not in out:
                out.append(u)
            if u not in seen:
                frontier.append(u)
            seen.add(u)
            if not (len(out) < p and heap and -heap[0][0] > t):
                break
    return out


def _graph(n, k, seed):
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return x, ids, np.take_along_axis(sims, ids, axis=1)


def test_egt_prim_order_on_a_hand_checked_graph():
    # Index rows 0..3; the query sees 0 (0.9) and 3 (0.2); 0 -> 1 (0.8), 1 -> 2 (0.7).
    gids = np.array([[0, 1], [1, 2], [2, 1], [3, 0]])
    gsims = np.array([[1, 0.8], [1, 0.7], [1, 0.7], [1, 0.1]], np.float32)
    q_ids, q_sims = np.array([[0, 3]]), np.array([[0.9, 0.2]], np.float32)
    out = egt.traverse(q_ids, q_sims, gids, gsims, p=4, threshold=INF)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3]])  # plain kNN order would be 0, 3
    # t = 0.1: after 0 (explore), 3 (0.2 > t) is exploited before 0's neighbours are seen...
    out = egt.traverse(q_ids, q_sims, gids, gsims, p=4, threshold=0.1)
    np.testing.assert_array_equal(out, [[0, 3, 1, 2]])
    # ...and without the query's edge to 3, row 3 is unreachable: never listed, -1 pads to p.
    out = egt.traverse(q_ids[:, :1], q_sims[:, :1], gids, gsims, p=4, threshold=INF)
    np.testing.assert_array_equal(out, [[0, 1, 2, -1]])


@pytest.mark.parametrize("t", [INF, 0.6, 0.2, -1.0])
def test_egt_matches_the_transcribed_java_traversal(t):
    x, gids, gsims = _graph(60, 6, seed=1)
    q = np.random.default_rng(2).normal(size=(9, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    qs = q @ x.T
    qids = np.argsort(-qs, axis=1)[:, :6]
    qsims = np.take_along_axis(qs, qids, axis=1)
    out = egt.traverse(qids, qsims, gids, gsims, p=25, threshold=t)
    for i in range(len(q)):
        ref = _prim_reference(qids[i], qsims[i], gids, gsims, 25, t)
        got = out[i][out[i] >= 0].tolist()
        assert got == ref, (i, got, ref)


def test_egt_batches_give_the_same_lists(monkeypatch):
    x, gids, gsims = _graph(50, 5, seed=3)
    qids, qsims = gids[:12, 1:], gsims[:12, 1:]
    whole = egt.traverse(qids, qsims, gids, gsims, p=20)
    monkeypatch.setattr(egt, "_TAKEN_BYTES", 50 * 5)  # five queries per batch
    np.testing.assert_array_equal(egt.traverse(qids, qsims, gids, gsims, p=20), whole)


def _mutual(ids, sims):
    n = len(ids)
    rows, cols, vals = [], [], []
    for i in range(n):
        for j, s in zip(ids[i], sims[i], strict=True):
            if j != i and i in ids[j]:
                rows.append(i), cols.append(j), vals.append(s)
    a = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    return knn_graph.MutualGraph(
        a.indptr.astype(np.int64), a.indices.astype(np.int32), a.data.astype(np.float32)
    )


def test_subgraph_is_normalised_on_the_shortlist_only():
    # Path 0 - 1 - 2 (weights 0.5, 0.8) plus 2 - 3; the shortlist [2, 1, 0] drops row 3.
    a = sp.csr_matrix(
        np.array([[0, 0.5, 0, 0], [0.5, 0, 0.8, 0], [0, 0.8, 0, 0.9], [0, 0, 0.9, 0]])
    )
    g = knn_graph.MutualGraph(
        a.indptr.astype(np.int64), a.indices.astype(np.int32), a.data.astype(np.float32)
    )
    s = diffusion.subgraph(g, np.array([[2, 1, 0]]), gamma=1.0).toarray()
    d = np.array([0.8, 1.3, 0.5])  # degrees inside the sub-graph, slots (2, 1, 0)
    w = np.array([[0, 0.8, 0], [0.8, 0, 0.5], [0, 0.5, 0]])
    np.testing.assert_allclose(s, w / np.sqrt(np.outer(d, d)), rtol=1e-6)


def test_diffusion_untruncated_equals_the_dense_solve_and_ranks_by_it():
    x, ids, sims = _graph(40, 8, seed=4)
    g = _mutual(ids, sims)
    q = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    qs = q @ x.T
    short = np.argsort(-qs, axis=1)
    ssims = np.take_along_axis(qs, short, axis=1)
    out = diffusion.diffuse(g, short, ssims, kq=4, gamma=3.0, alpha=0.9, iterations=500,
                            tol=1e-12)  # fmt: skip
    a = sp.csr_matrix((np.maximum(g.sims, 0) ** 3, g.indices, g.indptr)).toarray()
    deg = a.sum(axis=1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0)
    lap = np.eye(40) - 0.9 * inv[:, None] * a * inv[None, :]
    for i in range(3):
        y = np.zeros(40)
        top = short[i, :4]
        y[top] = np.maximum(qs[i, top], 0) ** 3
        f = np.linalg.solve(lap, y)
        reached = f > 1e-9
        ranked = out[i][: reached.sum()]
        assert set(ranked) == set(np.flatnonzero(reached))
        assert np.all(np.diff(f[ranked]) <= 1e-9)  # descending f
        assert set(out[i][reached.sum() :]) == set(np.flatnonzero(~reached))


def test_batched_cg_equals_one_cg_per_block():
    rng = np.random.default_rng(6)
    mats = []
    for _ in range(3):
        m = rng.random((5, 5))
        mats.append(m @ m.T + 5 * np.eye(5))
    y = rng.random(15)
    big = sp.block_diag(mats).tocsr()
    x = diffusion.batched_cg(lambda v: big @ v, y, 3, iterations=3, tol=1e-12)
    for b, m in enumerate(mats):
        ref, _ = spla.cg(m, y[5 * b : 5 * b + 5], rtol=1e-12, maxiter=3)
        np.testing.assert_allclose(x[5 * b : 5 * b + 5], ref, rtol=1e-8)


def test_diffusion_joins_a_manifold_that_similarity_ranks_late():
    # A chain of index rows bending away from the query: rows far along it are less similar to
    # the query than a distractor, but connected to its best match; diffusion ranks them first.
    angles = np.linspace(0, 1.4, 8)
    chain = np.stack([np.cos(angles), np.sin(angles), np.zeros(8)], 1)
    distractor = np.array([[np.cos(0.9), 0, np.sin(0.9)]])
    x = np.concatenate([chain, distractor]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    ids = np.argsort(-sims, axis=1)[:, :3]
    g = _mutual(ids, np.take_along_axis(sims, ids, axis=1))
    q = np.array([[1.0, 0, 0]], np.float32)
    qs = q @ x.T
    short = np.argsort(-qs, axis=1)
    assert np.flatnonzero(short[0] == 8)[0] < np.flatnonzero(short[0] == 7)[0]
    out = diffusion.diffuse(g, short, np.take_along_axis(qs, short, 1), kq=1, gamma=1.0)
    assert np.flatnonzero(out[0] == 8)[0] > np.flatnonzero(out[0] == 7)[0]


def test_knn_graph_is_cached_by_vectors_and_k(tmp_path, monkeypatch):
    x, ids, sims = _graph(30, 30, seed=7)
    searcher = knn.Searcher(x)
    g = knn_graph.knn_graph(searcher, 5, str(tmp_path))
    assert not g.reused
    np.testing.assert_array_equal(g.ids, ids[:, :5])
    np.testing.assert_allclose(g.sims, sims[:, :5], rtol=1e-5)
    built = []
    real = knn_graph._build
    monkeypatch.setattr(knn_graph, "_build", lambda *a: (built.append(a), real(*a)))
    assert knn_graph.knn_graph(knn.Searcher(x), 5, str(tmp_path)).reused
    assert not built
    knn_graph.knn_graph(searcher, 6, str(tmp_path))  # another k
    y = x.copy()
    y[0] = -y[0]
    knn_graph.knn_graph(knn.Searcher(y), 5, str(tmp_path))  # another index
    assert len(built) == 2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_mutual_graph_keeps_reciprocal_edges_without_the_diagonal(tmp_path, monkeypatch):
    x, ids, sims = _graph(45, 45, seed=8)
    monkeypatch.setattr(knn_graph, "_ROW_BUDGET", 7 * 6)  # several row chunks
    g = knn_graph.mutual_graph(knn_graph.knn_graph(knn.Searcher(x), 6, str(tmp_path)))
    ref = _mutual(ids[:, :6], sims[:, :6])
    got = sp.csr_matrix((g.sims, g.indices, g.indptr), shape=(45, 45)).toarray()
    want = sp.csr_matrix((ref.sims, ref.indices, ref.indptr), shape=(45, 45)).toarray()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.count_nonzero(want) > 0 and np.allclose(got, got.T, atol=1e-5)


def test_bad_graph_parameters_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="diffusion_alpha"):
        diffusion.check_params(50, 10, 1000, 3.0, 1.0, 20)
    with pytest.raises(UserError, match="diffusion_truncation"):
        diffusion.check_params(50, 10, 5, 3.0, 0.99, 20)
    with pytest.raises(UserError, match="egt_k"):
        egt.check_params(0, 100)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        knn_graph.knn_graph(knn.Searcher(np.eye(3, dtype=np.float32)), 2, str(tmp_path / "f"))


def _sets(tmp_path, noise=0.9):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))

    def views(per, name):
        lab = np.repeat(np.arange(40), per)
        x = centres[lab] + noise * rng.normal(size=(len(lab), 32))
        path = str(tmp_path / f"{name}.npz")
        save_embeddings(path, [f"{name}{i}" for i in range(len(x))], x, lab)
        return path

    return views(12, "x"), views(2, "q"), views(2, "p")


def test_evaluate_diffusion_and_egt_reuse_one_cached_graph(tmp_path):
    index, queries, others = _sets(tmp_path)
    common = dict(index=index, graph_cache=str(tmp_path / "graphs"), diffusion_k=10, egt_k=10)
    plain = evaluate(EvalConfig(queries=queries, index=index))
    dif = evaluate(EvalConfig(queries=queries, rerank="diffusion", diffusion_truncation=200,
                              **common))  # fmt: skip
    assert dif["graph_cached"] is False and dif["graph_k"] == 10
    assert dif["map@100"] > plain["map@100"]
    # Another query set and another method over the same index and k: the graph is read back.
    eg = evaluate(EvalConfig(queries=others, rerank="egt", egt_threshold=0.5, **common))
    assert eg["graph_cached"] is True and 0 < eg["map@100"] <= 1
    both = evaluate(EvalConfig(queries=queries, rerank="egt+dba+aqe", qe_k=3, **common))
    assert both["graph_cached"] is False  # DBA changed the index vectors: another graph


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rerank=diffusion", "--diffusion_alpha=1.5"], "--diffusion_alpha must be in (0, 1)"),
        (["--rerank=egt", "--egt_k=0"], "--egt_k and --k (the list length p) must be >= 1"),
        (["--rerank=egt", "--revisitop_gnd=g.pkl"], "--rerank=egt re-orders the top lists only"),
    ],
)
def test_cli_bad_graph_parameters_are_one_line_and_exit_2(tmp_path, args, message):
    index, queries, _ = _sets(tmp_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "landmark_tf.cli.evaluate", f"--index={index}",
           f"--queries={queries}", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"landmark-evaluate: error: {message}")


def test_diffusion_batches_give_the_same_lists(monkeypatch):
    x, ids, sims = _graph(50, 6, seed=9)
    g = _mutual(ids, sims)
    qs = x[:20] @ x.T
    short = np.argsort(-qs, axis=1)[:, :30]
    short[3, 25:] = -1  # a shorter shortlist (IVF) in the middle of a batch
    ssims = np.take_along_axis(qs, short, axis=1)
    whole = diffusion.diffuse(g, short, ssims, kq=3)
    monkeypatch.setattr(diffusion, "_ENTRY_BUDGET", 40)  # about one query per batch
    np.testing.assert_array_equal(diffusion.diffuse(g, short, ssims, kq=3), whole)
    assert (whole[3, 25:] == -1).all() and set(whole[3, :25]) == set(short[3, :25])


def test_ivf_graph_key_follows_the_coarse_quantiser():
    x, _, _ = _graph(400, 2, seed=10)
    a = knn.Searcher(x, "ivf", nlist=4, nprobe=4, seed=0)
    b = knn.Searcher(x, "ivf", nlist=4, nprobe=4, seed=1)
    assert knn_graph.cache_key(a, 5) == knn_graph.cache_key(
        knn.Searcher(x, "ivf", nlist=4, nprobe=4, seed=0), 5
    )
    assert knn_graph.cache_key(a, 5) != knn_graph.cache_key(b, 5)
    assert knn_graph.cache_key(a, 5) != knn_graph.cache_key(knn.Searcher(x), 5)


def test_lists_longer_than_the_truncation_keep_the_search_order_after_it(tmp_path):
    x, _, _ = _graph(80, 2, seed=11)
    searcher = knn.Searcher(x)
    scores, ids = searcher.search(x[:5], 60)
    cfg = types.SimpleNamespace(
        rerank="diffusion", k=60, diffusion_k=5, diffusion_truncation=20, diffusion_kq=3,
        diffusion_gamma=3.0, diffusion_alpha=0.99, diffusion_iterations=20,
        graph_cache=str(tmp_path),
    )  # fmt: skip
    report = types.SimpleNamespace(add=lambda *a: None)
    out = graph_rerank.rerank(cfg, searcher, scores, ids, report)
    assert out.shape == (5, 60)
    np.testing.assert_array_equal(out[:, 20:], ids[:, 20:])
    assert all(set(out[i, :20]) == set(ids[i, :20]) for i in range(5))


def test_a_killed_build_leaves_nothing_behind_the_next_one(tmp_path):
    x, _, _ = _graph(20, 2, seed=12)
    searcher = knn.Searcher(x)
    name = f"knn-k3-{knn_graph.cache_key(searcher, 3)}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (tmp_path / f".tmp-{dead}-{name}").mkdir()  # as a SIGKILLed builder leaves it
    (tmp_path / f".tmp-{os.getpid()}-other").mkdir()  # another target's: kept
    knn_graph.knn_graph(searcher, 3, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f".tmp-{os.getpid()}-other"])
