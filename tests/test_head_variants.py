"""The head variants against numpy: dynamic per-class margins (GLR2021 1st place), the factorised
class matrix, and the n-pairs loss; the layer contract through the shared harness."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_harness import run_layer_test
from test_heads import np_arcface_target, np_cosine, with_target

from landmark_tf.errors import UserError
from landmark_tf.modeling import head_variants

C, D, B = 5, 4, 6
RNG = np.random.default_rng(0)
EMB = RNG.normal(size=(B, D)).astype("float32")
LABELS = np.array([0, 1, 2, 3, 4, 0], dtype="int32")
COUNTS = [100, 1, 16, 50, 3]


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_dynamic_margins_follow_the_published_formula():
    m = head_variants.dynamic_margins(COUNTS)
    n = np.array(COUNTS, float) ** -0.25
    np.testing.assert_allclose(m, 0.45 * (n - n.min()) / (n.max() - n.min()) + 0.05, rtol=1e-6)
    assert m[1] == pytest.approx(0.5) and m[0] == pytest.approx(0.05)  # rarest a+b, commonest b
    np.testing.assert_allclose(head_variants.dynamic_margins([7, 7]), [0.275, 0.275])


def test_dynamic_margin_arcface_applies_each_target_class_margin():
    head = head_variants.DynamicMarginArcFace(C, class_counts=COUNTS, subcenters=3, scale=45.0)
    head(EMB, LABELS)
    cos = np_cosine(EMB, head.kernel.numpy(), subcenters=3)
    m = head_variants.dynamic_margins(COUNTS)
    target = np.stack([np_arcface_target(cos[:, c], m[c]) for c in range(C)], axis=1)
    np.testing.assert_allclose(_np(head(EMB, LABELS, training=True)),
                               45.0 * with_target(cos, LABELS, target), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(head(EMB)), 45.0 * cos, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="class counts"):
        head_variants.DynamicMarginArcFace(C, class_counts=[1, 2])


@pytest.mark.parametrize("head_name", ["cosface", "subcenter_arcface", "dynamic_arcface"])
def test_factorised_head_is_the_head_of_the_product_matrix(head_name):
    rank = 3
    head = head_variants.build_training_head(head_name, C, scale=10.0, margin=0.2, subcenters=2,
                                  rank=rank, class_counts=COUNTS)
    head(EMB, LABELS)
    assert {v.name for v in head.trainable_weights} == {"kernel_in", "kernel_out"}
    k = 2 if head_name != "cosface" else 1
    full = head.kernel_in.numpy() @ head.kernel_out.numpy()
    assert full.shape == (D, C * k)
    np.testing.assert_allclose(_np(head(EMB)), 10.0 * np_cosine(EMB, full, subcenters=k),
                               rtol=1e-4, atol=1e-4)
    # Same margin algebra as the full-matrix head given the same W.
    plain = head_variants.build_training_head(head_name, C, scale=10.0, margin=0.2, subcenters=2,
                                   class_counts=COUNTS)
    plain(EMB, LABELS)
    plain.kernel.assign(full)
    np.testing.assert_allclose(_np(head(EMB, LABELS, training=True)),
                               _np(plain(EMB, LABELS, training=True)), rtol=1e-4, atol=1e-4)


def test_head_memory_of_gldv2_before_and_after():
    classes = head_variants.GLDV2_CLASSES
    full = head_variants.head_parameters(classes, 512)
    assert full * 4 == 415_936_512  # 416 MB, as heads.py says
    assert head_variants.head_parameters(classes, 512, rank=64) == 512 * 64 + 64 * 203_094
    with pytest.raises(UserError, match="factorised"):
        head_variants.build_training_head("softmax", C, rank=4)


@pytest.mark.parametrize("cls,kwargs,n_weights", [
    (head_variants.DynamicMarginArcFace, {"num_classes": C, "class_counts": COUNTS}, 1),
    (head_variants.LowRankCosFace, {"num_classes": C, "rank": 2, "margin": 0.1}, 2),
    (head_variants.LowRankDynamicMarginArcFace, {"num_classes": C, "rank": 2, "subcenters": 2}, 2),
])
def test_layer_contract(cls, kwargs, n_weights, tmp_path):
    run_layer_test(cls, kwargs, [EMB, LABELS], tmp_path, expected_output_shape=(B, C),
                   expected_num_trainable_weights=n_weights)


def _np_npairs(x, labels, l2_reg):
    total, rows = 0.0, 0
    for i in range(len(x)):
        pos = [j for j in range(len(x)) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        others = [j for j in range(len(x)) if j != i]
        logits = x[i] @ x[others].T
        log_p = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        total += -np.mean([log_p[others.index(j)] for j in pos])
        rows += 1
    return total / rows + 2 * np.mean(np.sum(x ** 2, axis=1)) * 0.25 * l2_reg


def test_npairs_loss_equals_numpy_reference():
    x = RNG.normal(size=(8, D)).astype("float32")
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3], "int32")  # class 2 has no positive: left out
    np.testing.assert_allclose(float(head_variants.npairs_loss(x, labels, 0.01)),
                               _np_npairs(x, labels, 0.01), rtol=1e-5)


def test_npairs_layer_adds_its_loss_to_the_model_in_training_only(tmp_path):
    emb = keras.Input((D,))
    lab = keras.Input((), dtype="int32")
    layer = head_variants.NPairsLoss(weight=0.5, l2_reg=0.0)
    model = keras.Model([emb, lab], layer(emb, lab))
    x, labels = RNG.normal(size=(8, D)).astype("float32"), np.array([0, 0, 1, 1] * 2, "int32")
    with tf.GradientTape() as tape:
        xv = tf.Variable(x)
        out = model([tf.convert_to_tensor(xv), tf.constant(labels)], training=True)
        extra = tf.add_n(model.losses)
    np.testing.assert_allclose(out.numpy(), x)
    np.testing.assert_allclose(float(extra), 0.5 * _np_npairs(x, labels, 0.0), rtol=1e-5)
    assert tape.gradient(extra, xv) is not None
    model([x, labels], training=False)
    assert not model.losses
    run_layer_test(head_variants.NPairsLoss, {"weight": 0.5}, [x, labels], tmp_path,
                   expected_output_shape=(8, D))
