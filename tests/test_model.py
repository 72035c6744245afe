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


def _keras_workdir(path, models, optimizer=None, step=3):
    """A workdir in the current checkpoint format (both backends write it)."""
    from landmark_tf.modeling import checkpoint

    (path / "config.json").write_text(json.dumps({"model": models.config.to_dict(),
                                                  "train": {}, "data": {}}))
    parts = {p: getattr(models, p) for p in checkpoint.PARTS}
    seeds = checkpoint.seed_states(models.train_model)
    checkpoint.save(str(path / "checkpoints"), step, parts, optimizer, seeds, {"backend": "x"})
    return str(path)


def test_keras_weights_checkpoint_round_trip_with_optimizer_and_seeds(models, tmp_path):
    from landmark_tf.modeling import checkpoint

    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(models.train_model.trainable_variables)
    optimizer.variables[-1].assign(np.full(optimizer.variables[-1].shape, 0.5, "float32"))
    seeds = checkpoint.seed_states(models.train_model)
    seeds[0].assign(np.array([11, 12], dtype=seeds[0].dtype))
    workdir = _keras_workdir(tmp_path, models, optimizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-3"]
    fresh = model_lib.build_models(ModelConfig(**CFG))
    fresh_opt = keras.optimizers.SGD(0.1, momentum=0.9)
    fresh_opt.build(fresh.train_model.trainable_variables)
    fresh_seeds = checkpoint.seed_states(fresh.train_model)
    found = model_lib.latest_checkpoint(workdir)
    assert (found.kind, found.step) == ("keras", 3)
    assert model_lib.restore_train_state(fresh, found, fresh_opt, fresh_seeds) == 3
    for a, b in zip(models.train_model.weights, fresh.train_model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    np.testing.assert_array_equal(fresh_opt.variables[-1].numpy(), 0.5)
    np.testing.assert_array_equal(fresh_seeds[0].numpy(), [11, 12])
    np.testing.assert_allclose(embed(fresh), embed(models), atol=1e-6)


def test_a_changed_model_fails_loudly_instead_of_loading_shuffled_weights(models, tmp_path):
    workdir = _keras_workdir(tmp_path, models)
    other = model_lib.build_models(ModelConfig(**{**CFG, "embedding_dim": 16}), with_head=False)
    with pytest.raises(UserError, match="neck does not fit this run's model"):
        model_lib.restore_parts(other, model_lib.latest_checkpoint(workdir), ["neck"])


def test_a_half_written_checkpoint_is_ignored(models, tmp_path):
    workdir = _keras_workdir(tmp_path, models, step=3)
    partial = tmp_path / "checkpoints" / "ckpt-9"
    partial.mkdir()  # a kill -9 on an object store before state.json was copied
    (partial / "backbone.weights.h5").write_bytes(b"truncated")
    assert model_lib.latest_checkpoint(workdir).step == 3


def test_an_earlier_versions_npz_checkpoint_still_exports(models, tmp_path):
    """Workdirs of the JAX trainer before the one format: every variable by position."""
    from landmark_tf.modeling import npz_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model": models.config.to_dict()}))
    npz_checkpoint.save(str(tmp_path / "checkpoints" / "ckpt-5.npz"),
                        {p: getattr(models, p).variables for p in ("backbone", "neck", "head")},
                        {"step": 5, "backend": "jax"})
    found = model_lib.latest_checkpoint(str(tmp_path))
    assert (found.kind, found.step) == ("npz", 5)
    restored, _ = model_lib.restore_embedding_model(str(tmp_path))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored(IMAGES)), embed(models),
                               atol=1e-6)


def test_an_earlier_versions_tensorflow_checkpoint_still_resumes(models, tmp_path):
    """What the TensorFlow trainer wrote before the one format: tf.train.Checkpoint of the
    parts, the optimizer, the step and the seed states."""
    from landmark_tf.modeling import checkpoint

    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(models.train_model.trainable_variables)
    optimizer.variables[-1].assign(np.full(optimizer.variables[-1].shape, 0.25, "float32"))
    ckpt = model_lib.make_checkpoint(models, optimizer=optimizer,
                                     step=tf.Variable(12, dtype=tf.int64),
                                     rng=checkpoint.seed_states(models.train_model))
    tf.train.CheckpointManager(ckpt, str(tmp_path / "checkpoints"), 1).save(checkpoint_number=12)
    fresh = model_lib.build_models(ModelConfig(**CFG))
    fresh_opt = keras.optimizers.SGD(0.1, momentum=0.9)
    fresh_opt.build(fresh.train_model.trainable_variables)
    found = model_lib.latest_checkpoint(str(tmp_path))
    assert (found.kind, found.step) == ("tensorflow", 12)
    step = model_lib.restore_train_state(fresh, found, fresh_opt,
                                         checkpoint.seed_states(fresh.train_model))
    assert step == 12
    np.testing.assert_array_equal(fresh_opt.variables[-1].numpy(), 0.25)
    np.testing.assert_allclose(embed(fresh), embed(models), atol=1e-6)
