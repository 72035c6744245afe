"""GeM pooling and the embedding neck."""

import os
import subprocess
import sys

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


def _gem64(x: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    """GeM in float64 with a per-channel max shift (exact reference)."""
    x = np.maximum(x.astype(np.float64), eps)
    m = x.max(axis=(1, 2))
    return m * np.mean((x / m[:, None, None, :]) ** p, axis=(1, 2)) ** (1 / p)


def test_gem_at_p_8_is_finite_with_finite_gradients():
    """(1e-6)^8 is 0 in float32 (subnormals flush on TPU/GPU; 1e-48 is below even the CPU's
    subnormals): an all-clamped channel used to pool to 0 and give NaN gradients; activations
    of 1e5..1e6 overflowed x^8."""
    rng = np.random.default_rng(1)
    cases = {
        "zeros": np.zeros((2, 3, 4, 5), np.float32),
        "negative": -rng.uniform(0.0, 1.0, (2, 3, 4, 5)).astype(np.float32),
        "tiny": rng.uniform(1e-6, 1e-5, (2, 3, 4, 5)).astype(np.float32),
        "large": rng.uniform(1e5, 1e6, (2, 3, 4, 5)).astype(np.float32),
        "mixed": np.concatenate([np.zeros((1, 3, 4, 5)), rng.uniform(0.0, 2.0, (1, 3, 4, 5))]
                                ).astype(np.float32),
    }
    for name, x in cases.items():
        layer = GeM(p=8.0)
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = layer(inputs)
            total = tf.reduce_sum(out)
        d_p, d_x = tape.gradient(total, [layer.p, inputs])
        assert np.all(np.isfinite(out.numpy())), name
        assert np.isfinite(float(d_p)) and np.all(np.isfinite(d_x.numpy())), name
        np.testing.assert_allclose(out.numpy(), _gem64(x, 8.0), rtol=1e-4, err_msg=name)
    # The gradient w.r.t. p is the analytic one: d/dp (mean x^p)^(1/p) in float64.
    x = cases["tiny"]
    layer = GeM(p=8.0)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(layer(x))
    h = 1e-4
    numeric = (_gem64(x, 8.0 + h).sum() - _gem64(x, 8.0 - h).sum()) / (2 * h)
    np.testing.assert_allclose(float(tape.gradient(total, layer.p)), numeric, rtol=1e-2)


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


@pytest.mark.parametrize("neck, activation, trainable, non_trainable", [
    ("dense", "swish", 2, 0),          # the GLR2020 winner's: Dense kernel + bias, no BN
    ("dense_syncbn", "linear", 4, 2),  # same variables as dense_bn
    ("dense_bn", "relu", 4, 2),
])
def test_neck_variants_harness(neck, activation, trainable, non_trainable, tmp_path):
    layer = run_layer_test(
        EmbeddingNeck, {"pooling": "gap", "embedding_dim": 6, "neck": neck,
                        "activation": activation},
        (FEATURES,), tmp_path, expected_output_shape=(2, 6),
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
    )
    assert (layer.get_config()["neck"], layer.get_config()["activation"]) == (neck, activation)
    assert (layer.bn is None) == (neck == "dense")
    if neck == "dense_syncbn":
        assert layer.bn.synchronized


def test_dense_swish_neck_is_gap_dense_swish():
    layer = EmbeddingNeck("gap", embedding_dim=6, neck="dense", activation="swish")
    out = layer(FEATURES, training=True).numpy()
    z = FEATURES.mean(axis=(1, 2)) @ layer.dense.kernel.numpy() + layer.dense.bias.numpy()
    np.testing.assert_allclose(out, z / (1.0 + np.exp(-z)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(FEATURES, training=False).numpy(), out, rtol=1e-6)


def test_neck_rejects_unknown_options():
    with pytest.raises(UserError, match="unknown neck"):
        EmbeddingNeck(neck="bn")
    with pytest.raises(UserError, match="unknown neck activation"):
        EmbeddingNeck(activation="tanh")


_SYNC_BN = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from landmark_tf.modeling.pooling import EmbeddingNeck
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.random.default_rng(0).normal(size=(8, 2, 2, 3)).astype("float32")
x[4:] += 3.0  # replica 1's half of the batch has another mean
for neck in ("dense_bn", "dense_syncbn"):
    with strategy.scope():
        layer = EmbeddingNeck("gap", embedding_dim=4, neck=neck)
        layer.build((None, 2, 2, 3))
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
    run = tf.function(lambda b: strategy.run(lambda a: layer(a, training=True), (b,)))
    out = np.concatenate([r.numpy() for r in strategy.experimental_local_results(
        run(next(iter(data))))])
    dense = layer.dense(layer.pool(x)).numpy()
    stats = (dense - dense.mean(0)) / np.sqrt(dense.var(0) + 1e-3)  # over all 8 examples
    print(neck, bool(np.allclose(out, stats, atol=1e-4)))
"""


def test_syncbn_neck_normalises_with_global_batch_statistics():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _SYNC_BN], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split() for line in result.stdout.splitlines() if line.startswith("dense"))
    assert lines == {"dense_bn": "False", "dense_syncbn": "True"}
