"""Class weighting, per-example weights and the weighted cross-entropy, against hand math."""

import math

import numpy as np
import pytest
import tensorflow as tf

from landmark_tf.modeling import losses
from landmark_tf.training import schedules

COUNTS = [1, 4, 16, 0, 79]  # one class without examples


@pytest.mark.parametrize(
    "mode, raw",
    [
        ("none", lambda n: 1.0),
        ("inverse", lambda n: 1.0 / n),
        ("inverse_sqrt", lambda n: 1.0 / math.sqrt(n)),
        ("log", lambda n: 1.0 / math.log(1 + n)),
    ],
)
def test_class_weights_follow_formula_with_mean_one_over_examples(mode, raw):
    w = losses.class_weights(COUNTS, mode)
    assert w.dtype == np.float32 and w.shape == (5,)
    assert w[3] == 0.0  # no examples, never a label
    n = np.array(COUNTS, np.float64)
    assert np.dot(w, n) / n.sum() == pytest.approx(1.0, rel=1e-6)
    present = [i for i, c in enumerate(COUNTS) if c]
    ratios = [w[i] / raw(COUNTS[i]) for i in present]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)  # proportional to the formula


def test_inverse_weighting_gives_every_class_the_same_total_weight():
    w = losses.class_weights(COUNTS, "inverse")
    totals = [w[i] * c for i, c in enumerate(COUNTS) if c]
    np.testing.assert_allclose(totals, sum(COUNTS) / 4, rtol=1e-6)


def test_unknown_weighting_and_empty_counts_fail():
    with pytest.raises(ValueError, match="unknown class weighting"):
        losses.class_weights(COUNTS, "sqrt")
    with pytest.raises(ValueError, match="empty"):
        losses.class_weights([0, 0], "inverse")


def test_example_weights_scale_not_clean_examples():
    table = tf.constant([2.0, 0.5, 1.0])
    w = losses.example_weights(tf.constant([0, 1, 1, 2]), tf.constant([1, 1, 0, 0]), table, 0.5)
    np.testing.assert_allclose(w.numpy(), [2.0, 0.5, 0.25, 0.5])


def test_weighted_cross_entropy_is_float32_share_of_global_mean():
    logits = tf.constant([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], tf.bfloat16)
    labels = tf.constant([0, 2])
    weights = tf.constant([1.0, 3.0])
    loss = losses.weighted_cross_entropy(labels, logits, weights, global_batch_size=4)
    assert loss.dtype == tf.float32

    def ce(row, label):
        row = np.asarray(row, np.float64)
        return math.log(np.exp(row).sum()) - row[label]

    expected = (1.0 * ce([2, 0, -1], 0) + 3.0 * ce([0, 1, 0], 2)) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-2)  # bfloat16 logits


def test_warmup_cosine_schedule_values():
    s = schedules.WarmupSchedule(0.1, total_steps=110, warmup_steps=10, kind="cosine")
    assert float(s(0)) == pytest.approx(0.01)
    assert float(s(9)) == pytest.approx(0.1)
    assert float(s(10)) == pytest.approx(0.1)
    assert float(s(60)) == pytest.approx(0.05)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-7)
    c = schedules.WarmupSchedule(0.1, total_steps=110, kind="constant")
    assert float(c(0)) == float(c(109)) == pytest.approx(0.1)
    assert schedules.WarmupSchedule.from_config(s.get_config()).get_config() == s.get_config()


def _released_weights(labels, is_clean, num_classes, not_clean_weight, shift):
    """The winner's cell 3 (v2total_train.ipynb; v2clean_train.ipynb with shift 0 and no clean
    factor) as a loop over examples: per-example weight list, scaleV = 1 / its mean, class
    weight scaleV / ln(n + shift)."""
    counts = np.bincount(labels, minlength=num_classes)
    per_example = [(1.0 if c else not_clean_weight) / math.log(counts[y] + shift)
                   for y, c in zip(labels, is_clean, strict=True)]
    scale = 1.0 / np.mean(per_example)
    return counts, np.array([scale / math.log(n + shift) for n in counts])


def test_log_weights_normalised_after_the_clean_factor_match_the_released_code():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 12 + [3] * 2)
    is_clean = np.array([1, 0, 0, 1, 0, 1, 1, 0, 0, 1, *([0] * 9 + [1] * 3), 1, 0])
    counts, expected = _released_weights(labels, is_clean, 4, 0.5, shift=1)
    not_clean = np.bincount(labels[is_clean == 0], minlength=4)
    w = losses.class_weights(counts, "log", not_clean, 0.5)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    example = w[labels] * np.where(is_clean == 1, 1.0, 0.5)
    assert example.mean() == pytest.approx(1.0, rel=1e-6)  # mean 1 after the clean factor
    before = losses.class_weights(counts, "log")  # the old normalisation, before the factor
    assert (before[labels] * np.where(is_clean == 1, 1.0, 0.5)).mean() < 0.8


def test_log_unshifted_is_the_released_clean_stage_weighting():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 9)
    counts, expected = _released_weights(labels, np.ones(16, int), 3, 1.0, shift=0)
    np.testing.assert_allclose(losses.class_weights(counts, "log_unshifted"), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="one example"):
        losses.class_weights([3, 1, 2], "log_unshifted")


def test_not_clean_weight_without_counts_or_with_bad_counts_fails():
    with pytest.raises(ValueError, match="not-clean counts"):
        losses.class_weights([4, 2], "log", None, 0.5)
    with pytest.raises(ValueError, match="0..count"):
        losses.class_weights([4, 2], "log", [5, 0], 0.5)
    w = losses.class_weights([4, 2], "none", [2, 2], 0.5)  # no class weighting, still mean 1
    np.testing.assert_allclose(w, [6 / 4, 6 / 4])


def test_inverse_time_schedule_is_keras2_decay():
    s = schedules.WarmupSchedule(1e-3, total_steps=10, kind="inverse_time", decay=1e-5)
    for step in (0, 1, 1000, 100_000, 1_000_000):
        assert float(s(step)) == pytest.approx(1e-3 / (1 + 1e-5 * step), rel=1e-6)
    assert float(s(200_000)) == pytest.approx(1e-3 / 3, rel=1e-6)  # no end: total_steps unused
    again = schedules.WarmupSchedule.from_config(s.get_config())
    assert again.get_config() == s.get_config() and again.decay == 1e-5
