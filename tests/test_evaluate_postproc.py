"""landmark-evaluate with discriminative re-ranking and non-landmark handling, end to end on
hand-made embeddings, and their bad input (one line, exit 2)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from landmark_tf.errors import UserError
from landmark_tf.retrieval.embeddings import save_embeddings
from landmark_tf.retrieval.evaluation import EvalConfig, evaluate

BIN = os.path.join(os.path.dirname(sys.executable), "landmark-evaluate")
sys.path.insert(0, os.path.dirname(__file__))
from test_nonlandmark import _world  # noqa: E402


def _at(*angles):
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


@pytest.fixture()
def sets(tmp_path):
    """Train: landmark 10 at angles 0-0.1, 20 at 1.0-1.1. Index x0 (0.02, lm 10), x1 (0.6,
    predicted 20), x2 (1.05, lm 20), x3 (-0.3, lm 10). Query q at 0.35 (lm 10): similarity
    ranks x1 x0 x3 x2, and x3 is further than the non-matching x1."""
    p = {n: str(tmp_path / f"{n}.npz") for n in ("train", "index", "queries", "unlabelled")}
    save_embeddings(p["train"], [f"t{i}" for i in range(6)],
                    _at(0.0, 0.05, 0.1, 1.0, 1.05, 1.1), [10, 10, 10, 20, 20, 20])  # fmt: skip
    save_embeddings(p["index"], ["x0", "x1", "x2", "x3"], _at(0.02, 0.6, 1.05, -0.3),
                    [10, 20, 20, 10])  # fmt: skip
    save_embeddings(p["queries"], ["q"], _at(0.35), [10])
    save_embeddings(p["unlabelled"], [f"t{i}" for i in range(3)], _at(0.0, 0.5, 1.0))
    return p


def test_discriminative_sorts_and_inserts(sets, tmp_path):
    common = dict(queries=sets["queries"], index=sets["index"], train=sets["train"], k=2)
    plain = evaluate(EvalConfig(**common))
    assert plain["map@100"] == pytest.approx(0.25)  # [x1, x0]: x0 at rank 2, x3 missed
    r = evaluate(EvalConfig(**common, rerank="discriminative"))
    assert r["map@100"] == pytest.approx(1.0)  # [x0, x3]: sorted, then x3 inserted
    assert r["discriminative_labelled_queries"] == 1
    sub = str(tmp_path / "sub.csv")
    evaluate(EvalConfig(**{**common, "k": 4}, rerank="discriminative+aqe", submission=sub))
    with open(sub) as f:
        assert f.read().splitlines()[1] == "q,x0 x3 x1 x2"


def _world_files(tmp_path):
    rng = np.random.default_rng(1)
    centres, region, draw, train, t_lab = _world(rng)
    queries = np.concatenate([draw(centres, 2, 0.9), draw(region, 40, 0.8)])
    truth = np.concatenate([np.repeat(np.arange(30), 2), np.full(40, -1)])
    p = {n: str(tmp_path / f"{n}.npz") for n in ("train", "queries", "nonlandmark")}
    save_embeddings(p["train"], [f"t{i}" for i in range(len(train))], train, t_lab)
    save_embeddings(p["queries"], [f"q{i}" for i in range(len(queries))], queries, truth)
    save_embeddings(p["nonlandmark"], [f"n{i}" for i in range(200)], draw(region, 200, 0.8))
    return p


def test_nonlandmark_handling_lifts_gap_and_reports_its_constants(tmp_path):
    p = _world_files(tmp_path)
    base = evaluate(EvalConfig(queries=p["queries"], train=p["train"], recognition_k=5))
    r = evaluate(EvalConfig(queries=p["queries"], train=p["train"], recognition_k=5,
                            nonlandmark=p["nonlandmark"], nonlandmark_method="both"))  # fmt: skip
    assert r["gap"] > base["gap"] + 0.05
    assert r["nonlandmark_images"] == 200 and r["nonlandmark_penalty_neighbours"] in (1, 3, 10)
    assert r["nonlandmark_validation_gap"] > r["nonlandmark_validation_gap_before"]
    fixed = evaluate(EvalConfig(queries=p["queries"], train=p["train"], recognition_k=5,
                                nonlandmark=p["nonlandmark"], nonlandmark_method="penalty",
                                penalty_weight=0.0, penalty_neighbours=3))  # fmt: skip
    assert fixed["gap"] == pytest.approx(base["gap"])  # lambda 0: no change
    assert fixed["nonlandmark_penalty_weight"] == 0.0


def _run(*args):
    """The console script (its start-up takes seconds: one run)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([BIN, *args], capture_output=True, text=True, env=env, timeout=300)


def _bad_sets(sets, tmp_path):
    other_dim = str(tmp_path / "nl3.npz")
    save_embeddings(other_dim, ["n0", "n1"], np.eye(3)[:2])
    empty = str(tmp_path / "empty.npz")
    np.savez(empty, ids=np.zeros(0, str), embeddings=np.zeros((0, 2), np.float32))
    x, t = sets["index"], sets["train"]
    return [
        (dict(index=x, train=sets["unlabelled"], rerank="discriminative"), "has no landmark_ids"),
        (dict(index=x, rerank="discriminative+aqe"), "needs --train (labelled) and --index"),
        (dict(train=t, nonlandmark=other_dim), "has 3-d embeddings but the queries have 2-d"),
        (dict(train=t, nonlandmark=empty), "empty embedding set"),
        (dict(index=x, nonlandmark=empty), "--nonlandmark adjusts recognition"),
    ]


def test_bad_input_is_a_user_error(sets, tmp_path):
    for kwargs, message in _bad_sets(sets, tmp_path):
        with pytest.raises(UserError) as e:
            evaluate(EvalConfig(queries=sets["queries"], **kwargs))
        assert message in str(e.value)


def test_cli_bad_input_is_one_line_and_exit_2(sets, tmp_path):
    for kwargs, message in [_bad_sets(sets, tmp_path)[2]]:
        args = [a for k, v in kwargs.items() for a in (f"--{k}", v)]
        proc = _run("--queries", sets["queries"], *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("landmark-evaluate: error: "), lines
        assert message in lines[0], lines
