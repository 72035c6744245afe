"""Heads against logits computed by hand in numpy (angles via arccos, not the layer's algebra)."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_harness import run_layer_test

from landmark_tf.errors import UserError
from landmark_tf.modeling import heads

C, D, B = 5, 4, 6
RNG = np.random.default_rng(0)
EMB = RNG.normal(size=(B, D)).astype("float32")
LABELS = np.array([0, 1, 2, 3, 4, 0], dtype="int32")


def np_cosine(emb, kernel, subcenters=1):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(e @ w, -1.0, 1.0)
    return cos.reshape(len(emb), -1, subcenters).max(axis=-1)


def np_arcface_target(cos, m, easy=False):
    shifted = np.cos(np.arccos(cos) + m)
    if easy:
        return np.where(cos > 0, shifted, cos)
    return np.where(cos > np.cos(np.pi - m), shifted, cos - np.sin(np.pi - m) * m)


def with_target(cos, labels, target_values):
    out = cos.copy()
    out[np.arange(len(labels)), labels] = target_values[np.arange(len(labels)), labels]
    return out


def logits(head, emb=EMB, labels=LABELS, training=False):
    return keras.ops.convert_to_numpy(head(emb, labels, training=training))


def test_cosface_subtracts_margin_from_target_only_in_training():
    head = heads.CosFace(C, scale=10.0, margin=0.2)
    head(EMB, LABELS)
    cos = np_cosine(EMB, head.kernel.numpy())
    np.testing.assert_allclose(logits(head), 10.0 * cos, rtol=1e-5, atol=1e-5)
    expected = 10.0 * with_target(cos, LABELS, cos - 0.2)
    np.testing.assert_allclose(logits(head, training=True), expected, rtol=1e-5, atol=1e-5)


def _kernel_with_opposed_rows(emb, labels):
    """Kernel whose target columns point against rows 0-2 (cos ~ -1, the fallback region)
    and along row 3 (cos ~ 1)."""
    kernel = RNG.normal(size=(D, C)).astype("float32")
    for row in range(3):
        kernel[:, labels[row]] = -emb[row] + 0.01 * RNG.normal(size=D)
    kernel[:, labels[3]] = emb[3] + 0.01 * RNG.normal(size=D)
    return kernel


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_matches_angle_formula_including_fallback(easy_margin):
    m = 0.5
    head = heads.ArcFace(C, scale=8.0, margin=m, easy_margin=easy_margin)
    head(EMB, LABELS)
    head.kernel.assign(_kernel_with_opposed_rows(EMB, LABELS))
    cos = np_cosine(EMB, head.kernel.numpy())
    target_cos = cos[np.arange(B), LABELS]
    assert (target_cos < np.cos(np.pi - m)).sum() >= 2  # the fallback region is exercised
    assert (target_cos > 0).sum() >= 1  # and so is the ordinary cos(theta + m) region
    expected = 8.0 * with_target(cos, LABELS, np_arcface_target(cos, m, easy_margin))
    np.testing.assert_allclose(logits(head, training=True), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits(head), 8.0 * cos, rtol=1e-5, atol=1e-5)


def test_subcenter_arcface_takes_max_over_each_class_subcentres():
    k, m = 3, 0.3
    head = heads.SubCenterArcFace(C, subcenters=k, scale=5.0, margin=m)
    head(EMB, LABELS)
    kernel = RNG.normal(size=(D, C * k)).astype("float32")
    kernel[:, 1 * k + 2] = EMB[1]  # class 1's third sub-centre matches row 1 exactly
    head.kernel.assign(kernel)
    cos = np_cosine(EMB, kernel, k)
    assert cos[1, 1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(logits(head), 5.0 * cos, rtol=1e-5, atol=1e-5)
    expected = 5.0 * with_target(cos, LABELS, np_arcface_target(cos, m))
    np.testing.assert_allclose(logits(head, training=True), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [heads.CosFace, heads.ArcFace, heads.SubCenterArcFace])
def test_margin_changes_only_the_target_logit(cls):
    head = cls(C, margin=0.3)
    train, infer = logits(head, training=True), logits(head)
    is_target = np.zeros((B, C), bool)
    is_target[np.arange(B), LABELS] = True
    np.testing.assert_allclose(train[~is_target], infer[~is_target], rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(train[is_target] - infer[is_target]) > 1e-3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(EMB)), infer, atol=1e-6)


def test_auto_scale_is_sqrt2_ln_c_minus_1():
    head = heads.CosFace(C, scale=None, margin=0.1)
    assert head.effective_scale == pytest.approx(math.sqrt(2) * math.log(C - 1))
    head(EMB)
    cos = np_cosine(EMB, head.kernel.numpy())
    np.testing.assert_allclose(logits(head), math.sqrt(2) * math.log(C - 1) * cos,
                               rtol=1e-5, atol=1e-5)


def test_adacos_updates_scale_from_batch_in_training_only():
    head = heads.AdaCos(C)
    s0 = math.sqrt(2) * math.log(C - 1)
    head(EMB)
    cos = np_cosine(EMB, head.kernel.numpy())
    np.testing.assert_allclose(logits(head), s0 * cos, rtol=1e-5, atol=1e-5)
    assert float(head.dynamic_scale.numpy()) == pytest.approx(s0)  # inference leaves it alone
    is_target = np.zeros((B, C), bool)
    is_target[np.arange(B), LABELS] = True
    b_avg = np.where(is_target, 0.0, np.exp(s0 * cos)).sum(axis=1).mean()
    theta_med = np.median(np.arccos(cos[is_target]))
    s1 = np.log(b_avg) / np.cos(min(np.pi / 4, theta_med))
    np.testing.assert_allclose(logits(head, training=True), s1 * cos, rtol=1e-4, atol=1e-4)
    assert float(head.dynamic_scale.numpy()) == pytest.approx(s1, rel=1e-5)
    assert not head.dynamic_scale.trainable


def test_softmax_head_is_plain_dense():
    head = heads.SoftmaxHead(C)
    out = logits(head, training=True)
    np.testing.assert_allclose(out, EMB @ head.dense.kernel.numpy() + head.dense.bias.numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits(head), out, rtol=1e-6, atol=1e-6)


@pytest.fixture
def mixed_bfloat16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("name", ["cosface", "arcface", "adacos", "subcenter_arcface", "softmax",
                                  "adacos_per_batch"])
def test_logits_are_float32_under_mixed_precision(name, mixed_bfloat16):
    head = heads.build_head(name, C, None, 0.2, 2)
    out = head(keras.ops.cast(EMB, "bfloat16"), LABELS, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in head.weights)


def test_build_head_maps_names_and_rejects_unknown():
    assert type(heads.build_head("subcenter_arcface", C, subcenters=4)) is heads.SubCenterArcFace
    assert heads.build_head("subcenter_arcface", C, subcenters=4).subcenters == 4
    assert heads.build_head("arcface", C, subcenters=4).subcenters == 1
    assert type(heads.build_head("adacos", C)) is heads.AdaCos
    with pytest.raises(UserError, match="unknown head"):
        heads.build_head("sphereface", C)


@pytest.mark.parametrize(
    "cls, kwargs, weights",
    [
        (heads.CosFace, {"scale": 30.0, "margin": 0.15}, (1, 0)),
        (heads.ArcFace, {"margin": 0.5, "easy_margin": True}, (1, 0)),
        (heads.SubCenterArcFace, {"subcenters": 2, "margin": 0.3}, (1, 0)),
        (heads.AdaCos, {}, (1, 1)),
        (heads.SoftmaxHead, {}, (2, 0)),
    ],
)
def test_layer_harness(cls, kwargs, weights, tmp_path):
    run_layer_test(
        cls, {"num_classes": C, **kwargs}, (EMB, LABELS), tmp_path,
        expected_output_shape=(B, C),
        expected_num_trainable_weights=weights[0],
        expected_num_non_trainable_weights=weights[1],
    )


def test_adacos_scale_is_checkpointed(tmp_path):
    head = heads.AdaCos(C)
    logits(head, training=True)
    path = tf.train.Checkpoint(head=head).save(str(tmp_path / "ckpt"))
    fresh = heads.AdaCos(C)
    fresh(EMB)
    tf.train.Checkpoint(head=fresh).restore(path).assert_existing_objects_matched()
    assert float(fresh.dynamic_scale.numpy()) == pytest.approx(float(head.dynamic_scale.numpy()))
    np.testing.assert_allclose(logits(fresh), logits(head), atol=1e-6)


_TWO_REPLICAS = """
import keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from landmark_tf.modeling import heads
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x, y = tf.random.normal((8, 4)), tf.range(8) % 5
with strategy.scope():
    head = heads.AdaCos(5)
    head(x[:2])
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(head.trainable_variables)

@tf.function(jit_compile=True)  # nested in the replica function, as the trainer does
def grads(x, y):
    with tf.GradientTape() as tape:
        out = head(x, y, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out, True))
    return tape.gradient(loss, head.trainable_variables), head.dynamic_scale.value

def replica_fn(x, y):
    g, scale = grads(x, y)
    optimizer.apply(g, head.trainable_variables)
    return scale

data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)))
xb, yb = next(iter(data))
local = strategy.experimental_local_results(tf.function(strategy.run)(replica_fn, (xb, yb)))
print("scales", float(local[0]), float(local[1]), float(head.dynamic_scale.numpy()))
"""


def test_adacos_trains_under_two_replica_strategy_with_nested_jit():
    # As on TPU: variables created under the strategy scope, the scale updated inside a
    # jit-compiled function within the replica function, where no merge_call is possible.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, read = map(float, result.stdout.split("scales")[1].split())
    assert first != pytest.approx(heads.auto_scale(5))  # each replica adapted its copy
    assert read == pytest.approx((first + second) / 2)  # a read outside replicas averages


# --- the GLR2020 winner's per-batch AdaCos ------------------------------------------------------


def np_per_batch_adacos_scale(cos, labels, num_classes):
    """The released adacosLoss (cell 9 of v2clean/v2total_train.ipynb) written out in NumPy:
    s0 fixed, B_avg from exp(s0 * cos) of the non-target classes, the median target angle by
    tfp.stats.percentile(q=50)'s default "nearest" rule on the ascending sort."""
    s0 = math.sqrt(2.0) * math.log(num_classes - 1)
    rows = np.arange(len(labels))
    exp = np.exp(s0 * cos.astype(np.float64))
    exp[rows, labels] = 0.0
    b_avg = exp.sum(axis=1).mean()
    theta = np.sort(np.arccos(np.clip(cos[rows, labels], -1 + 1e-7, 1 - 1e-7)))
    # (B - 1) / 2 rounded half to even, worked out per batch size: 8 -> 3.5 -> 4,
    # 6 -> 2.5 -> 2, 5 -> 2, 4 -> 1.5 -> 2.
    middle = {8: 4, 6: 2, 5: 2, 4: 2}[len(labels)]
    return math.log(b_avg) / math.cos(min(math.pi / 4, theta[middle]))


@pytest.mark.parametrize("batch", [8, 6, 5, 4])
def test_per_batch_adacos_matches_the_released_formula(batch):
    classes = 7
    emb = RNG.normal(size=(batch, D)).astype("float32")
    labels = (np.arange(batch) * 3 % classes).astype("int32")
    head = heads.PerBatchAdaCos(classes)
    head(emb)
    # Target angles spread over 0.2..1.4 rad (some above pi/4) and all distinct, so that the
    # median's rule (upper middle, not the mean of the two) decides the result.
    kernel = RNG.normal(size=(D, classes)).astype("float32")
    for i in range(batch):
        kernel[:, labels[i]] = emb[i] / np.linalg.norm(emb[i]) * 5.0 + RNG.normal(size=D) * 0.5 * i
    head.kernel.assign(kernel)
    cos = np_cosine(emb, kernel)
    s = np_per_batch_adacos_scale(cos, labels, classes)
    out = logits(head, emb, labels, training=True)
    np.testing.assert_allclose(out, s * cos, rtol=2e-5, atol=2e-5)
    theta = np.sort(np.arccos(cos[np.arange(batch), labels]))
    if batch % 2 == 0:  # NumPy's median (mean of the two middles) would give another scale
        assert theta[batch // 2] < math.pi / 4 and theta[batch // 2 - 1] < theta[batch // 2]
        mean_median = math.log(np.exp(np.where(np.arange(classes) == labels[:, None], -np.inf,
                                                head.effective_scale * cos)).sum(1).mean())
        assert s != pytest.approx(mean_median / math.cos(np.median(theta)), rel=1e-4)
    s0 = math.sqrt(2.0) * math.log(classes - 1)
    np.testing.assert_allclose(logits(head, emb, labels), s0 * cos, rtol=1e-5, atol=1e-5)


def test_per_batch_adacos_keeps_no_state_and_stops_the_scale_gradient():
    head = heads.PerBatchAdaCos(C)
    first = logits(head, training=True)
    assert not head.non_trainable_weights  # nothing carries over between batches
    cos = np_cosine(EMB, head.kernel.numpy())
    s = np_per_batch_adacos_scale(cos, LABELS, C)
    np.testing.assert_allclose(first, s * cos, rtol=2e-5, atol=2e-5)
    other = np.roll(EMB, 1, axis=0)
    logits(head, other, LABELS, training=True)
    np.testing.assert_allclose(logits(head, training=True), first, rtol=1e-6, atol=1e-6)
    # d(sum of logits)/d(kernel) equals that of s * cos with s a constant: no gradient through s.
    weights = tf.constant(RNG.normal(size=(B, C)).astype("float32"))
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(head(EMB, LABELS, training=True) * weights)
    (grad,) = tape.gradient(out, [head.kernel])
    with tf.GradientTape() as tape:
        ref = tf.reduce_sum(float(s) * head.cosine(EMB) * weights)
    (expected,) = tape.gradient(ref, [head.kernel])
    np.testing.assert_allclose(grad.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_per_batch_adacos_harness_and_factory(tmp_path):
    assert type(heads.build_head("adacos_per_batch", C, None, 0.3)) is heads.PerBatchAdaCos
    run_layer_test(heads.PerBatchAdaCos, {"num_classes": C}, (EMB, LABELS), tmp_path,
                   expected_output_shape=(B, C), expected_num_trainable_weights=1,
                   expected_num_non_trainable_weights=0)
