"""--neck=dolg (GLR2021 1st place): the branches and the fusion against the released code's
per-position form, the EfficientNet taps, config round trips, and a CLI run on TensorFlow that
resumes, exports in the Kaggle format and loads in TF 2.2 (the JAX run: test_dolg_jax.py)."""

import json
import os
import subprocess
import sys

import fixtures_export as fx
import keras
import numpy as np
import pytest
from tiny_dataset import make_dataset

from landmark_tf.config import ModelConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones, dolg
from landmark_tf.modeling import model as model_lib

RNG = np.random.default_rng(0)


def _released_fusion_then_pool(fl: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """OrthogonalFusion of ch_mdl_dolg_efficientnet.py at every position, then the average pool
    (fusion_pool), in numpy, channels last."""
    dot = np.einsum("bhwc,bc->bhw", fl, fg)[..., None]
    proj = dot / np.linalg.norm(fg, axis=-1)[:, None, None, None] * fg[:, None, None, :]
    fused = np.concatenate([fl - proj, np.broadcast_to(fg[:, None, None, :], fl.shape)], -1)
    return fused.mean(axis=(1, 2))


def test_pooled_fusion_equals_the_released_per_position_fusion():
    fl = RNG.normal(size=(3, 5, 4, 6)).astype("float32")
    fg = RNG.uniform(0.1, 2.0, size=(3, 6)).astype("float32")
    got = keras.ops.convert_to_numpy(dolg.orthogonal_fusion_pooled(fl, fg))
    np.testing.assert_allclose(got, _released_fusion_then_pool(fl, fg), atol=1e-5)
    # The released projection divides by |fg|, not |fg|^2: only for a unit fg is the local part
    # orthogonal to fg.
    unit = fg / np.linalg.norm(fg, axis=-1, keepdims=True)
    orth = keras.ops.convert_to_numpy(dolg.orthogonal_fusion_pooled(fl, unit))[:, :6]
    np.testing.assert_allclose(np.sum(orth * unit, -1), 0.0, atol=1e-5)


def test_local_features_are_softplus_attention_times_unit_vectors():
    neck = dolg.DOLGNeck(embedding_dim=8, dilations=(1, 2, 3))
    local, deep = RNG.normal(size=(2, 6, 6, 5)), RNG.normal(size=(2, 3, 3, 7))
    neck([local.astype("float32"), deep.astype("float32")])
    fl, attention = (keras.ops.convert_to_numpy(t) for t in neck.local_features(
        local.astype("float32"), training=False))
    assert fl.shape == (2, 6, 6, dolg.BRANCH_DIM) and attention.shape == (2, 6, 6, 1)
    assert attention.min() > 0
    np.testing.assert_allclose(np.linalg.norm(fl / attention, axis=-1), 1.0, atol=1e-4)


def test_taps_are_stage_5_and_7_of_efficientnet_sharing_its_variables():
    net = backbones.build_backbone("efficientnet-b0")
    taps = dolg.feature_taps(net)
    mid, deep = taps(np.zeros((1, 64, 96, 3), "float32"))
    assert mid.shape == (1, 4, 6, 112) and deep.shape == (1, 2, 3, 320)
    ids = {id(v) for v in net.weights}
    assert taps.weights and all(id(v) in ids for v in taps.weights)
    assert not any(v.path.startswith("top_") for v in taps.weights)  # head conv unused


def test_neck_config_and_keras_file_round_trip(tmp_path):
    neck = dolg.DOLGNeck("gap", 2.5, 12, (2, 4, 6), "swish", name="neck")
    clone = dolg.DOLGNeck.from_config(json.loads(json.dumps(neck.get_config())))
    assert clone.get_config() == neck.get_config()
    inputs = [keras.Input((None, None, 5)), keras.Input((None, None, 7))]
    model = keras.Model(inputs, dolg.DOLGNeck(embedding_dim=12, name="neck")(inputs))
    x = [RNG.normal(size=(2, 4, 4, 5)).astype("float32"),
         RNG.normal(size=(2, 2, 2, 7)).astype("float32")]
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-6)


def test_bad_dolg_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="dolg_dilations"):
        ModelConfig(neck="dolg", num_classes=3, dolg_dilations=[3, 6]).validate()
    with pytest.raises(UserError, match="no 'block5' layers"):
        image = keras.Input((None, None, 3))
        dolg.feature_taps(keras.Model(image, keras.layers.Conv2D(2, 3)(image)))
    proc = subprocess.run([sys.executable, "-m", "landmark_tf.cli.train", "--data_dir=x",
                           f"--workdir={tmp_path}", "--train_steps=1", "--neck=dolg",
                           "--dolg_dilations=3,six,9"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--dolg_dilations=3,six,9: expected whole numbers" in \
        proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dolg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dolg")
    data, workdir = str(root / "records"), str(root / "run")
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=32)

    def train(steps):
        proc = subprocess.run(
            [sys.executable, "-m", "landmark_tf.cli.train", f"--data_dir={data}",
             f"--workdir={workdir}", f"--train_steps={steps}", "--batch_size=8",
             "--image_size=32", "--neck=dolg", "--pooling=gem", "--head=dynamic_arcface",
             "--scale=45", "--embedding_dim=16", "--checkpoint_every=1", "--val_split=",
             "--dolg_dilations=1,2,3", "--schedule=constant"],
            capture_output=True, text=True, timeout=600, env={**os.environ,
                                                              "TF_CPP_MIN_LOG_LEVEL": "2"})
        return fx.closing_json(proc)

    first, resumed = train(1), train(2)
    return {"root": str(root), "workdir": workdir, "first": first, "resumed": resumed}


def test_cli_trains_and_resumes_a_dolg_workdir(dolg_run):
    assert dolg_run["first"]["step"] == 1 and dolg_run["resumed"]["step"] == 2
    assert np.isfinite(dolg_run["resumed"]["loss"])
    with open(os.path.join(dolg_run["workdir"], "config.json")) as f:
        assert json.load(f)["model"]["neck"] == "dolg"
    embedding_model, cfg = model_lib.restore_embedding_model(dolg_run["workdir"])
    assert cfg.dolg_dilations == [1, 2, 3]
    assert isinstance(embedding_model.get_layer("neck"), dolg.DOLGNeck)


def test_a_dense_bn_stage_cannot_start_from_a_dolg_workdir(dolg_run):
    models = model_lib.build_models(ModelConfig(image_size=32, embedding_dim=16, pooling="gem",
                                                num_classes=4), with_head=False)
    with pytest.raises(UserError, match="its neck is 'dolg'"):
        model_lib.restore_for_stage(models, dolg_run["workdir"])


# The DOLG neck's SavedModel loads in TF 2.2 in make test through test_kaggle_contract's
# every pooling x neck case; this B0 export through the CLI runs with make test-slow.
@pytest.mark.slow
def test_dolg_export_keeps_the_kaggle_contract_and_loads_in_tf22(dolg_run):
    import load_savedmodel

    root = dolg_run["root"]
    export_dir = os.path.join(root, "export")
    proc = subprocess.run([sys.executable, "-m", "landmark_tf.cli.export",
                           f"--workdir={dolg_run['workdir']}", f"--export_dir={export_dir}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    result = fx.closing_json(proc)
    assert result["embedding_dim"] == 16 and result["kaggle_contract_ok"] is True
    sizes = "37x501,64x48,33x33"
    embedding_model, _ = model_lib.restore_embedding_model(dolg_run["workdir"])
    want = [fx.l2n(keras.ops.convert_to_numpy(embedding_model(
        fx.resize_for_model(im[None], 32), training=False))[0])
        for im in load_savedmodel.make_images(sizes)]
    fresh = fx.load_in_fresh_process(export_dir, sizes, os.path.join(root, "fresh.npz"))
    assert fresh["signatures"] == ["serving_batch", "serving_default", "serving_padded"]
    np.testing.assert_allclose(np.load(os.path.join(root, "fresh.npz"))["default"],
                               np.stack(want), atol=1e-4)
    fx.load_in_tf22(export_dir, sizes, os.path.join(root, "tf22.npz"))
    np.testing.assert_allclose(np.load(os.path.join(root, "tf22.npz"))["default"],
                               np.stack(want), atol=1e-4)
