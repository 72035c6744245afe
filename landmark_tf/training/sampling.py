"""Class-rebalanced sampling of a record stream against GLDv2's long tail.

A TFRecord stream can only be read in order, so instead of drawing classes and then images, each
record is emitted a random number of times with mean `factor[label]` (0, 1 or several copies;
"repeat-factor sampling"): floor(f) copies plus one more with probability frac(f). With
factor_c = q_c * N / n_c, class c appears in the output with frequency q_c, where q is the target
class distribution of the mode, and the expected number of emitted records per pass stays N:

  uniform         q_c ∝ n_c          (every record once; the stream is left untouched)
  class_balanced  q_c ∝ 1            (every class equally often)
  log             q_c ∝ ln(1 + n_c)  (between the two: big classes still more frequent, but only
                                      logarithmically)

The stream is cut into windows of `window` records (the training pipeline uses its shuffle
buffer); within a window the copies of a record are spread evenly, not emitted in a row: copy j
of a record with k copies gets the sort key (u + j) / k, u uniform per record, and the window is
emitted in key order. A record with one copy lands at a uniformly random place, so this is also
the window's shuffle; a 1-image class with ~20 copies under class_balanced gets them about
window/20 records apart (rarely two in one batch while batch << window/20) instead of 20
in a row.
Copies cannot spread further than a window without holding more records in memory (one window
of serialized records, as a shuffle buffer). The draws are stateless random functions of
(seed, window index): the same seed gives the same stream, which the step-exact resume of
training relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from landmark_tf import config

SAMPLING_MODES = config.SAMPLINGS

_LABEL_SPEC = {"image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1)}


def class_distribution(counts: Sequence[int], mode: str) -> np.ndarray:
    """Target class frequencies q (float64[C], sums to 1; 0 for classes without examples)."""
    n = np.asarray(counts, dtype=np.float64)
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
    if n.size == 0 or n.sum() <= 0:
        raise ValueError("class counts are empty: nothing to sample")
    if mode == "uniform":
        q = n
    elif mode == "class_balanced":
        q = (n > 0).astype(np.float64)
    else:
        q = np.log1p(n)
    return q / q.sum()


def repeat_factors(counts: Sequence[int], mode: str) -> np.ndarray:
    """Mean number of copies per record of each class (float32[C]): q_c * N / n_c.

    The expected emitted count per pass, sum_c n_c * factor_c, equals N = sum(counts).
    """
    n = np.asarray(counts, dtype=np.float64)
    q = class_distribution(n, mode)
    factors = np.divide(q * n.sum(), n, out=np.zeros_like(n), where=n > 0)
    return factors.astype(np.float32)


def copies(labels: tf.Tensor, factors: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """How many times to emit each record: int32[B] from int labels[B] and stateless seed[2]."""
    f = tf.gather(factors, tf.cast(labels, tf.int32))
    u = tf.random.stateless_uniform(tf.shape(f), seed=seed, dtype=tf.float32)
    whole = tf.floor(f)
    return tf.cast(whole + tf.cast(u < f - whole, tf.float32), tf.int32)


def resample(
    records: tf.data.Dataset, factors: np.ndarray | None, seed: tf.Tensor, window: int = 4096
) -> tf.data.Dataset:
    """Repeat-factor resampling of a dataset of serialized tf.train.Examples, copies spread.

    Args:
      records: dataset of scalar tf.string (serialized examples with `image/class/label`).
      factors: float32[C] from `repeat_factors`, or None to return `records` unchanged.
      seed: int64[2] stateless seed; per-window seeds are folded in from it.
      window: input records per window (see the module docstring); memory: one window.
    Returns:
      dataset of scalar tf.string, each input record 0..k times, shuffled within its window
      with the copies of a record evenly spaced.
    """
    if factors is None:
        return records
    table = tf.constant(factors, tf.float32)
    seed = tf.cast(seed, tf.int64)

    def spread_window(index: tf.Tensor, block: tf.Tensor) -> tf.Tensor:
        labels = tf.io.parse_example(block, _LABEL_SPEC)["image/class/label"]
        window_seed = tf.random.experimental.stateless_fold_in(seed, index)
        n = copies(labels, table, window_seed)
        return tf.gather(block, spread_order(n, tf.random.experimental.stateless_fold_in(
            window_seed, 1)))

    blocks = records.batch(window).enumerate()
    return blocks.map(spread_window, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def spread_order(n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """int32[sum(n)]: record indices, record i n[i] times, in an order that spaces each record's
    copies evenly (keys (u_i + j) / n_i, j < n_i) and shuffles the rest. n: int32[R], seed[2]."""
    record = tf.repeat(tf.range(tf.size(n)), n)
    first = tf.gather(tf.cumsum(n, exclusive=True), record)
    j = tf.cast(tf.range(tf.size(record)) - first, tf.float32)
    u = tf.random.stateless_uniform(tf.shape(n), seed=seed, dtype=tf.float32)
    key = (tf.gather(u, record) + j) / tf.cast(tf.gather(n, record), tf.float32)
    return tf.gather(record, tf.argsort(key, stable=True))


def class_groups(
    records: tf.data.Dataset, k: int, seed: tf.Tensor, window: int = 4096
) -> tf.data.Dataset:
    """Regroups a stream of serialized examples into runs of `k` records of one class (P x K
    batch sampling for pair and triplet losses such as n-pairs), one window at a time.

    Within each window of `window` consecutive records (the pipeline's shuffle / resampling
    window; memory: one window of serialized records), the records are grouped by label, each
    class's records (in window order) cut into groups of k, and the groups emitted in a random
    order. Any run of B = P * k records that starts at a multiple of k is therefore P groups of
    k same-class records (two groups may share a class, which only adds positives).

    A class with n_c records in the window gets ceil(n_c / k) groups; the last one is filled by
    cycling over the class's records of the window (n_c = 1: k copies of the one image). They
    are repeated rather than dropped because GLDv2 has ~20 images per class over 203k classes,
    so most classes have a single record in a 4096-record window: dropping short classes would
    discard most of the data and keep only the head classes. A repeated record is a positive
    under different augmentation draws (crop / flip / colour are keyed by position in the epoch);
    a larger --shuffle_buffer makes more of the positives distinct images. The stream grows by
    the fill: sum_c ceil(n_c / k) * k records per window instead of sum_c n_c, so a training
    epoch (a fixed number of steps) covers fewer distinct records, up to k times fewer when most
    classes have one record per window.

    The in-class order and the group order are stateless draws of (seed, window index), so the
    same seed gives the same stream (step-exact resume). Labels come from `image/class/label`.

    Args:
      records: dataset of scalar tf.string (serialized tf.train.Examples).
      k: records per group (> 0).
      seed: int64[2] stateless seed.
      window: records per window.
    Returns:
      dataset of scalar tf.string whose length is a multiple of k, in groups of k of one class.
    """
    if k <= 0:
        raise ValueError(f"class_groups needs k > 0, got {k}")
    seed = tf.cast(seed, tf.int64)

    def group_window(index: tf.Tensor, block: tf.Tensor) -> tf.Tensor:
        window_seed = tf.random.experimental.stateless_fold_in(seed, index)
        # A random in-class order, so that which records share a group is random too.
        block = tf.random.experimental.stateless_shuffle(
            block, seed=tf.random.experimental.stateless_fold_in(window_seed, 0))
        labels = tf.io.parse_example(block, _LABEL_SPEC)["image/class/label"]
        order = group_order(labels, k, tf.random.experimental.stateless_fold_in(window_seed, 1))
        return tf.gather(block, order)

    blocks = records.batch(window).enumerate()
    return blocks.map(group_window, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def group_order(labels: tf.Tensor, k: int, seed: tf.Tensor) -> tf.Tensor:
    """int32[G * k]: indices into labels (int[R]) forming G groups of k same-label indices
    (class c: ceil(n_c / k) groups, the last filled by cycling over c's indices in order),
    the groups in a random order drawn from the stateless seed[2]."""
    _, cls = tf.unique(tf.cast(labels, tf.int64), out_idx=tf.int32)
    members = tf.argsort(cls, stable=True)  # indices class by class, window order within
    n = tf.math.bincount(cls, dtype=tf.int32)
    start = tf.cumsum(n, exclusive=True)
    groups = (n + k - 1) // k
    slot_class = tf.repeat(tf.range(tf.size(n)), groups * k)
    slot = tf.range(tf.size(slot_class)) - tf.gather(tf.cumsum(groups * k, exclusive=True),
                                                   slot_class)
    record = tf.gather(members, tf.gather(start, slot_class)
                       + slot % tf.gather(n, slot_class))
    # Slots run class by class, so every k consecutive slots are one group.
    grouped = tf.reshape(record, [-1, k])
    return tf.reshape(tf.random.experimental.stateless_shuffle(grouped, seed=seed), [-1])
