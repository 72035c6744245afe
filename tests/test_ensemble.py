"""landmark-ensemble: the weighted concatenation formula, plain-TF loading, metadata, bad input.

Members are tiny exports in our format (different image sizes, scales and dims), which keeps
the test fast; the backbone inside a member does not matter to the ensemble.
"""

import json
import os

import fixtures_export as fx
import load_savedmodel
import numpy as np
import pytest
import tensorflow as tf

from landmark_tf.errors import UserError
from landmark_tf.preprocess import resize_for_model
from landmark_tf.serving import ensemble, export

SIZES = "37x501,300x200,40x40"


def _build(root: str) -> dict:
    """Two tiny members (32 px D=8; 48 px at scales 1 and 1.5, D=4), the ensemble CLI, a fresh
    process load, and the formula computed from the members' Keras models."""
    paths = {k: os.path.join(root, k) for k in ("a", "b")}
    model_a = fx.write_tiny_export(paths["a"], image_size=32, embedding_dim=8, seed=1)
    model_b = fx.write_tiny_export(paths["b"], image_size=48, embedding_dim=4, scales=(1.0, 1.5),
                                   seed=2)  # fmt: skip
    want = []
    for image in load_savedmodel.make_images(SIZES):
        a = model_a(resize_for_model(image[None], 32))[0].numpy()
        b = np.mean([model_b(resize_for_model(image[None], s))[0].numpy() for s in (48, 72)], 0)
        want.append(fx.l2n(np.concatenate([1.0 * fx.l2n(a), 0.5 * fx.l2n(b)])))
    np.save(os.path.join(root, "want.npy"), np.stack(want))
    path = os.path.join(root, "ens")
    proc = fx.run_cli("landmark-ensemble", f"--models={paths['a']},{paths['b']}",
                      "--weights=1.0,0.5", f"--export_dir={path}")  # fmt: skip
    fresh = fx.load_in_fresh_process(path, SIZES, os.path.join(root, "got.npz"))
    return {"root": root, "dir": path, "members": paths, "result": fx.closing_json(proc),
            "fresh": fresh}  # fmt: skip


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory):
    return fx.shared(tmp_path_factory, "tiny_ensemble", _build)


@pytest.fixture(scope="module")
def members(ensembled):
    return ensembled["members"]


def test_closing_json_and_metadata(members, ensembled):
    assert ensembled["result"]["embedding_dim"] == 12 and ensembled["result"]["members"] == 2
    with open(os.path.join(ensembled["dir"], "metadata.json")) as f:
        meta = json.load(f)
    assert meta["format"] == export.FORMAT and meta["kind"] == "ensemble"
    assert meta["embedding_dim"] == 12 and meta["weights"] == [1.0, 0.5]
    assert [m["path"] for m in meta["members"]] == [members["a"], members["b"]]
    assert [m["image_size"] for m in meta["members"]] == [32, 48]
    assert meta["members"][1]["input_sizes"] == [48, 72]


def test_loads_in_fresh_process_with_only_tensorflow(ensembled):
    r = ensembled["fresh"]
    assert r["signatures"] == ["serving_batch", "serving_default", "serving_padded"]
    assert r["shapes"] == [[12]] * 3 and np.allclose(r["norms"], 1.0, atol=1e-5)
    assert r["deterministic"] and r["distinct"] and not r["landmark_tf_imported"]
    assert r["padded_max_diff"] < 1e-5 and r["batch_max_diff"] < 1e-5


def test_output_is_the_weighted_normalised_concatenation(ensembled):
    """l2n(concat(1.0 * l2n(a), 0.5 * l2n(b))), a and b computed from the members' Keras models."""
    got = np.load(os.path.join(ensembled["root"], "got.npz"))["default"]
    want = np.load(os.path.join(ensembled["root"], "want.npy"))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bad_weights():
    with pytest.raises(UserError, match="2 values but --models has 3"):
        ensemble.check_weights(["a", "b", "c"], [1.0, 0.5])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="must be a positive number"):
            ensemble.check_weights(["a", "b"], [1.0, bad])
    with pytest.raises(UserError, match="at least one"):
        ensemble.check_weights([], None)
    assert ensemble.check_weights(["a", "b"], None) == [1.0, 1.0]


def test_member_that_is_not_ours(members, tmp_path):
    plain = str(tmp_path / "plain")
    module = tf.Module()
    module.f = tf.function(lambda x: {"global_descriptor": tf.reduce_mean(tf.cast(x, tf.float32),
                                                                         [0, 1])},
                           input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    tf.saved_model.save(module, plain, signatures={"serving_default": module.f})
    cfg = ensemble.EnsembleConfig(models=[members["a"], plain], export_dir=str(tmp_path / "e"))
    with pytest.raises(UserError, match="no metadata.json"):
        ensemble.build_ensemble(cfg)
    with open(os.path.join(plain, "metadata.json"), "w") as f:
        json.dump({"format": "someone-else/v3"}, f)
    with pytest.raises(UserError, match="not one of our exports"):
        ensemble.build_ensemble(cfg)
    with pytest.raises(UserError, match="not found"):
        ensemble.build_ensemble(ensemble.EnsembleConfig([str(tmp_path / "x")], "e"))
    assert not os.path.exists(tmp_path / "e")


def test_cli_bad_weight_is_one_line_exit_2(members, tmp_path):
    proc = fx.run_cli("landmark-ensemble", f"--models={members['a']},{members['b']}",
                      "--weights=1,0", f"--export_dir={tmp_path / 'e'}")  # fmt: skip
    fx.assert_one_line_error(proc, "--weights", "positive")
    with pytest.raises(UserError, match="--weights"):
        export.parse_float_list(["1", "x"], "--weights")


@pytest.mark.slow
def test_efficientnet_member_next_to_a_tiny_one(tmp_path_factory, members, tmp_path):
    """A real B0 export (40/60 px, D=16) with a tiny one (32 px, D=8), weights 1 and 0.8."""
    b0 = fx.shared(tmp_path_factory, "b0_export", fx.build_b0_export)
    path = str(tmp_path / "ens")
    cfg = ensemble.EnsembleConfig([b0["dir"], members["a"]], path, [1.0, 0.8])
    assert ensemble.build_ensemble(cfg)["embedding_dim"] == 24
    r = fx.load_in_fresh_process(path, fx.B0_SIZES, str(tmp_path / "d.npz"))
    assert r["shapes"] == [[24]] * 3 and r["deterministic"] and r["padded_max_diff"] < 1e-5
    tiny = tf.saved_model.load(members["a"]).signatures["serving_default"]
    images = load_savedmodel.make_images(fx.B0_SIZES)
    a = np.stack([tiny(input_image=im)["global_descriptor"].numpy() for im in images])
    want = fx.l2n(np.concatenate([np.load(os.path.join(b0["root"], "want.npy")), 0.8 * a], 1))
    np.testing.assert_allclose(np.load(tmp_path / "d.npz")["default"], want, atol=1e-5, rtol=0)
    # Kaggle GLR2020's TensorFlow: the ensemble of a re-loaded B0 export loads there too.
    r22 = fx.load_in_tf22(path, fx.B0_SIZES, str(tmp_path / "tf22.npz"))
    assert r22["shapes"] == [[24]] * 3 and r22["padded_max_diff"] < 1e-5
    np.testing.assert_allclose(np.load(tmp_path / "tf22.npz")["default"], want, atol=1e-4, rtol=0)
