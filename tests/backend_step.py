"""One training step of every head, under the Keras backend this process runs (a helper that
tests/test_backends.py runs once per backend: the backend is fixed per process).

  KERAS_BACKEND=jax python tests/backend_step.py OUT.npz

Neck (GeM -> Dense -> BatchNorm) and head get the same weights and batch under every backend
(seeded NumPy); writes loss, gradients, updated weights and the AdaCos scale per head.
"""

from __future__ import annotations

import sys

import keras
import numpy as np

from landmark_tf.config import HEADS
from landmark_tf.modeling import head_variants, losses
from landmark_tf.modeling.pooling import EmbeddingNeck

B, H, F, D, C = 6, 4, 16, 8, 5


def build(head_name: str) -> keras.Model:
    features = keras.Input((H, H, F), name="features")
    label = keras.Input((), dtype="int32", name="label")
    neck = EmbeddingNeck("gem", 3.0, D, name="neck")
    head = head_variants.build_training_head(head_name, C, scale=None, margin=0.2, subcenters=2,
                                  class_counts=[9, 4, 2, 7, 1], name="head")
    net = keras.Model({"features": features, "label": label}, head(neck(features), label))
    rng = np.random.default_rng(0)
    for v in net.trainable_variables:  # same weights under every backend
        if len(v.shape) > 0:
            v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))
    return net


def step(net: keras.Model, x: np.ndarray, y: np.ndarray, w: np.ndarray):
    """(loss, grads, new non-trainable values) of the weighted loss, the trainer's function."""
    inputs = {"features": x, "label": y}
    if keras.backend.backend() == "jax":
        import jax

        def f(trainable, non_trainable):
            logits, non_trainable = net.stateless_call(trainable, non_trainable, inputs,
                                                       training=True)
            return losses.weighted_cross_entropy(y, logits, w, B), non_trainable

        trainable = [v.value for v in net.trainable_variables]
        non_trainable = [v.value for v in net.non_trainable_variables]
        (loss, new), grads = jax.value_and_grad(f, has_aux=True)(trainable, non_trainable)
        return float(loss), [np.asarray(g) for g in grads], [np.asarray(v) for v in new]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = losses.weighted_cross_entropy(y, net(inputs, training=True), w, B)
    grads = tape.gradient(loss, net.trainable_variables)
    return float(loss), [g.numpy() for g in grads], [
        keras.ops.convert_to_numpy(v.value) for v in net.non_trainable_variables]


def main(out: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.3, 3.0, (B, H, H, F)).astype("float32")
    y = np.array([0, 1, 2, 3, 4, 1], dtype="int32")
    w = rng.uniform(0.5, 1.5, B).astype("float32")
    result = {}
    for name in HEADS:
        loss, grads, non_trainable = step(build(name), x, y, w)
        result[f"{name}/loss"] = np.float32(loss)
        for i, g in enumerate(grads):
            result[f"{name}/grad/{i}"] = g
        for i, v in enumerate(non_trainable):
            result[f"{name}/state/{i}"] = v
    np.savez(out, backend=keras.backend.backend(), **result)


if __name__ == "__main__":
    main(sys.argv[1])
