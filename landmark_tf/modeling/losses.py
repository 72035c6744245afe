"""Class weighting and the weighted cross-entropy used for training (always in float32).

Class weights follow the per-class train counts n_c of dataset_info.json:

  none           w_c = 1
  inverse        w_c ∝ 1 / n_c
  inverse_sqrt   w_c ∝ 1 / sqrt(n_c)
  log            w_c ∝ 1 / ln(1 + n_c)   (the GLR2020 winner's full-set stages)
  log_unshifted  w_c ∝ 1 / ln(n_c)       (the GLR2020 winner's clean stage; n_c >= 2)

An example's weight is w_c times `not_clean_weight` when its `image/is_clean` is 0 (the GLR2020
winner: 1.0, then 0.5 for images outside the clean subset). The weights are normalised so that
the mean per-example weight over the training examples is 1 *after* that factor:
sum_c w_c (n_c - u_c + not_clean_weight * u_c) = N, u_c the class's not-clean count. The loss
scale, and with it the learning rate, stays that of unweighted training, as in the winner's
notebooks (v2clean_train.ipynb / v2total_train.ipynb cell 3: scaleV = 1 / mean over the
dataset of clean_i / ln(n + 1)). Normalising before the factor instead (earlier versions of this
module) silently multiplied the learning rate by the mean clean factor (with 38% of GLDv2's
images clean, about 0.69 at 0.5, before class weighting).
Classes without training examples get weight 0 (they never occur as a label).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from keras import ops

from landmark_tf import config

CLASS_WEIGHTINGS = config.CLASS_WEIGHTINGS


def class_weights(
    counts: Sequence[int], mode: str, not_clean_counts: Sequence[int] | None = None,
    not_clean_weight: float = 1.0,
) -> np.ndarray:
    """Per-class loss weights, float32[C], normalised to a mean example weight of 1.

    counts: examples per class (int[C]). not_clean_counts: of those, how many have is_clean 0
    (int[C]); needed unless not_clean_weight is 1. The mean is over the examples of `counts`,
    each weighted by w_c and by not_clean_weight when not clean. Raises ValueError.
    """
    n = np.asarray(counts, dtype=np.float64)
    if mode not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting {mode!r}; expected one of {CLASS_WEIGHTINGS}")
    if n.size == 0 or n.sum() <= 0:
        raise ValueError("class counts are empty: cannot weight classes")
    raw = _raw_weights(n, mode)
    effective = n
    if not_clean_weight != 1.0:
        if not_clean_counts is None:
            raise ValueError("not_clean_weight != 1 needs the per-class not-clean counts")
        u = np.asarray(not_clean_counts, dtype=np.float64)
        if u.shape != n.shape or np.any(u < 0) or np.any(u > n):
            raise ValueError("not-clean counts must be 0..count for each class")
        effective = n - u + not_clean_weight * u
    total = np.dot(raw, effective)
    if total <= 0:
        raise ValueError("every example has weight 0: cannot normalise the loss weights")
    return (raw * n.sum() / total).astype(np.float32)


def _raw_weights(n: np.ndarray, mode: str) -> np.ndarray:
    present = n > 0
    raw = np.zeros_like(n)
    if mode == "log_unshifted" and np.any(n == 1):
        c = int(np.flatnonzero(n == 1)[0])
        raise ValueError(f"class_weighting=log_unshifted is 1/ln(n), infinite for a class with "
                         f"one example (class {c}); use log (1/ln(1 + n))")
    if mode == "none":
        raw[present] = 1.0
    elif mode == "inverse":
        raw[present] = 1.0 / n[present]
    elif mode == "inverse_sqrt":
        raw[present] = 1.0 / np.sqrt(n[present])
    elif mode == "log":
        raw[present] = 1.0 / np.log1p(n[present])
    else:
        raw[present] = 1.0 / np.log(n[present])
    return raw


def example_weights(labels, is_clean, weights, not_clean_weight: float):
    """float32[B] loss weight per example from int labels[B], int is_clean[B], weights[C].

    Runs in the tf.data input pipeline on the host (TensorFlow ops whatever the Keras backend),
    so TensorFlow is imported here, not by the model code.
    """
    import tensorflow as tf

    w = tf.gather(tf.cast(weights, tf.float32), tf.cast(labels, tf.int32))
    clean = tf.cast(is_clean, tf.bool)
    return tf.where(clean, w, w * tf.constant(not_clean_weight, tf.float32))


def weighted_cross_entropy(labels, logits, weights, global_batch_size: int):
    """This replica's share of the global mean weighted softmax cross-entropy (float32 scalar).

    Args:
      labels: int[B] class ids, B the per-replica (micro-)batch.
      logits: [B, C] logits of any float dtype; the loss is computed in float32.
      weights: float32[B] per-example weights (0 masks an example).
      global_batch_size: examples per optimizer step over all replicas; summing this value over
        replicas (and micro-batches) gives the mean over the global batch, which is what the
        optimizer's cross-replica gradient sum expects.
    """
    # keras.ops only: the same function trains under the TensorFlow and the JAX backend.
    ce = ops.sparse_categorical_crossentropy(
        ops.cast(labels, "int32"), ops.cast(logits, "float32"), from_logits=True
    )
    return ops.sum(ce * ops.cast(weights, "float32")) / float(global_batch_size)


def tag_cross_entropy(tags, logits, weights, global_batch_size: int):
    """This replica's share of the global mean of per-image weighted sums of tag cross-entropies
    (float32 scalar), the tag-pretraining loss (WeChat AI's WT-Set / LW-Set, GLD2019):

      loss_i = sum_t weights[i, t] * -log softmax(logits_i)[tags[i, t]]

    Args:
      tags: int[B, T] tag ids, padded with -1 (padding and images without tags are masked).
      logits: [B, V] logits over the tag vocabulary, any float dtype; computed in float32.
      weights: float32[B, T] per-(image, tag) weights (1 for WT-Set's plain sum, an image's
        normalised tag weights for LW-Set; 0 on padding).
      global_batch_size: as in weighted_cross_entropy.
    """
    tags = ops.cast(tags, "int32")
    log_p = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    picked = ops.take_along_axis(log_p, ops.maximum(tags, 0), axis=-1)  # [B, T]
    w = ops.cast(weights, "float32") * ops.cast(tags >= 0, "float32")
    return -ops.sum(picked * w) / float(global_batch_size)
