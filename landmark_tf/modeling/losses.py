"""Class weighting and the weighted cross-entropy used for training (always in float32).

Class weights follow the per-class train counts n_c of dataset_info.json:

  none          w_c = 1
  inverse       w_c ∝ 1 / n_c
  inverse_sqrt  w_c ∝ 1 / sqrt(n_c)
  log           w_c ∝ 1 / ln(1 + n_c)

normalised to mean 1 over the training examples (sum_c n_c w_c = N, as scikit-learn's "balanced"
weights), so the loss scale, and with it the learning rate, stays that of unweighted training.
Classes without training examples get weight 0 (they never occur as a label). An example's weight
is its class weight times `not_clean_weight` when its `image/is_clean` is 0 (the GLR2020 winner's
last stage used 0.5 for images outside the clean subset).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from keras import ops

from landmark_tf import config

CLASS_WEIGHTINGS = config.CLASS_WEIGHTINGS


def class_weights(counts: Sequence[int], mode: str) -> np.ndarray:
    """Per-class loss weights, float32[C], mean 1 over the examples counted in `counts`."""
    n = np.asarray(counts, dtype=np.float64)
    if mode not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting {mode!r}; expected one of {CLASS_WEIGHTINGS}")
    if n.size == 0 or n.sum() <= 0:
        raise ValueError("class counts are empty: cannot weight classes")
    present = n > 0
    raw = np.zeros_like(n)
    if mode == "none":
        raw[present] = 1.0
    elif mode == "inverse":
        raw[present] = 1.0 / n[present]
    elif mode == "inverse_sqrt":
        raw[present] = 1.0 / np.sqrt(n[present])
    else:
        raw[present] = 1.0 / np.log1p(n[present])
    return (raw * n.sum() / np.dot(raw, n)).astype(np.float32)


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
