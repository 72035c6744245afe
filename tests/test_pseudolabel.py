"""landmark-pseudolabel: the vectorised vote against knn.vote_landmarks, confidence and threshold
on hand-placed embeddings, the train.csv contract with landmark-tfrecords, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from landmark_tf.curation import pseudolabel
from landmark_tf.data import planning
from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn
from landmark_tf.retrieval.embeddings import save_embeddings

BIN = os.path.join(os.path.dirname(sys.executable), "landmark-pseudolabel")


def _at(*angles):
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_vote_equals_the_loop_reference():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, size=(300, 7)).astype(np.float32)
    scores[rng.uniform(size=scores.shape) < 0.05] = -np.inf
    lms = rng.integers(-1, 4, size=scores.shape)
    lms[:3] = -1  # rows with no landmark at all
    got = pseudolabel.vote(scores, lms)
    want = knn.vote_landmarks(scores, lms)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.fixture()
def sets(tmp_path):
    """Train landmarks 7 (angles ~0) and 9 (~1.5); unlabelled: near 7, near 9, half-way, and tr1
    which is already labelled."""
    p = {"labelled": str(tmp_path / "train.npz"), "unlabelled": str(tmp_path / "index.npz")}
    save_embeddings(p["labelled"], ["tr0", "tr1", "tr2", "tr3"], _at(0.0, 0.05, 1.5, 1.45),
                    [7, 7, 9, 9])
    save_embeddings(p["unlabelled"], ["un0", "un1", "un2", "tr1"], _at(0.02, 1.48, 0.75, 0.05))
    return p


def test_confident_labels_only_and_readable_by_tfrecords(sets, tmp_path):
    out = str(tmp_path / "pl" / "pseudo.csv")
    r = pseudolabel.pseudolabel(pseudolabel.PseudoLabelConfig(
        sets["labelled"], sets["unlabelled"], out, threshold=0.6, k=2))
    assert (r["labelled"], r["threshold"], r["skipped_already_labelled"]) == (2, 0.6, 1)
    with open(out) as f:
        lines = f.read().splitlines()
    assert lines[0] == "id,url,landmark_id,confidence"
    rows = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    assert set(rows) == {"un0", "un1"}  # un2 (half-way) splits its vote: confidence ~0.36
    assert rows["un0"][2] == "7" and rows["un1"][2] == "9"
    # confidence = mean cosine to the two landmark-7 neighbours.
    assert float(rows["un0"][3]) == pytest.approx((np.cos(0.02) + np.cos(0.03)) / 2, abs=1e-5)
    plan = planning.build_plan(train_csv=out)
    assert sorted(ex.image_id for ex in plan.splits["train"]) == ["un0", "un1"]
    lower = pseudolabel.pseudolabel(pseudolabel.PseudoLabelConfig(
        sets["labelled"], sets["unlabelled"], out, threshold=0.3, k=2))
    assert lower["labelled"] == 3


def test_unlabelled_reference_is_an_error(sets, tmp_path):
    with pytest.raises(UserError, match="no landmark_ids"):
        pseudolabel.pseudolabel(pseudolabel.PseudoLabelConfig(
            sets["unlabelled"], sets["unlabelled"], str(tmp_path / "x.csv")))


def test_cli(sets, tmp_path):
    out = str(tmp_path / "pseudo.csv")
    args = [BIN, f"--labelled={sets['labelled']}", f"--unlabelled={sets['unlabelled']}",
            f"--output={out}", "--k=2"]
    p = subprocess.run([*args, "--threshold=0.9"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["labelled"] == 2 and last["threshold"] == 0.9
    p = subprocess.run([*args, "--threshold=3"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("landmark-pseudolabel: error:")
