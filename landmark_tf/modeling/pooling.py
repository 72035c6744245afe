"""Global pooling (GAP or GeM) and the embedding neck: pool -> Dense(D) -> BatchNorm.

Both compute in float32 whatever the global dtype policy: the backbone may run in bfloat16, but
x ** p of bfloat16 activations loses too much precision, and embeddings must be float32.
"""

from __future__ import annotations

import keras
from keras import ops

from landmark_tf.config import POOLINGS
from landmark_tf.errors import UserError


@keras.saving.register_keras_serializable(package="landmark_tf")
class GeM(keras.layers.Layer):
    """Generalised-mean pooling (Radenovic et al. 2018): (mean_hw clamp(x, eps) ** p) ** (1 / p).

    p = 1 is average pooling of the clamped map, p -> inf approaches max pooling. Activations
    below `eps` are clamped (GeM assumes non-negative features; swish outputs dip to -0.28).

    Input: [B, H, W, F] any float dtype. Output: float32 [B, F].
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable_p: bool = True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if p <= 0:
            raise UserError(f"GeM p must be > 0, got {p}")
        self.p_init = float(p)
        self.eps = float(eps)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.p_init),
            trainable=self.trainable_p,
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        # Training may push p towards 0; 1/p must stay finite.
        p = ops.maximum(ops.cast(self.p, "float32"), 1e-3)
        pooled = ops.mean(ops.power(ops.maximum(x, self.eps), p), axis=(1, 2))
        return ops.power(pooled, 1.0 / p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(p=self.p_init, eps=self.eps, trainable_p=self.trainable_p)
        return config


@keras.saving.register_keras_serializable(package="landmark_tf")
class EmbeddingNeck(keras.layers.Layer):
    """Backbone features -> embedding before L2 normalisation.

    Input: [B, h, w, F] any float dtype. Output: float32 [B, embedding_dim], not normalised
    (cosine heads normalise it themselves; the softmax head uses it as is).
    """

    def __init__(
        self, pooling: str = "gap", gem_p: float = 3.0, embedding_dim: int = 512, **kwargs
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.pooling = pooling
        self.gem_p = float(gem_p)
        self.embedding_dim = int(embedding_dim)
        if pooling == "gem":
            self.pool = GeM(p=gem_p, dtype="float32", name="gem")
        else:
            self.pool = keras.layers.GlobalAveragePooling2D(dtype="float32", name="gap")
        self.dense = keras.layers.Dense(embedding_dim, dtype="float32", name="dense")
        self.bn = keras.layers.BatchNormalization(dtype="float32", name="bn")

    def build(self, input_shape):
        self.pool.build(input_shape)
        pooled_shape = (input_shape[0], input_shape[-1])
        self.dense.build(pooled_shape)
        self.bn.build((input_shape[0], self.embedding_dim))

    def call(self, inputs, training=None):
        x = self.pool(ops.cast(inputs, "float32"))
        return self.bn(self.dense(x), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def get_config(self):
        config = super().get_config()
        config.update(pooling=self.pooling, gem_p=self.gem_p, embedding_dim=self.embedding_dim)
        return config
