"""GeM pooling and the embedding neck."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_harness import run_layer_test

from landmark_tf.errors import UserError
from landmark_tf.modeling.pooling import EmbeddingNeck, GeM

RNG = np.random.default_rng(0)
FEATURES = RNG.uniform(0.0, 2.0, size=(2, 3, 5, 4)).astype("float32")


def test_gem_with_p_1_equals_average_pooling():
    gem = GeM(p=1.0)(FEATURES)
    gap = keras.layers.GlobalAveragePooling2D()(FEATURES)
    np.testing.assert_allclose(gem.numpy(), gap.numpy(), rtol=1e-5, atol=1e-6)


def test_gem_matches_formula_and_clamps_negatives():
    x = FEATURES - 1.0  # about half the activations negative
    expected = np.mean(np.maximum(x, 1e-6) ** 3.0, axis=(1, 2)) ** (1 / 3.0)
    np.testing.assert_allclose(GeM(p=3.0)(x).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_gem_p_is_trainable_and_gets_gradient():
    layer = GeM(p=3.0)
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(layer(FEATURES))
    (grad,) = tape.gradient(out, layer.trainable_variables)
    assert [v.name for v in layer.trainable_variables] == ["p"]
    assert abs(float(grad)) > 1e-6
    frozen = GeM(p=3.0, trainable_p=False)
    frozen(FEATURES)
    assert not frozen.trainable_weights and len(frozen.non_trainable_weights) == 1


def test_gem_config_holds_p():
    config = GeM(p=4.5, eps=1e-5).get_config()
    assert (config["p"], config["eps"], config["trainable_p"]) == (4.5, 1e-5, True)
    with pytest.raises(UserError, match="p must be > 0"):
        GeM(p=0.0)


def test_gem_harness(tmp_path):
    layer = run_layer_test(GeM, {"p": 2.5}, (FEATURES,), tmp_path, expected_output_shape=(2, 4),
                           expected_num_trainable_weights=1)
    assert float(layer.p.numpy()) == pytest.approx(2.5)


@pytest.mark.parametrize("pooling, trainable", [("gap", 4), ("gem", 5)])
def test_neck_harness(pooling, trainable, tmp_path):
    # Dense kernel+bias, BN gamma+beta (+ GeM p); BN moving mean/variance non-trainable.
    run_layer_test(
        EmbeddingNeck, {"pooling": pooling, "gem_p": 2.0, "embedding_dim": 6}, (FEATURES,),
        tmp_path, expected_output_shape=(2, 6), expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=2,
    )


def test_neck_outputs_float32_for_bfloat16_features():
    neck = EmbeddingNeck("gem", embedding_dim=6)
    out = neck(keras.ops.cast(FEATURES, "bfloat16"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    with pytest.raises(UserError, match="unknown pooling"):
        EmbeddingNeck("max")
