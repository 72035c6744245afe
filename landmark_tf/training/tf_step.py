"""The TensorFlow train and eval steps (per replica), run by `distribute.multi_step_function`.

A train step takes this replica's batch of `accum_steps * micro` examples, runs forward and
backward on each micro-batch (a `tf.range` loop carrying the gradient sums, so memory is that of
one micro-batch), then makes one optimizer update; the optimizer sums gradients over replicas.
Forward/backward is XLA-compiled when `jit` is set (GPU); the update stays outside XLA because it
contains the cross-replica all-reduce. On TPU the whole step is compiled by TPUStrategy anyway.
What a micro-batch computes is step_math's, shared with the JAX step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import keras
import tensorflow as tf

from landmark_tf.modeling import checkpoint
from landmark_tf.modeling.model import LandmarkModels
from landmark_tf.training import step_math
from landmark_tf.training.step_math import EVAL_KEYS, TRAIN_KEYS  # noqa: F401


def make_train_step(
    models: LandmarkModels,
    optimizer: keras.optimizers.Optimizer,
    *,
    global_batch: int,
    replicas: int,
    accum_steps: int,
    jit: bool,
    replica_mean: list | None = None,
) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Returns replica_fn(batch) -> {"loss", "correct", "count", "pair_anchors"} float32 scalars
    of this replica ("pair_anchors": examples with another of their class in their micro-batch).

    batch: {"image": uint8 (or float32) [accum*micro, S, S, 3], "label": int32[...],
    "weight": float32[...], optionally "flip": bool[...]} (input_pipeline.train_dataset's batches).
    "loss" is this replica's share of the global mean weighted loss (sums to the mean over
    replicas), "correct"/"count" count top-1 hits of the margin logits.
    replica_mean: variables set to their mean over replicas after the update (batch_stats'
    `replica` setting: BatchNorm moving statistics, the AdaCos scale).
    With several replicas, each draws its own dropout / stochastic-depth masks
    (`replica_draws`), as one device drawing for the whole global batch does.
    """
    model = models.train_model
    variables = model.trainable_variables
    seeds = checkpoint.seed_states(model) if replicas > 1 else []

    def grads_of(image, label, weight):
        with tf.GradientTape() as tape:
            logits = model({"image": image, "label": label}, training=True)
            # Layer regularisers, split over replicas and micro-steps.
            loss = step_math.micro_loss(label, logits, weight, global_batch, model.losses,
                                        1.0 / float(replicas * accum_steps))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        hits = step_math.top1_hits(label, logits), step_math.pair_anchors(label)
        return loss, hits, grads

    def accumulate(batch):
        batch = {**batch, "image": step_math.prepare_images(batch)}
        if accum_steps == 1:
            return grads_of(batch["image"], batch["label"], batch["weight"])
        micro = {k: _split(v, accum_steps) for k, v in batch.items()}
        loss, (correct, anchors), grads = grads_of(micro["image"][0], micro["label"][0],
                                                   micro["weight"][0])
        for i in tf.range(1, accum_steps):
            l_i, (c_i, a_i), g_i = grads_of(micro["image"][i], micro["label"][i],
                                            micro["weight"][i])
            loss, correct, anchors = loss + l_i, correct + c_i, anchors + a_i
            grads = [a + b for a, b in zip(grads, g_i, strict=True)]
        return loss, (correct, anchors), grads

    compute = tf.function(accumulate, jit_compile=True) if jit else accumulate
    agree = replicas > 1 and isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_fn(batch):
        with replica_draws(seeds):
            loss, (correct, anchors), grads = compute(batch)
        if agree:
            grads = finite_everywhere_or_poisoned(grads)
        optimizer.apply(grads, variables)
        if replica_mean:
            _set_to_replica_mean(replica_mean)
        count = tf.cast(tf.shape(batch["label"])[0], tf.float32)
        return {"loss": tf.cast(loss, tf.float32), "correct": correct, "count": count,
                "pair_anchors": anchors}

    return replica_fn


# Keeps the replicas' seeds apart: an odd 32-bit constant (2^32 / golden ratio), so no two
# replicas of one generator share a seed and shifted seeds do not line up with near seeds.
_REPLICA_SEED_STRIDE = 0x9E3779B1


@contextlib.contextmanager
def replica_draws(seeds: list):
    """Within it, this replica's Keras SeedGenerators draw from their seed shifted by the replica
    id; on leaving, the shift is undone.

    Keras's SeedGenerator state (int [seed, counter], aggregation none) is mirrored: every
    replica holds the same state, advances it in lockstep, and so would draw the same dropout and
    drop-connect masks on every replica. Shifting only during the step keeps the states equal
    across replicas (the checkpoint holds replica 0's, which is unshifted: a resume on any
    replica count continues them) while the masks of the global batch are independent.
    seeds: the generators' state variables (`checkpoint.seed_states`); empty: nothing to do.
    """
    if not seeds:
        yield
        return
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    shifts = []
    for state in seeds:
        shift = tf.stack([tf.cast(replica, state.dtype) * tf.cast(_REPLICA_SEED_STRIDE,
                                                                  state.dtype),
                          tf.zeros((), state.dtype)])
        state.assign(state.value + shift)
        shifts.append(shift)
    try:
        yield
    finally:
        for state, shift in zip(seeds, shifts, strict=True):
            state.assign(state.value - shift)


def finite_everywhere_or_poisoned(grads: list[tf.Tensor]) -> list[tf.Tensor]:
    """This replica's gradients, made non-finite unless every replica's are finite.

    Keras' LossScaleOptimizer under MirroredStrategy (apply outside XLA) decides "finite" from
    replica 0's un-reduced gradients only, so an overflow on another replica would be summed into
    the update. One scalar all-reduce of the non-finite flags and a NaN added to the first
    gradient where any replica overflowed make every replica (replica 0 included) skip the step
    and lower the loss scale together. Call in replica context.
    """
    bad = tf.cast(tf.logical_not(tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(g)) for g in grads])), tf.float32)
    bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad)
    poison = tf.where(bad > 0, tf.constant(float("nan"), grads[0].dtype),
                      tf.zeros([], grads[0].dtype))
    return [grads[0] + poison, *grads[1:]]


def _set_to_replica_mean(variables: list) -> None:
    """Assigns each variable its mean over the replicas (one all-reduce; replica context)."""
    context = tf.distribute.get_replica_context()
    means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [v.value for v in variables])
    for v, m in zip(variables, means, strict=True):
        v.assign(m)


def make_eval_step(models: LandmarkModels) -> Callable[[dict[str, tf.Tensor]], dict]:
    """replica_fn(batch) -> {"correct", "count"}: top-1 of the cosine head without margin.

    Examples with weight 0 (padding) count in neither.
    """
    model = models.eval_logits_model

    def replica_fn(batch):
        logits = model(tf.cast(batch["image"], tf.float32), training=False)
        return step_math.eval_counts(batch["label"], logits, batch["weight"])

    return replica_fn


def _split(x: tf.Tensor, parts: int) -> tf.Tensor:
    """[parts * m, ...] -> [parts, m, ...] (static shapes)."""
    return tf.reshape(x, [parts, x.shape[0] // parts, *x.shape[1:]])
