"""What "batch statistics" means when a step runs on several replicas: one setting, the same
on both backends (TrainConfig.bn_statistics).

  replica  each replica (TPU core, GPU, device) normalises with the statistics of its own
           micro-batch, as tf.keras always did under TPUStrategy and MirroredStrategy; the
           moving statistics (and any other non-trainable float state, e.g. the AdaCos scale)
           are the mean over replicas after each step, so every replica and every checkpoint
           holds the same values and resuming is exact. Cheap: no communication inside the
           forward pass. The default.
  global   statistics over the whole micro-batch of all replicas (sync BatchNorm): one
           all-reduce per BatchNormalization layer in the forward pass.

How each backend does it: under TensorFlow each replica already computes its own statistics;
`replica` adds the mean of the state after the step (tf_step), `global` sets Keras's
`synchronized=True`. Under JAX the batch is one array sharded over the devices, so plain
BatchNorm is already `global`; `replica` normalises each device's rows apart (the batch seen
as [replicas, micro, ...]) and moves the moving statistics by the mean of the replicas'
statistics: the same numbers TensorFlow computes. With one replica both settings are the
same. The neck's `dense_syncbn` stays synchronised under either setting.
"""

from __future__ import annotations

import functools

import keras
from keras import ops

MODES = ("replica", "global")


def batch_norm_layers(net: keras.Model) -> list:
    """The BatchNormalization layers of `net` this setting governs (not `dense_syncbn`'s)."""
    return [layer for layer in net._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized]


def configure(net: keras.Model, mode: str, replicas: int, backend: str) -> None:
    """Makes `net`'s BatchNormalization layers compute `mode` statistics over `replicas`.
    Call before the train step is traced; eval and embedding (training=False) are unchanged."""
    if replicas == 1:
        return
    if mode == "replica" and backend == "jax":
        for layer in net._flatten_layers():  # heads whose scale follows the batch (AdaCos)
            if hasattr(layer, "batch_groups"):
                layer.batch_groups = replicas
    for layer in batch_norm_layers(net):
        if mode == "global" and backend == "tensorflow":
            layer.synchronized = True
        elif mode == "replica" and backend == "jax":
            # An instance attribute: the layer class (and so its checkpoint path) stays.
            layer.call = functools.partial(_per_replica_call, layer, replicas)


def _per_replica_call(layer, groups: int, inputs, training=None, mask=None):
    """BatchNormalization.call with the statistics of each of `groups` equal slices of the
    batch (the replicas' rows: the batch axis is sharded in that order)."""
    if not (training and layer.trainable) or mask is not None or layer.renorm:
        return type(layer).call(layer, inputs, training=training, mask=mask)
    x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
    channel = layer.axis % len(x.shape)
    # [B, ...] -> [groups, B / groups, ...]: axis i of x is axis i + 1 here.
    grouped = ops.reshape(x, (groups, -1, *x.shape[1:]))
    within = [i + 1 for i in range(len(x.shape)) if i != channel]
    mean, variance = ops.moments(grouped, axes=within, keepdims=True)  # [groups, 1.., C, 1..]
    all_but_channel = [0, *within]
    momentum = layer.momentum
    layer.moving_mean.assign(ops.cast(layer.moving_mean, x.dtype) * momentum
                             + ops.mean(mean, axis=all_but_channel) * (1.0 - momentum))
    layer.moving_variance.assign(ops.cast(layer.moving_variance, x.dtype) * momentum
                                 + ops.mean(variance, axis=all_but_channel) * (1.0 - momentum))
    inv = ops.rsqrt(variance + layer.epsilon)
    shape = [1] * len(grouped.shape)
    shape[channel + 1] = x.shape[channel]
    if layer.scale:
        inv = inv * ops.reshape(ops.cast(layer.gamma, x.dtype), shape)
    shift = -mean * inv
    if layer.center:
        shift = shift + ops.reshape(ops.cast(layer.beta, x.dtype), shape)
    out = ops.reshape(grouped * inv + shift, ops.shape(x))
    return ops.cast(out, layer.compute_dtype)


def replica_mean_state(net: keras.Model, seeds: list) -> list:
    """The non-trainable float variables that `replica` averages over replicas after a step
    (BatchNorm moving statistics, the AdaCos scale); not the dropout seed states."""
    skip = {id(s) for s in seeds}
    return [v for v in net.non_trainable_variables
            if id(v) not in skip and "float" in str(v.dtype)]
