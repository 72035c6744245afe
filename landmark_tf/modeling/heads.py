"""Classification heads for metric learning: CosFace, ArcFace, Sub-center ArcFace, AdaCos (dynamic
and the GLR2020 winner's per-batch variant), softmax. head_variants.py adds dynamic margins, a
factorised class matrix and the n-pairs loss.

Every head is a Keras layer called as `head(embeddings, labels, training=...)`:
  embeddings float32 [B, D] (the neck output, not normalised), labels int [B] -> float32 [B, C].
The margin changes only the target-class logit and only when `training` is true and labels are
given; `head(embeddings)` is the no-margin path used for validation accuracy. Logits are float32
under any mixed-precision policy (the layers use the float32 policy).

Memory: the class matrix is one float32 [D, C * K] variable created in `build`, so it is created
under whatever distribution-strategy scope builds the model (TPUStrategy included) with a
generated initialiser (no huge constant in the graph); its columns are never normalised into a
second [D, C] copy: logits divide by the column norms instead. 203,094 x 512 is 416 MB.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from landmark_tf.config import HEADS, auto_scale
from landmark_tf.errors import UserError

_EPS = 1e-7


class _CosineHead(keras.layers.Layer):
    """Scaled cosine similarity to K sub-centres per class (max over them).

    Subclasses define `target_logit`, the margin applied to the target class's cosine.
    """

    def __init__(
        self, num_classes: int, scale: float | None = None, margin: float = 0.0,
        subcenters: int = 1, **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_classes < 2 or subcenters < 1:
            raise UserError(f"head needs num_classes >= 2 and subcenters >= 1, got "
                            f"{num_classes} and {subcenters}")
        self.num_classes = int(num_classes)
        self.scale = float(scale) if scale is not None else None
        self.margin = float(margin)
        self.subcenters = int(subcenters)

    @property
    def effective_scale(self) -> float:
        """The logit scale; None in the config means sqrt(2) * ln(C - 1)."""
        return self.scale if self.scale is not None else auto_scale(self.num_classes)

    def build(self, embeddings_shape, labels_shape=None):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(embeddings_shape[-1], self.num_classes * self.subcenters),
            initializer="glorot_uniform",
        )

    def cosine(self, embeddings):
        """float32 [B, D] -> cosine to each class float32 [B, C] (max over its sub-centres)."""
        x = ops.cast(embeddings, "float32")
        x = x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), _EPS)
        norms = ops.maximum(ops.norm(self.kernel, axis=0), _EPS)
        cos = ops.clip(ops.matmul(x, self.kernel) / norms, -1.0, 1.0)
        if self.subcenters > 1:
            cos = ops.max(ops.reshape(cos, (-1, self.num_classes, self.subcenters)), axis=-1)
        return cos

    def call(self, embeddings, labels=None, training=None):
        cos = self.cosine(embeddings)
        if training and labels is not None:
            cos = self.with_target_margin(cos, labels)
        return cos * self.effective_scale

    def with_target_margin(self, cos, labels):
        """Replaces each row's target-class cosine by `target_logit(cos)`; [B, C] -> [B, C]."""
        labels = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
        target = self.target_logit(ops.take_along_axis(cos, labels, axis=1))
        is_target = ops.equal(ops.arange(self.num_classes, dtype="int32")[None, :], labels)
        return ops.where(is_target, target, cos)

    def target_logit(self, cos_target):
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, scale=self.scale, margin=self.margin,
                      subcenters=self.subcenters)
        return config


@keras.saving.register_keras_serializable(package="landmark_tf")
class CosFace(_CosineHead):
    """Large-margin cosine loss (Wang et al. 2018): target logit s * (cos - m)."""

    def target_logit(self, cos_target):
        return cos_target - self.margin


@keras.saving.register_keras_serializable(package="landmark_tf")
class ArcFace(_CosineHead):
    """Additive angular margin (Deng et al. 2019): target logit s * cos(theta + m).

    Where theta + m would pass pi (cos <= th = cos(pi - m)), cos(theta + m) stops decreasing, so
    the standard fallback uses cos - mm with mm = sin(pi - m) * m; `easy_margin` instead applies
    the margin only where cos > 0.
    """

    def __init__(self, num_classes: int, easy_margin: bool = False, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.easy_margin = bool(easy_margin)

    def target_logit(self, cos_target):
        m = self.margin
        sin_target = ops.sqrt(ops.clip(1.0 - ops.square(cos_target), _EPS, 1.0))
        phi = cos_target * math.cos(m) - sin_target * math.sin(m)
        if self.easy_margin:
            return ops.where(cos_target > 0.0, phi, cos_target)
        return ops.where(
            cos_target > math.cos(math.pi - m), phi, cos_target - math.sin(math.pi - m) * m
        )

    def get_config(self):
        return {**super().get_config(), "easy_margin": self.easy_margin}


@keras.saving.register_keras_serializable(package="landmark_tf")
class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace (Deng et al. 2020): K centres per class, cosine = max over them."""

    def __init__(self, num_classes: int, subcenters: int = 3, **kwargs):
        super().__init__(num_classes, subcenters=subcenters, **kwargs)


@keras.saving.register_keras_serializable(package="landmark_tf")
class AdaCos(_CosineHead):
    """Dynamic AdaCos (Zhang et al. 2019): no margin; the scale follows the batch in training.

    `margin` is not used.

    s starts at sqrt(2) * ln(C - 1) (or `scale`) and each training call sets
    s <- ln(B_avg) / cos(min(pi/4, median target angle)), B_avg the batch mean of
    sum over non-target classes of exp(s * cos). The scale is a non-trainable variable; under a
    distribution strategy each replica adapts its own copy from its own batch, and the trainer
    sets the copies to their mean after each step (training/batch_stats.py). `batch_groups`
    (set by the trainer, not saved) > 1 computes one scale per equal slice of the batch rows,
    the replicas' slices of a batch that JAX sees as one array, and keeps their mean.
    """

    batch_groups = 1

    def build(self, embeddings_shape, labels_shape=None):
        super().build(embeddings_shape)
        # On-read synchronisation: each replica updates its own copy with no cross-replica
        # call (an aggregated on-write update would need merge_call, which fails inside the
        # jit-compiled replica step); reading it outside replicas (checkpoint, logs) gives the
        # mean over replicas.
        with keras.name_scope(self.name, caller=self):
            self.dynamic_scale = keras.Variable(
                initializer=keras.initializers.Constant(self.effective_scale), shape=(),
                dtype="float32", trainable=False, aggregation="mean",
                synchronization="on_read", name="dynamic_scale",
            )

    def call(self, embeddings, labels=None, training=None):
        cos = self.cosine(embeddings)
        if training and labels is not None:
            scales = ops.stop_gradient(self.next_scale(*_groups(cos, labels, self.batch_groups)))
            self.dynamic_scale.assign(ops.mean(scales))
            return _scaled_by_group(cos, scales)
        return cos * ops.cast(self.dynamic_scale, "float32")

    def next_scale(self, cos, labels):
        """The AdaCos scale update from each group of rows: float32 [G, b, C] cosines, int
        [G, b] labels -> float32 [G]."""
        labels = ops.cast(labels, "int32")[..., None]
        is_target = ops.equal(ops.arange(self.num_classes, dtype="int32")[None, None, :],
                              labels)
        s = ops.cast(self.dynamic_scale, "float32")
        # log(B_avg) as a logsumexp: exp(s * cos) summed over 200k classes overflows float32
        # once s passes ~70.
        others = ops.where(is_target, -math.inf, s * cos)
        log_b_avg = ops.logsumexp(ops.logsumexp(others, axis=-1), axis=-1) - ops.log(
            ops.cast(ops.shape(cos)[1], "float32")
        )
        theta = ops.arccos(ops.take_along_axis(cos, labels, axis=-1)[..., 0])
        theta_med = ops.median(theta, axis=-1)
        return log_b_avg / ops.cos(ops.minimum(math.pi / 4, theta_med))


def _groups(cos, labels, groups: int):
    """[B, C], [B] -> [G, B / G, C], [G, B / G]: the rows cut into `groups` equal slices."""
    return (ops.reshape(cos, (groups, -1, ops.shape(cos)[-1])),
            ops.reshape(ops.cast(labels, "int32"), (groups, -1)))


def _scaled_by_group(cos, scales):
    """cos [B, C] times scales [G], slice g of the rows by scales[g] -> [B, C]."""
    groups = ops.shape(scales)[0]
    grouped = ops.reshape(cos, (groups, -1, ops.shape(cos)[-1])) * scales[:, None, None]
    return ops.reshape(grouped, ops.shape(cos))


@keras.saving.register_keras_serializable(package="landmark_tf")
class PerBatchAdaCos(_CosineHead):
    """The GLR2020 winner's AdaCos: margin 0, the scale recomputed for every batch from s0.

    As released (seungkee/google_landmark_retrieval_2020_1st_place_solution, v2clean_train.ipynb
    and v2total_train.ipynb, cell 9 `adacosLoss`, instantiated anew for every loss call):
      s0    = sqrt(2) * ln(C - 1)                  (fixed; never updated)
      B_avg = mean over the batch of sum over non-target classes of exp(s0 * cos)
      theta = arccos(clip(cos_target, -1 + 1e-7, 1 - 1e-7))
      s     = ln(B_avg) / cos(min(pi/4, theta_med)),  B_avg and theta_med under stop_gradient
    and the logits are s * cos for every class. theta_med is `tfp.stats.percentile(theta, 50)`
    with its default "nearest" interpolation (TFP >= 0.11, ascending sort): the sorted element at
    index round_half_to_even((B - 1) / 2), the upper of the two middle values for B = 4 or 8,
    not NumPy's mean of the two. Unlike `AdaCos` nothing carries over between batches.

    The batch is the one the loss sees: per replica (and per micro-batch with gradient
    accumulation) under a tf.distribute strategy, as in the released TPU loop (8 or 4 per core);
    the whole global batch when a JAX data-parallel step sees it as one array.
    Without labels, or outside training, the logits are s0 * cos (the argmax is scale-free).
    `scale` overrides s0; `margin` is not used. `batch_groups` (set by the trainer) > 1: one
    scale per equal slice of the rows, each replica's batch of one JAX array, as on TF replicas.
    """

    batch_groups = 1

    def call(self, embeddings, labels=None, training=None):
        cos = self.cosine(embeddings)
        if training and labels is not None:
            scales = self.batch_scale(*_groups(cos, labels, self.batch_groups))
            return _scaled_by_group(cos, ops.stop_gradient(scales))
        return cos * self.effective_scale

    def batch_scale(self, cos, labels):
        """The scale of each group of rows: float32 [G, b, C] cosines, int [G, b] labels ->
        float32 [G]."""
        labels = ops.cast(labels, "int32")[..., None]
        is_target = ops.equal(ops.arange(self.num_classes, dtype="int32")[None, None, :],
                              labels)
        # ln(B_avg) as a logsumexp over all (row, non-target class) pairs minus ln(b): the same
        # number as the released log(mean(sum(exp))), without float32 overflow for large s0.
        others = ops.where(is_target, -math.inf, self.effective_scale * cos)
        batch = ops.cast(ops.shape(cos)[1], "float32")
        log_b_avg = ops.logsumexp(ops.reshape(others, (ops.shape(cos)[0], -1)),
                                  axis=-1) - ops.log(batch)
        target = ops.take_along_axis(cos, labels, axis=-1)[..., 0]
        theta = ops.sort(ops.arccos(ops.clip(target, -1.0 + _EPS, 1.0 - _EPS)), axis=-1)
        # keras.ops.round and tf.round both round half to even, as TFP's "nearest" does.
        middle = ops.cast(ops.round((batch - 1.0) / 2.0), "int32")
        theta_med = ops.take(theta, middle, axis=-1)
        return log_b_avg / ops.cos(ops.minimum(math.pi / 4, theta_med))


@keras.saving.register_keras_serializable(package="landmark_tf")
class SoftmaxHead(keras.layers.Layer):
    """Plain linear classifier (no normalisation, no margin): float32 [B, D] -> float32 [B, C]."""

    def __init__(self, num_classes: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.dense = keras.layers.Dense(self.num_classes, dtype="float32", name="dense")

    def build(self, embeddings_shape, labels_shape=None):
        self.dense.build(embeddings_shape)

    def call(self, embeddings, labels=None, training=None):
        return self.dense(ops.cast(embeddings, "float32"))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def build_head(head: str, num_classes: int, scale: float | None = None, margin: float = 0.0,
               subcenters: int = 1, name: str = "head") -> keras.layers.Layer:
    """The head named by ModelConfig.head. `scale` None = auto; `margin` is ignored by adacos
    and softmax, `subcenters` used only by subcenter_arcface, `scale` ignored by softmax."""
    if head == "softmax":
        return SoftmaxHead(num_classes, name=name)
    if head == "adacos":
        return AdaCos(num_classes, scale=scale, name=name)
    if head == "adacos_per_batch":
        return PerBatchAdaCos(num_classes, scale=scale, name=name)
    if head == "subcenter_arcface":
        return SubCenterArcFace(num_classes, subcenters=subcenters, scale=scale, margin=margin,
                                name=name)
    margin_heads = {"cosface": CosFace, "arcface": ArcFace}
    if head not in margin_heads:
        raise UserError(f"unknown head {head!r}; expected one of {HEADS}")
    return margin_heads[head](num_classes, scale=scale, margin=margin, name=name)


# --- Head variants (head_variants.py): dynamic margins, factorised class matrix, n-pairs. ---
