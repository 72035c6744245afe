"""--backbone_mode=frozen_bn: the backbone runs in inference mode inside the training step (its
BatchNorm uses and keeps its moving statistics, gamma/beta train, no drop-connect), on both
backends; the wrapper layer, the config field and its resume default."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_harness import run_layer_test
from tiny_dataset import make_dataset

from landmark_tf.config import ModelConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones, model
from landmark_tf.training import checkpointing

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import frozen_bn_run  # noqa: E402


def _tiny_backbone() -> keras.Model:
    """[B, 8, 8, 3] -> Conv -> BatchNorm -> Dropout -> [B, 8, 8, 4]: what matters of an
    EfficientNet here (BatchNorm statistics and a training-only random layer)."""
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    y = keras.layers.BatchNormalization(momentum=0.5, name="bn")(y)
    return keras.Model(x, keras.layers.Dropout(0.5, name="drop")(y), name="tiny_backbone")


FEATURES = np.random.default_rng(0).normal(3.0, 2.0, (4, 8, 8, 3)).astype("float32")


def test_wrapper_harness_and_same_variables(tmp_path):
    backbone = _tiny_backbone()
    layer = run_layer_test(backbones.InferenceModeBackbone, {"backbone": backbone}, (FEATURES,),
                           tmp_path, expected_output_shape=(4, 8, 8, 4),
                           expected_num_trainable_weights=4,  # conv kernel, bias, gamma, beta
                           expected_num_non_trainable_weights=2)  # moving mean and variance
    assert [id(v) for v in layer.variables] == [id(v) for v in backbone.variables]


def test_wrapper_keeps_inference_mode_in_a_training_call_and_passes_gradients():
    backbone = _tiny_backbone()
    bn = backbone.get_layer("bn")
    x = keras.Input((8, 8, 3))
    outer = keras.Model(x, keras.layers.Dense(2)(
        backbones.InferenceModeBackbone(backbone)(x)))
    plain = keras.Model(x, keras.layers.Dense(2)(backbone(x)))
    with tf.GradientTape() as tape:
        out = outer(FEATURES, training=True)
        loss = tf.reduce_sum(out ** 2)
    grads = tape.gradient(loss, [bn.gamma, bn.beta])
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(4))  # untouched
    # Inference mode: no dropout, so two training calls agree; the plain backbone does not.
    np.testing.assert_array_equal(outer(FEATURES, training=True).numpy(), out.numpy())
    plain(FEATURES, training=True)
    assert np.abs(bn.moving_mean.numpy()).max() > 0.1  # the plain call updates statistics


def test_models_keep_the_backbone_object_and_variable_order():
    cfg = ModelConfig(image_size=32, embedding_dim=8, num_classes=3, neck="dense")
    plain = model.build_models(cfg)
    frozen = model.build_models(ModelConfig(**{**cfg.to_dict(), "backbone_mode": "frozen_bn"}))
    wrappers = [la for la in frozen.train_model.layers
                if isinstance(la, backbones.InferenceModeBackbone)]
    assert len(wrappers) == 1 and wrappers[0].backbone is frozen.backbone
    assert not any(isinstance(la, backbones.InferenceModeBackbone)
                   for la in plain.train_model.layers)
    # The trainers' state order (train_model's variables) is the parts' order, as without it.
    assert [id(v) for v in frozen.train_model.trainable_variables] == [
        id(v) for part in (frozen.backbone, frozen.neck, frozen.head)
        for v in part.trainable_variables]
    # Paths carry per-process name counters; the npz checkpoint keys are positions.
    assert [v.shape for v in frozen.backbone.variables] == [
        v.shape for v in plain.backbone.variables]
    assert [v.shape for v in frozen.train_model.variables] == [
        v.shape for v in plain.train_model.variables]


def test_config_field_validates_and_old_workdirs_resume():
    with pytest.raises(UserError, match="backbone_mode must be one of"):
        ModelConfig(num_classes=3, backbone_mode="frozen").validate()
    old = {"model": {k: v for k, v in ModelConfig(num_classes=3).to_dict().items()
                     if k != "backbone_mode"}, "train": {}, "data": {}}
    assert checkpointing.conflicts(old, {"model": ModelConfig(num_classes=3).to_dict()}) == []
    frozen = ModelConfig(num_classes=3, backbone_mode="frozen_bn").to_dict()
    assert checkpointing.conflicts(old, {"model": frozen}) == [
        "model.backbone_mode: 'train' -> 'frozen_bn'"]
    assert ModelConfig.from_dict(old["model"]).backbone_mode == "train"


def _bn_names(results, run):
    prefix = f"{run}/"
    return sorted({k[len(prefix):].rsplit("/", 1)[0] for k in results
                   if k.startswith(prefix) and not k.endswith("embeddings")})


def _check_runs(results, min_layers: int = 40):
    start = results["start/embeddings"]
    np.testing.assert_allclose(np.linalg.norm(start, axis=1), 1.0, rtol=1e-4)  # not degenerate
    # Learning rate 0: frozen BN leaves every descriptor and statistic as it was ...
    np.testing.assert_allclose(results["frozen_lr0/embeddings"], start, rtol=1e-5, atol=1e-6)
    # ... while training-mode BN moves its statistics and so the descriptors.
    assert np.abs(results["train_lr0/embeddings"] - start).max() > 1e-3
    layers = _bn_names(results, "start")
    assert len(layers) > min_layers  # every BatchNorm of the backbone (B0: 49)
    moved = [la for la in layers if not np.array_equal(
        results[f"train_lr0/{la}/moving_mean"], results[f"start/{la}/moving_mean"])]
    assert len(moved) == len(layers)
    for la in layers:
        for var in ("moving_mean", "moving_variance"):
            for run in ("frozen_lr0", "frozen_lr"):
                np.testing.assert_array_equal(results[f"{run}/{la}/{var}"],
                                              results[f"start/{la}/{var}"], err_msg=f"{run} {la}")
    # A nonzero learning rate under frozen BN trains gamma and beta.
    for var in ("gamma", "beta"):
        changed = [la for la in layers if not np.allclose(
            results[f"frozen_lr/{la}/{var}"], results[f"start/{la}/{var}"])]
        assert "stem_bn" in changed and len(changed) > len(layers) // 2, (var, changed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    make_dataset(out, train_counts=(4, 4, 4, 4), val_counts=None, size=32)
    return out


def test_frozen_bn_runs_tensorflow_on_a_stand_in_backbone(data, tmp_path, monkeypatch):
    """The TF trainer and export on a small backbone with BatchNorm and Dropout (B0: below)."""
    monkeypatch.setattr(model.backbones, "build_backbone", frozen_bn_run.stand_in_backbone)
    _run_tensorflow(data, tmp_path, min_layers=2)


@pytest.mark.slow  # ~1 min of EfficientNet-B0 runs; make test-slow runs it
def test_frozen_bn_runs_tensorflow(data, tmp_path):
    _run_tensorflow(data, tmp_path)


def _run_tensorflow(data, tmp_path, min_layers: int = 40):
    results = frozen_bn_run.run(data, str(tmp_path))
    _check_runs(results, min_layers=min_layers)
    # The SavedModel of the frozen run gives the start's descriptors.
    from landmark_tf.serving import export

    exported = export.export_model(export.ExportConfig(
        workdir=str(tmp_path / "frozen_lr0"), export_dir=str(tmp_path / "export")))
    loaded = tf.saved_model.load(exported["export_dir"])
    for image, want in zip(frozen_bn_run.images(), results["start/embeddings"], strict=True):
        got = loaded.signatures["serving_default"](
            input_image=tf.constant(image.astype(np.uint8)))["global_descriptor"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    with open(tmp_path / "frozen_lr0" / "config.json") as f:
        assert json.load(f)["model"]["backbone_mode"] == "frozen_bn"


def _run_jax(data, tmp_path, *extra):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
           # train_lr0 compiles start's step again: let it reuse that compilation.
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "frozen_bn_run.py"), data,
                           str(tmp_path), *extra], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "results.npz") as f:
        return {k: f[k] for k in f.files}


def test_frozen_bn_runs_jax_on_a_stand_in_backbone(data, tmp_path):
    """The JAX trainer's stateless step keeps the wrapper's inference mode (a small backbone
    with BatchNorm and Dropout: B0's compilation is the slow variant below)."""
    pytest.importorskip("jax")
    _check_runs(_run_jax(data, tmp_path, "--stand_in"), min_layers=2)
    assert os.path.isfile(tmp_path / "frozen_lr0" / "checkpoints" / "ckpt-5" / "state.json")


@pytest.mark.slow  # ~5 min of XLA:CPU compilation of EfficientNet-B0; make test-slow runs it
def test_frozen_bn_runs_jax(data, tmp_path):
    pytest.importorskip("jax")
    _check_runs(_run_jax(data, tmp_path))
    assert os.path.isfile(tmp_path / "frozen_lr0" / "checkpoints" / "ckpt-5" / "state.json")
