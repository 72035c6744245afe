"""The assembled models, mixed precision, and the checkpoint layout shared with training/export."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from landmark_tf.config import ModelConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import model as model_lib

CFG = dict(backbone="efficientnet-b0", image_size=32, pooling="gem", embedding_dim=8,
           head="cosface", scale=4.0, margin=0.3, num_classes=5)
IMAGES = np.random.default_rng(0).uniform(0, 255, size=(3, 32, 32, 3)).astype("float32")
LABELS = np.array([0, 3, 4], dtype="int32")


def embed(models):
    return keras.ops.convert_to_numpy(models.embedding_model(IMAGES))


def write_workdir(path, models, **overrides):
    """A training workdir as landmark-train leaves it: config.json + one checkpoint."""
    cfg = {**models.config.to_dict(), **overrides}
    (path / "config.json").write_text(json.dumps({"model": cfg, "train": {}, "data": {}}))
    checkpoint = model_lib.make_checkpoint(models, step=tf.Variable(7, dtype=tf.int64))
    tf.train.CheckpointManager(checkpoint, str(path / "checkpoints"), max_to_keep=1).save()
    return str(path)


@pytest.fixture(scope="module")
def models():
    return model_lib.build_models(ModelConfig(**CFG))


@pytest.fixture(scope="module")
def workdir(models, tmp_path_factory):
    """(path, embeddings at save time): tests calling with training=True move BN statistics."""
    return write_workdir(tmp_path_factory.mktemp("workdir"), models), embed(models)


def test_embedding_model_outputs_unit_float32(models):
    out = models.embedding_model(IMAGES)
    assert out.shape == (3, 8) and keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_train_model_applies_margin_only_in_training(models):
    infer = models.train_model({"image": IMAGES, "label": LABELS}, training=False)
    np.testing.assert_allclose(models.eval_logits_model(IMAGES), infer, rtol=1e-5, atol=1e-5)
    # training=True also switches BatchNorm to batch statistics and turns on the backbone's
    # stochastic depth; switch the latter off so that two training calls see the same features.
    dropouts = [la for la in models.backbone.layers if isinstance(la, keras.layers.Dropout)]
    rates = [la.rate for la in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        train = models.train_model({"image": IMAGES, "label": LABELS}, training=True)
        features = models.neck(models.backbone(IMAGES, training=True), training=True)
    finally:
        for layer, rate in zip(dropouts, rates, strict=True):
            layer.rate = rate
    np.testing.assert_allclose(train, models.head(features, LABELS, training=True), atol=1e-4)
    np.testing.assert_allclose(train - models.head(features), -4.0 * 0.3 * np.eye(5)[LABELS],
                               atol=1e-4)


def test_mixed_bfloat16_backbone_float32_outputs():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = model_lib.build_models(ModelConfig(**{**CFG, "head": "arcface"}))
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.backend.standardize_dtype(mixed.backbone(IMAGES).dtype) == "bfloat16"
    out = mixed.embedding_model(IMAGES)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    logits = mixed.train_model({"image": IMAGES, "label": LABELS}, training=True)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_checkpoint_round_trip_gives_identical_embeddings(models, tmp_path):
    norm = next(la for la in models.backbone.layers if isinstance(la, keras.layers.Normalization))
    original = norm.adapt_mean.numpy()
    # A checkpoint restore must also reach Normalization's cached mean (it is not re-read).
    norm.adapt_mean.assign(original + 0.1)
    norm.finalize_state()
    try:
        workdir = write_workdir(tmp_path, models)
        restored, cfg = model_lib.restore_embedding_model(workdir)
        np.testing.assert_array_equal(restored(IMAGES).numpy(), embed(models))
    finally:
        norm.adapt_mean.assign(original)
        norm.finalize_state()
    assert cfg == models.config


def test_restore_for_stage_with_other_class_count_skips_head(models, workdir):
    stage2 = model_lib.build_models(ModelConfig(**{**CFG, "num_classes": 7}))
    head_before = stage2.head.kernel.numpy()
    report = model_lib.restore_for_stage(stage2, workdir[0])
    assert report["restored"] == ["backbone", "neck"]
    assert "num_classes" in report["skipped"]["head"]
    assert report["checkpoint"].endswith("ckpt-1")
    np.testing.assert_array_equal(embed(stage2), workdir[1])
    np.testing.assert_array_equal(stage2.head.kernel.numpy(), head_before)


def test_restore_for_stage_with_same_head_restores_it(models, workdir):
    same = model_lib.build_models(ModelConfig(**{**CFG, "image_size": 64}))
    assert model_lib.restore_for_stage(same, workdir[0])["restored"] == ["backbone", "head", "neck"]
    np.testing.assert_array_equal(same.head.kernel.numpy(), models.head.kernel.numpy())


def test_restore_errors_are_user_errors(models, tmp_path):
    with pytest.raises(UserError, match="config.json: not found"):
        model_lib.restore_embedding_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model": CFG}))
    with pytest.raises(UserError, match="no checkpoint"):
        model_lib.restore_embedding_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model": {**CFG, "pooling": "gap"}}))
    with pytest.raises(UserError, match="pooling is 'gap'"):
        model_lib.restore_for_stage(models, str(tmp_path))
    with pytest.raises(UserError, match="num_classes must be >= 2"):
        model_lib.build_models(ModelConfig(**{**CFG, "num_classes": 0}))


def test_restore_for_stage_checks_the_neck(models, workdir):
    """dense_bn and dense_syncbn hold the same variables and transfer; a neck without BN (or
    with another activation) would silently drop or misuse them, so it is refused."""
    sync = model_lib.build_models(ModelConfig(**{**CFG, "neck": "dense_syncbn"}))
    assert model_lib.restore_for_stage(sync, workdir[0])["restored"] == [
        "backbone", "head", "neck"]
    np.testing.assert_array_equal(embed(sync), workdir[1])
    for change, message in [({"neck": "dense"}, "neck is 'dense_bn'"),
                            ({"neck_activation": "swish"}, "neck_activation is 'linear'")]:
        other = model_lib.build_models(ModelConfig(**{**CFG, **change}))
        with pytest.raises(UserError, match=message):
            model_lib.restore_for_stage(other, workdir[0])


def test_winner_neck_and_head_build_and_embed():
    cfg = ModelConfig(**{**CFG, "pooling": "gap", "neck": "dense", "neck_activation": "swish",
                         "head": "adacos_per_batch", "scale": None})
    built = model_lib.build_models(cfg)
    assert built.neck.bn is None and type(built.head).__name__ == "PerBatchAdaCos"
    out = keras.ops.convert_to_numpy(
        built.train_model({"image": IMAGES, "label": LABELS}, training=True))
    assert out.shape == (3, 5) and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(embed(built), axis=1), 1.0, rtol=1e-5)
