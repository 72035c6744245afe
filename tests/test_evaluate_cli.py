"""landmark-evaluate end to end on hand-made embeddings whose rankings are known, the .npz
contract, and bad input."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from landmark_tf.errors import UserError
from landmark_tf.retrieval.embeddings import load_embeddings, save_embeddings
from landmark_tf.retrieval.evaluation import EvalConfig, evaluate

BIN = os.path.join(os.path.dirname(sys.executable), "landmark-evaluate")


def _at(*angles):
    """Unit 2-D vectors at these angles: similarity falls with angular distance."""
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


@pytest.fixture()
def files(tmp_path):
    """Index i0..i3 at angles 0, .3, .7, 1.5; queries at 0, 1.5, .65, .02; a labelled train set."""
    p = {name: str(tmp_path / f"{name}.npz") for name in ("index", "queries", "train")}
    save_embeddings(p["index"], ["i0", "i1", "i2", "i3"], _at(0.0, 0.3, 0.7, 1.5))
    save_embeddings(p["queries"], ["q0", "q1", "q2", "q3"], _at(0.0, 1.5, 0.65, 0.02))
    save_embeddings(
        p["train"], ["t0", "t1", "t2", "t3"], _at(0.0, 0.1, 0.75, 1.5), [10, 10, 20, 30]
    )
    p["solution"] = str(tmp_path / "retrieval_solution.csv")
    with open(p["solution"], "w") as f:
        # q0 ranks i0 i1 i2 i3; q1 ranks i3 i2 i1 i0; q2 ranks i2 i1 i0 i3. i9 is unknown; qX has
        # no embedding; q3 is ignored.
        f.write("id,images,Usage\nq0,i1 i2,Public\nq1,i0,Private\nq2,i2 i9,Private\n")
        f.write("q3,None,Ignored\nqX,i3,Public\n")
    p["recognition_solution"] = str(tmp_path / "recognition_solution.csv")
    with open(p["recognition_solution"], "w") as f:
        f.write("id,landmarks,Usage\nq0,10,Public\nq1,30,Private\nq2,20,Private\n")
        f.write("q3,None,Public\nqX,10,Public\n")
    return p


def test_retrieval_map_per_usage_and_submission(files, tmp_path):
    sub = str(tmp_path / "out" / "submission.csv")
    r = evaluate(EvalConfig(queries=files["queries"], index=files["index"],
                            solution=files["solution"], submission=sub))  # fmt: skip
    # APs: q0 (1/2 + 2/3)/2 = 7/12; q1 (1/4)/1; q2 (1/1)/2 (i9 never found); qX 0.
    assert r["map@100_public"] == pytest.approx((7 / 12 + 0) / 2, abs=1e-6)
    assert r["map@100_private"] == pytest.approx((1 / 4 + 1 / 2) / 2, abs=1e-6)
    assert r["map@100"] == pytest.approx((7 / 12 + 1 / 4 + 1 / 2) / 4, abs=1e-6)
    assert r["retrieval_solution_queries_missing"] == 1 and r["solution_images_unknown"] == 1
    assert r["retrieval_queries_not_scored"] == 1  # q3 is Ignored
    with open(sub) as f:
        lines = f.read().splitlines()
    assert lines[0] == "id,images" and lines[2] == "q1,i3 i2 i1 i0"


def test_recognition_gap_per_usage_and_submission(files, tmp_path):
    sub = str(tmp_path / "recognition.csv")
    r = evaluate(EvalConfig(queries=files["queries"], train=files["train"], recognition_k=2,
                            recognition_solution=files["recognition_solution"],
                            recognition_submission=sub))  # fmt: skip
    # Votes (top 2): q3 -> 10 (1.9966), q0 -> 10 (1.9950), q1 -> 30 (1.0), q2 -> 20 (0.995).
    # Ranked: q3 wrong (non-landmark), q0 right 1/2, q1 right 2/3, q2 right 3/4; qX (landmark,
    # no prediction) only adds to the denominator.
    assert r["gap"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 4, abs=1e-6)
    assert r["gap_public"] == pytest.approx((1 / 2) / 2, abs=1e-6)
    assert r["gap_private"] == pytest.approx(1.0, abs=1e-6)
    assert r["recognition_solution_queries_missing"] == 1
    with open(sub) as f:
        assert f.read().splitlines()[1:3] == ["q0,10 1.995004", "q1,30 1.000000"]


def test_labels_stand_in_for_a_solution_and_rerank_and_ivf_run(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    lm = rng.integers(0, 20, 600)
    x = centres[lm] + 0.8 * rng.normal(size=(600, 16))
    save_embeddings(str(tmp_path / "x.npz"), [f"x{i}" for i in range(500)], x[:500], lm[:500])
    save_embeddings(str(tmp_path / "q.npz"), [f"q{i}" for i in range(100)], x[500:], lm[500:])
    common = dict(queries=str(tmp_path / "q.npz"), index=str(tmp_path / "x.npz"))
    plain = evaluate(EvalConfig(**common))
    both = evaluate(EvalConfig(**common, rerank="dba+aqe", qe_k=3))
    ivf = evaluate(EvalConfig(**common, index_type="ivf", nlist=8, nprobe=8))
    assert plain["retrieval_solution"] == "landmark_ids"
    assert 0 < plain["map@100"] < both["map@100"]
    assert ivf["ivf_recall@100"] == 1.0 and ivf["map@100"] == pytest.approx(plain["map@100"])
    assert plain["index_renormalised"] == 500  # the vectors above were not unit length
    # IVF visiting every list + dba+aqe, DBA rewriting the IVF index in place: same as flat.
    ivf_both = evaluate(EvalConfig(**common, rerank="dba+aqe", qe_k=3, index_type="ivf",
                                   nlist=8, nprobe=8))  # fmt: skip
    assert ivf_both["map@100"] == pytest.approx(both["map@100"], abs=1e-6)
    assert ivf_both["index_ivf_spherical"] is True


def test_revisitop_easy_medium_hard(files, tmp_path):
    db_ids = [f"img{i}" for i in range(6)]
    # Query at angle 0; db image ranked r-th lies at angle 0.1 (r + 1): ranking 3, 0, 5, 1, 2, 4.
    order = [3, 0, 5, 1, 2, 4]
    angles = np.empty(6)
    angles[order] = 0.1 * (np.arange(6) + 1)
    save_embeddings(str(tmp_path / "db.npz"), db_ids + ["distractor"], _at(*angles, 3.0))
    save_embeddings(str(tmp_path / "q.npz"), ["query0", "stray"], _at(0.0, 1.0))
    gnd = {"imlist": db_ids, "qimlist": ["query0"],
           "gnd": [{"easy": [0, 2], "hard": [1], "junk": [5], "bbx": [0, 0, 9, 9]}]}  # fmt: skip
    with open(tmp_path / "gnd.pkl", "wb") as f:
        pickle.dump(gnd, f)
    r = evaluate(EvalConfig(queries=str(tmp_path / "q.npz"), index=str(tmp_path / "db.npz"),
                            revisitop_gnd=str(tmp_path / "gnd.pkl")))  # fmt: skip
    assert r["revisitop_map_easy"] == pytest.approx(5 / 12, abs=1e-6)
    assert r["revisitop_map_medium"] == pytest.approx(37 / 72, abs=1e-6)
    assert r["revisitop_map_hard"] == pytest.approx(1 / 4, abs=1e-6)
    assert r["revisitop_distractors"] == 1 and r["revisitop_queries_ignored"] == 1
    assert r["revisitop_queries_cropped"] == 0 and r["revisitop_queries_uncropped"] == 1
    for index_type in ("flat", "ivf"):  # the same ranking from the IVF index's stored vectors
        again = evaluate(EvalConfig(queries=str(tmp_path / "q.npz"), index_type=index_type,
                                    index=str(tmp_path / "db.npz"), nlist=1,
                                    revisitop_gnd=str(tmp_path / "gnd.pkl")))  # fmt: skip
        assert again["revisitop"] == r["revisitop"]


# ---------------------------------------------------------------- the .npz contract


def test_embeddings_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "e.npz")
    save_embeddings(path, ["a", "b"], np.eye(2, dtype=np.float64), np.array([3, -1]))
    es = load_embeddings(path)
    assert es.ids.tolist() == ["a", "b"] and es.embeddings.dtype == np.float32
    assert es.landmark_ids.dtype == np.int64 and es.landmark_ids.tolist() == [3, -1]
    assert len(es) == 2 and es.dim == 2
    assert [n for n in os.listdir(tmp_path / "sub")] == ["e.npz"]  # no temporary left behind


def _raw(tmp_path, **arrays):
    path = str(tmp_path / "raw.npz")
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(ids=np.array(["a", "a"]), embeddings=np.eye(2)), "more than once.*'a'"),
        (dict(ids=np.array([], dtype=str), embeddings=np.zeros((0, 4))), "empty"),
        (dict(ids=np.array(["a"]), embeddings=np.eye(2)), "2 embedding rows"),
        (dict(ids=np.array(["a", "b"]), embeddings=np.array([[1, 0], [np.nan, 1]])), "NaN.*'b'"),
        (dict(ids=np.array(["a"]), embeddings=np.zeros((1, 3))), "all zero.*'a'"),
        (dict(ids=np.array(["a"]), vectors=np.eye(1)), "missing array"),
        (dict(ids=np.array([b"a"]), embeddings=np.eye(1), landmark_ids=np.ones(1)), "int"),
        (dict(ids=np.array(["a"], dtype=object), embeddings=np.eye(1)), "Python objects"),
    ],
)
def test_bad_embedding_files_are_user_errors(tmp_path, arrays, match):
    with pytest.raises(UserError, match=match):
        load_embeddings(_raw(tmp_path, **arrays))


def test_mismatched_dims_and_unknown_solution(files, tmp_path):
    save_embeddings(str(tmp_path / "q3.npz"), ["z"], np.ones((1, 3)))
    with pytest.raises(UserError, match="dimensions"):
        evaluate(EvalConfig(queries=str(tmp_path / "q3.npz"), index=files["index"]))
    wrong = str(tmp_path / "wrong.csv")
    with open(wrong, "w") as f:
        f.write("id,images,Usage\nother1,i0,Public\nother2,i1,Private\n")
    with pytest.raises(UserError, match="none of its 2 scored query ids"):
        evaluate(EvalConfig(queries=files["queries"], index=files["index"], solution=wrong))


# ---------------------------------------------------------------- the console script


def _run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([BIN, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_prints_table_then_one_json_line(files):
    proc = _run("--index", files["index"], "--queries", files["queries"],
                "--solution", files["solution"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["map@100"] == pytest.approx((7 / 12 + 1 / 4 + 1 / 2) / 4, abs=1e-6)
    assert "mAP@100 Public" in proc.stderr and "warning: 1 scored query ids" in proc.stderr


def test_combined_log_ends_with_the_json_line(files, tmp_path):
    """`>log 2>&1`, as runs are logged under nohup: the stderr table first, whole lines, then
    the JSON line last (TF's start-up lines are filtered on the way)."""
    log = tmp_path / "log"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(log, "w") as f:
        proc = subprocess.run([BIN, "--index", files["index"], "--queries", files["queries"],
                               "--solution", files["solution"]], stdout=f,
                              stderr=subprocess.STDOUT, env=env, timeout=300)  # fmt: skip
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, lines
    result = json.loads(lines[-1])
    assert result["map@100"] == pytest.approx((7 / 12 + 1 / 4 + 1 / 2) / 4, abs=1e-6)
    assert not any("{" in line for line in lines[:-1]), lines  # the JSON is nowhere else
    assert any(line.strip().startswith("mAP@100 Public") for line in lines), lines


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--queries is required: the query embedding set (.npz)"),
        (["--queries", "q.npz"], "nothing to do: give --index (retrieval) and/or --train "
                                 "(recognition)"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"landmark-evaluate: error: {message}"]
