"""SuperGlobal pooling at inference: regional GeM against the released formula, maps smaller than
its window, Scale-GeM's max, and an export that keeps the Kaggle contract (TF 2.2 included)."""

import json
import os
import subprocess
import sys

import fixtures_export as fx
import keras
import numpy as np
import pytest
from layer_harness import run_layer_test

from landmark_tf.modeling import superglobal_pooling as sgp
from landmark_tf.modeling.model import restore_embedding_model
from landmark_tf.preprocess import resize_for_model

EXPORT_SIZES = "37x501,300x200,33x33"


def _reference(x, p=2.5, size=5):
    """The released rgem on a non-negative NHWC map: 0.5 * LPPool(ReflectionPad(x) / 25^(1/p))
    + 0.5 * x, where LPPool = (sum over the window of v^p)^(1/p)."""
    pad = (size - 1) // 2
    padded = np.pad(x / (size**2) ** (1 / p), ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                    mode="reflect")
    _, h, w, _ = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            window = padded[:, i:i + size, j:j + size, :]
            out[:, i, j, :] = np.sum(window**p, axis=(1, 2)) ** (1 / p)
    return 0.5 * out + 0.5 * x


def test_regional_gem_matches_the_released_formula():
    x = np.random.default_rng(0).uniform(0.01, 3.0, (2, 6, 7, 3)).astype(np.float32)
    got = keras.ops.convert_to_numpy(sgp.RegionalGeM()(x))
    np.testing.assert_allclose(got, _reference(x.astype(np.float64)), rtol=2e-5)


@pytest.mark.parametrize("side", [1, 2])
def test_maps_smaller_than_the_window(side):
    """PyTorch's ReflectionPad2d(2) refuses sides below 3; here reflection repeats (numpy's
    reflect padding does the same), and a 1x1 map is its own neighbourhood."""
    x = np.random.default_rng(1).uniform(0.1, 2.0, (1, side, side, 4)).astype(np.float32)
    got = keras.ops.convert_to_numpy(sgp.RegionalGeM()(x))
    np.testing.assert_allclose(got, _reference(x.astype(np.float64)), rtol=2e-5)
    if side == 1:
        np.testing.assert_allclose(got, x, rtol=1e-6)


def test_regional_gem_clamps_negative_activations_and_keeps_config(tmp_path):
    x = np.full((1, 3, 3, 2), -0.2, np.float32)  # swish's negative range
    got = keras.ops.convert_to_numpy(sgp.RegionalGeM()(x))
    np.testing.assert_allclose(got, 0.5 * 1e-6 + 0.5 * x, atol=1e-6)
    run_layer_test(sgp.RegionalGeM, {"p": 3.0, "size": 3}, (np.abs(x) + 0.1,), tmp_path,
                   expected_output_shape=(1, 3, 3, 2), expected_num_trainable_weights=0)


def test_scale_max_is_the_elementwise_max_of_unit_vectors():
    a, b = np.array([[3.0, 0.0, 4.0]]), np.array([[0.0, 1.0, 0.0]])
    got = keras.ops.convert_to_numpy(sgp.combine_scales([a, b], "max"))
    np.testing.assert_allclose(got, [[0.6, 1.0, 0.8]])
    mean = keras.ops.convert_to_numpy(sgp.combine_scales([a, b], "mean"))
    np.testing.assert_allclose(mean, [[1.5, 0.5, 2.0]])
    assert sgp.scales_for("superglobal", None) == [0.7071, 1.0, 1.4142]
    assert sgp.scales_for("superglobal", [1.0]) == [1.0] and sgp.scales_for("trained", None) is None


def test_regional_gem_runs_on_jax():
    code = ("import numpy as np, keras; from landmark_tf.modeling.superglobal_pooling import "
            "RegionalGeM; x = np.ones((1, 2, 3, 4), np.float32); "
            "print(np.asarray(RegionalGeM()(x)).sum())")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) == pytest.approx(24.0, rel=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A B0 workdir (trained at 32 px) exported with --inference_pooling=superglobal at 48 px:
    scales 0.7071/1/1.4142 -> 34, 48, 68 px -> 2x2, 2x2 and 3x3 maps under the 5x5 window."""
    root = tmp_path_factory.mktemp("sg_export")
    workdir, export_dir = str(root / "workdir"), str(root / "export")
    os.makedirs(workdir)
    fx.make_workdir(workdir)
    proc = fx.run_cli("landmark-export", f"--workdir={workdir}", f"--export_dir={export_dir}",
                      "--image_size=48", "--inference_pooling=superglobal")
    return {"root": str(root), "workdir": workdir, "dir": export_dir,
            "result": fx.closing_json(proc)}


def _want(workdir, sizes):
    import load_savedmodel

    model, _ = restore_embedding_model(workdir, "superglobal")
    out = []
    for image in load_savedmodel.make_images(EXPORT_SIZES):
        parts = [model(resize_for_model(image[None], s), training=False) for s in sizes]
        out.append(fx.l2n(keras.ops.convert_to_numpy(sgp.combine_scales(parts, "max"))[0]))
    return np.stack(out)


def test_export_keeps_the_kaggle_contract_and_equals_the_model(exported):
    result = exported["result"]
    assert result["kaggle_contract_ok"], result
    with open(os.path.join(exported["dir"], "metadata.json")) as f:
        meta = json.load(f)
    assert meta["inference_pooling"] == "superglobal" and meta["scale_combine"] == "max"
    assert meta["input_sizes"] == [34, 48, 68]
    got = _serving_default(exported)
    want = _want(exported["workdir"], meta["input_sizes"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want[0] - want[1]).max() > 1e-4  # different images, different descriptors


def _serving_default(exported) -> np.ndarray:
    """serving_default of the export on each image, loaded in this process (once)."""
    import load_savedmodel
    import tensorflow as tf

    from landmark_tf.serving import signatures

    if "got" not in exported:
        fn = signatures.load_quietly(exported["dir"]).signatures[signatures.DEFAULT]
        exported["got"] = np.stack([fn(input_image=tf.constant(im))[signatures.OUTPUT].numpy()
                                    for im in load_savedmodel.make_images(EXPORT_SIZES)])
    return exported["got"]


def test_export_loads_in_tensorflow_2_2(exported, tmp_path):
    r = fx.load_in_tf22(exported["dir"], EXPORT_SIZES, str(tmp_path / "tf22.npz"))
    got = np.load(str(tmp_path / "tf22.npz"))["default"]
    want = _serving_default(exported)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert r["padded_max_diff"] < 1e-5


def test_embed_refuses_the_option_for_a_savedmodel(tmp_path):
    proc = fx.run_cli("landmark-embed", f"--model={tmp_path}", f"--output={tmp_path}/x.npz",
                      "--csv=x.csv", "--inference_pooling=superglobal")
    fx.assert_one_line_error(proc, "--inference_pooling applies to --workdir")


def test_embed_workdir_path_gives_the_export_descriptors(exported):
    """landmark-embed --workdir --inference_pooling=superglobal (default strategy, CPU) gives
    what the superglobal export gives, image for image."""
    import load_savedmodel

    from landmark_tf.serving import embed_accel

    accel = embed_accel.AccelConfig(workdir=exported["workdir"], image_size=48,
                                    scales=sgp.SCALES, inference_pooling="superglobal")
    embedder = embed_accel.AccelEmbedder(accel, batch_size=2)
    got = embedder(load_savedmodel.make_images(EXPORT_SIZES))
    np.testing.assert_allclose(got, _serving_default(exported), atol=1e-5, rtol=0)
    assert embedder.fingerprint()["inference_pooling"] == "superglobal"


def test_models_it_cannot_pool_are_a_one_line_error():
    """DOLG's two-branch neck has no pooling to replace: refused, not an AttributeError."""
    from landmark_tf.config import ModelConfig
    from landmark_tf.errors import UserError
    from landmark_tf.modeling import model

    dolg = model.build_models(ModelConfig(image_size=32, embedding_dim=8, num_classes=3,
                                          neck="dolg", pooling="gem"), with_head=False)
    with pytest.raises(UserError, match="not --neck=dolg"):
        model.check_superglobal_pooling(dolg)
    plain = model.build_models(ModelConfig(image_size=32, embedding_dim=8, num_classes=3),
                               with_head=False)
    model.check_superglobal_pooling(plain)
