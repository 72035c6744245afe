"""Global pooling (GAP or GeM) and the embedding neck: pool -> Dense(D, activation) [-> BatchNorm].

Both compute in float32 whatever the global dtype policy: the backbone may run in bfloat16, but
x ** p of bfloat16 activations loses too much precision, and embeddings must be float32.
"""

from __future__ import annotations

import keras
from keras import ops

from landmark_tf.config import NECK_ACTIVATIONS, NECKS, POOLINGS
from landmark_tf.errors import UserError


@keras.saving.register_keras_serializable(package="landmark_tf")
class GeM(keras.layers.Layer):
    """Generalised-mean pooling (Radenovic et al. 2018): (mean_hw clamp(x, eps) ** p) ** (1 / p).

    p = 1 is average pooling of the clamped map, p -> inf approaches max pooling. Activations
    below `eps` are clamped (GeM assumes non-negative features; swish outputs dip to -0.28).

    Computed as m * (mean_hw (x / m) ** p) ** (1 / p) with m the per-channel max of the clamped
    map (held constant for the gradient): the same function, since GeM is positively
    homogeneous, but the mean is at least 1 / (H * W), so it neither underflows nor overflows.
    The direct form does: (1e-6) ** p is below float32's normal range past p ~ 6.3, and TPUs and
    GPUs flush subnormals to 0, so an all-clamped channel pooled to 0 and its gradients
    (0 * ln 0 for p, inf * 0 for the inputs) were NaN; large activations overflowed to inf.

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
        x = ops.maximum(x, self.eps)
        peak = ops.stop_gradient(ops.max(x, axis=(1, 2), keepdims=True))  # [B, 1, 1, F] >= eps
        pooled = ops.mean(ops.power(x / peak, p), axis=(1, 2))  # in [1 / (H * W), 1]
        return peak[:, 0, 0, :] * ops.power(pooled, 1.0 / p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(p=self.p_init, eps=self.eps, trainable_p=self.trainable_p)
        return config


@keras.saving.register_keras_serializable(package="landmark_tf")
class EmbeddingNeck(keras.layers.Layer):
    """Backbone features -> embedding before L2 normalisation: pool -> Dense(D, activation) -> ...

    `neck`:
      dense_bn      -> BatchNorm (per-replica batch statistics)
      dense_syncbn  -> BatchNorm with statistics over the global batch (all replicas): on a TPU
                       with 4-16 images per core, per-core statistics of 512 features are noisy.
                       TensorFlow: `BatchNormalization(synchronized=True)` (an all-reduce in the
                       replica step). JAX: a plain BatchNorm, whose statistics over a batch
                       sharded by keras.distribution are already global (XLA inserts the
                       reduction); Keras refuses `synchronized=True` there.
      dense         -> nothing: the GLR2020 winner's GAP -> Dense(512, activation="swish")
                       (seungkee/google_landmark_retrieval_2020_1st_place_solution).
    `activation`: the Dense's activation (a Keras activation name, "linear" for none).

    Input: [B, h, w, F] any float dtype. Output: float32 [B, embedding_dim], not normalised
    (cosine heads normalise it themselves; the softmax head uses it as is).
    """

    def __init__(
        self, pooling: str = "gap", gem_p: float = 3.0, embedding_dim: int = 512,
        neck: str = "dense_bn", activation: str = "linear", **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if neck not in NECKS:
            raise UserError(f"unknown neck {neck!r}; expected one of {NECKS}")
        if activation not in NECK_ACTIVATIONS:
            raise UserError(f"unknown neck activation {activation!r}; expected one of "
                            f"{NECK_ACTIVATIONS}")
        self.pooling = pooling
        self.gem_p = float(gem_p)
        self.embedding_dim = int(embedding_dim)
        self.neck = neck
        self.activation = activation
        if pooling == "gem":
            self.pool = GeM(p=gem_p, dtype="float32", name="gem")
        else:
            self.pool = keras.layers.GlobalAveragePooling2D(dtype="float32", name="gap")
        self.dense = keras.layers.Dense(
            embedding_dim, activation=activation, dtype="float32", name="dense")
        # The attribute name `bn` is the checkpoint key of today's dense_bn necks: keep it.
        self.bn = None
        if neck != "dense":
            sync = neck == "dense_syncbn" and keras.backend.backend() == "tensorflow"
            self.bn = keras.layers.BatchNormalization(
                synchronized=sync, dtype="float32", name="bn")

    def build(self, input_shape):
        self.pool.build(input_shape)
        pooled_shape = (input_shape[0], input_shape[-1])
        self.dense.build(pooled_shape)
        if self.bn is not None:
            self.bn.build((input_shape[0], self.embedding_dim))

    def call(self, inputs, training=None):
        x = self.dense(self.pool(ops.cast(inputs, "float32")))
        return x if self.bn is None else self.bn(x, training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def get_config(self):
        config = super().get_config()
        config.update(pooling=self.pooling, gem_p=self.gem_p, embedding_dim=self.embedding_dim,
                      neck=self.neck, activation=self.activation)
        return config
