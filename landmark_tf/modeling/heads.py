"""Classification heads for metric learning: CosFace, ArcFace, Sub-center ArcFace, AdaCos (dynamic
and the GLR2020 winner's per-batch variant), softmax.

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
import numpy as np
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
    distribution strategy each replica adapts its own copy and reads outside replicas average them.
    """

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
            self.dynamic_scale.assign(ops.stop_gradient(self.next_scale(cos, labels)))
        return cos * ops.cast(self.dynamic_scale, "float32")

    def next_scale(self, cos, labels):
        """The AdaCos scale update from one batch: float32 [B, C], int [B] -> float32 []."""
        labels = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
        is_target = ops.equal(ops.arange(self.num_classes, dtype="int32")[None, :], labels)
        s = ops.cast(self.dynamic_scale, "float32")
        # log(B_avg) as a logsumexp: exp(s * cos) summed over 200k classes overflows float32
        # once s passes ~70.
        others = ops.where(is_target, -math.inf, s * cos)
        log_b_avg = ops.logsumexp(ops.logsumexp(others, axis=1), axis=0) - ops.log(
            ops.cast(ops.shape(cos)[0], "float32")
        )
        theta = ops.arccos(ops.take_along_axis(cos, labels, axis=1)[:, 0])
        theta_med = ops.median(theta)
        return log_b_avg / ops.cos(ops.minimum(math.pi / 4, theta_med))


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
    `scale` overrides s0; `margin` is not used.
    """

    def call(self, embeddings, labels=None, training=None):
        cos = self.cosine(embeddings)
        if training and labels is not None:
            return cos * ops.stop_gradient(self.batch_scale(cos, labels))
        return cos * self.effective_scale

    def batch_scale(self, cos, labels):
        """The scale for one batch: float32 [B, C] cosines, int [B] labels -> float32 []."""
        labels = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
        is_target = ops.equal(ops.arange(self.num_classes, dtype="int32")[None, :], labels)
        # ln(B_avg) as a logsumexp over all (row, non-target class) pairs minus ln(B): the same
        # number as the released log(mean(sum(exp))), without float32 overflow for large s0.
        others = ops.where(is_target, -math.inf, self.effective_scale * cos)
        batch = ops.cast(ops.shape(cos)[0], "float32")
        log_b_avg = ops.logsumexp(ops.reshape(others, (-1,))) - ops.log(batch)
        target = ops.take_along_axis(cos, labels, axis=1)[:, 0]
        theta = ops.sort(ops.arccos(ops.clip(target, -1.0 + _EPS, 1.0 - _EPS)))
        # keras.ops.round and tf.round both round half to even, as TFP's "nearest" does.
        middle = ops.cast(ops.round((batch - 1.0) / 2.0), "int32")
        theta_med = ops.take(theta, middle)
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


# --- Training-data levers (issue 14): dynamic margins, factorised class matrix, n-pairs. ---

GLDV2_CLASSES = 203_094  # classes of the full GLDv2 train set, for the head-memory report


def dynamic_margins(counts, a: float = 0.45, b: float = 0.05) -> np.ndarray:
    """Per-class ArcFace margins m_c = a * minmax(n_c^(-1/4)) + b, float32 [C].

    GLR2021 1st place (Henkel & Singer, ChristofHenkel/kaggle-landmark-2021-1st-place, itself
    from the GLR2020 recognition 3rd place): rare classes get margins up to a + b, the most
    frequent b. Counts below 1 count as 1; when all counts are equal every class gets a / 2 + b.
    """
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0) ** -0.25
    span = n.max() - n.min()
    unit = (n - n.min()) / span if span > 0 else np.full_like(n, 0.5)
    return (a * unit + b).astype(np.float32)


@keras.saving.register_keras_serializable(package="landmark_tf")
class DynamicMarginArcFace(SubCenterArcFace):
    """Sub-center ArcFace with a margin per class from the train counts (GLR2021 1st place).

    Target logit s * cos(theta + m_y) with m_y = dynamic_margins(class_counts)[y], the same
    th/mm fallback as ArcFace (per class); k = `subcenters` centres per class. The published
    setting: a = 0.45, b = 0.05, k = 3, s = 45 (`scale=45`). The margins are a constant
    computed from `class_counts` (in the config), not a checkpointed weight, so a stage started
    `--init_from` an earlier one uses its own data's counts. `margin` is not used.

    Args:
      num_classes: C. class_counts: C ints (dataset_info.json's train class_counts), or None
        for equal counts. margin_a, margin_b: a and b above.
    """

    def __init__(self, num_classes: int, class_counts=None, margin_a: float = 0.45,
                 margin_b: float = 0.05, **kwargs):
        super().__init__(num_classes, **kwargs)
        if class_counts is not None and len(class_counts) != self.num_classes:
            raise UserError(f"dynamic margins need {self.num_classes} class counts, got "
                            f"{len(class_counts)}")
        self.class_counts = None if class_counts is None else [int(c) for c in class_counts]
        self.margin_a, self.margin_b = float(margin_a), float(margin_b)
        counts = self.class_counts or [1] * self.num_classes
        self.margins = dynamic_margins(counts, self.margin_a, self.margin_b)

    def with_target_margin(self, cos, labels):
        """[B, C] cosines, int [B] labels -> [B, C] with each target cosine at cos(theta + m_y)."""
        labels = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
        m = ops.take(ops.convert_to_tensor(self.margins), labels[:, 0])[:, None]  # [B, 1]
        cos_t = ops.take_along_axis(cos, labels, axis=1)
        sin_t = ops.sqrt(ops.clip(1.0 - ops.square(cos_t), _EPS, 1.0))
        phi = cos_t * ops.cos(m) - sin_t * ops.sin(m)
        target = ops.where(cos_t > ops.cos(math.pi - m), phi, cos_t - ops.sin(math.pi - m) * m)
        is_target = ops.equal(ops.arange(self.num_classes, dtype="int32")[None, :], labels)
        return ops.where(is_target, target, cos)

    def get_config(self):
        return {**super().get_config(), "class_counts": self.class_counts,
                "margin_a": self.margin_a, "margin_b": self.margin_b}


class _LowRankCosine(_CosineHead):
    """The class matrix as a product of two small ones: W = U V, U [D, r], V [r, C * K].

    Cookpad (GLR2019) factorised the 140k-class layer to regularise it and fit larger batches.
    Parameters D * r + r * C * K instead of D * C * K (203,094 x 512 at r = 64: 52 MB, not
    416 MB). Cosines divide by the column norms of W computed as sqrt(diag(V^T (U^T U) V)),
    so W itself is never formed. Mixed in before a head class: `class X(CosFace, _LowRankCosine)`.
    """

    def __init__(self, num_classes: int, rank: int = 64, **kwargs):
        super().__init__(num_classes, **kwargs)
        if rank < 1:
            raise UserError(f"a factorised head needs rank >= 1, got {rank}")
        self.rank = int(rank)

    def build(self, embeddings_shape, labels_shape=None):
        self.kernel_in = self.add_weight(
            name="kernel_in", shape=(embeddings_shape[-1], self.rank),
            initializer="orthogonal")
        self.kernel_out = self.add_weight(
            name="kernel_out", shape=(self.rank, self.num_classes * self.subcenters),
            initializer="glorot_uniform")

    def cosine(self, embeddings):
        """float32 [B, D] -> float32 [B, C] cosine to W = U V's columns (max over sub-centres)."""
        x = ops.cast(embeddings, "float32")
        x = x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), _EPS)
        gram = ops.matmul(ops.transpose(self.kernel_in), self.kernel_in)  # [r, r]
        sq = ops.sum(self.kernel_out * ops.matmul(gram, self.kernel_out), axis=0)
        norms = ops.sqrt(ops.maximum(sq, _EPS * _EPS))
        cos = ops.matmul(ops.matmul(x, self.kernel_in), self.kernel_out) / norms
        cos = ops.clip(cos, -1.0, 1.0)
        if self.subcenters > 1:
            cos = ops.max(ops.reshape(cos, (-1, self.num_classes, self.subcenters)), axis=-1)
        return cos

    def get_config(self):
        return {**super().get_config(), "rank": self.rank}


@keras.saving.register_keras_serializable(package="landmark_tf")
class LowRankCosFace(CosFace, _LowRankCosine):
    """CosFace over a factorised class matrix (see _LowRankCosine)."""


@keras.saving.register_keras_serializable(package="landmark_tf")
class LowRankArcFace(ArcFace, _LowRankCosine):
    """ArcFace over a factorised class matrix (see _LowRankCosine)."""


@keras.saving.register_keras_serializable(package="landmark_tf")
class LowRankSubCenterArcFace(SubCenterArcFace, _LowRankCosine):
    """Sub-center ArcFace over a factorised class matrix (see _LowRankCosine)."""


@keras.saving.register_keras_serializable(package="landmark_tf")
class LowRankDynamicMarginArcFace(DynamicMarginArcFace, _LowRankCosine):
    """Dynamic-margin sub-center ArcFace over a factorised class matrix."""


_LOW_RANK = {"cosface": LowRankCosFace, "arcface": LowRankArcFace,
             "subcenter_arcface": LowRankSubCenterArcFace,
             "dynamic_arcface": LowRankDynamicMarginArcFace}


def head_parameters(num_classes: int, dim: int, subcenters: int = 1, rank: int = 0) -> int:
    """Weights of a cosine head's class matrix: D * C * K, or D * r + r * C * K factorised."""
    columns = num_classes * subcenters
    return dim * columns if rank <= 0 else dim * rank + rank * columns


def build_lever_head(head: str, num_classes: int, *, scale: float | None = None,
                     margin: float = 0.0, subcenters: int = 1, rank: int = 0,
                     class_counts=None, margin_a: float = 0.45, margin_b: float = 0.05,
                     name: str = "head") -> keras.layers.Layer:
    """build_head plus the levers: "dynamic_arcface", and `rank` > 0 for a factorised matrix."""
    if rank > 0 and head not in _LOW_RANK:
        raise UserError(f"a factorised head (rank {rank}) is available for "
                        f"{sorted(_LOW_RANK)}, not {head!r}")
    if head == "dynamic_arcface":
        cls = LowRankDynamicMarginArcFace if rank > 0 else DynamicMarginArcFace
        extra = {"rank": rank} if rank > 0 else {}
        return cls(num_classes, class_counts=class_counts, margin_a=margin_a,
                   margin_b=margin_b, subcenters=subcenters, scale=scale, name=name, **extra)
    if rank <= 0:
        return build_head(head, num_classes, scale, margin, subcenters, name=name)
    kwargs = {"subcenters": subcenters} if head == "subcenter_arcface" else {}
    return _LOW_RANK[head](num_classes, rank=rank, scale=scale, margin=margin, name=name,
                           **kwargs)


def npairs_loss(embeddings, labels, l2_reg: float = 0.002):
    """Multi-class N-pairs loss over one batch (Sohn 2016), as PaddlePaddle's npairs_loss that
    Baidu's GLR2019 models trained beside arcmargin: float32 [B, D], int [B] -> float32 [].

    Paddle takes anchors and positives as two halves of a batch of pairs; here every image is
    an anchor against all *other* images of the batch (the input pipeline does not draw pairs):
    softmax cross-entropy of its dot products with the soft target "uniform over the other
    images of my class". Images with no other image of their class in the batch are left out.
    Plus Paddle's l2_reg * 0.25 * mean squared norm (anchors and positives: counted twice).
    """
    x = ops.cast(embeddings, "float32")
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    n = ops.shape(x)[0]
    eye = ops.eye(n, dtype="bool")
    same = ops.logical_and(ops.equal(labels[:, None], labels[None, :]), ops.logical_not(eye))
    positives = ops.sum(ops.cast(same, "float32"), axis=1)
    target = ops.cast(same, "float32") / ops.maximum(positives, 1.0)[:, None]
    logits = ops.where(eye, -1e9, ops.matmul(x, ops.transpose(x)))
    ce = -ops.sum(target * ops.log_softmax(logits, axis=1), axis=1)
    has = ops.cast(positives > 0, "float32")
    ce_mean = ops.sum(ce * has) / ops.maximum(ops.sum(has), 1.0)
    l2 = 2.0 * ops.mean(ops.sum(ops.square(x), axis=1)) * 0.25 * l2_reg
    return ce_mean + l2


@keras.saving.register_keras_serializable(package="landmark_tf")
class NPairsLoss(keras.layers.Layer):
    """Identity on the embeddings that adds `weight * npairs_loss(embeddings, labels)` to the
    model's losses in training (Baidu GLR2019: n-pairs beside the arcmargin head).

    Called as `layer(embeddings, labels, training=...)`: float32 [B, D] -> the same tensor.
    The trainer adds `model.losses` to the head's cross-entropy.
    """

    def __init__(self, weight: float = 1.0, l2_reg: float = 0.002, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.weight, self.l2_reg = float(weight), float(l2_reg)

    def call(self, embeddings, labels=None, training=None):
        if training and labels is not None and self.weight > 0:
            self.add_loss(self.weight * npairs_loss(embeddings, labels, self.l2_reg))
        return embeddings

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return embeddings_shape

    def get_config(self):
        return {**super().get_config(), "weight": self.weight, "l2_reg": self.l2_reg}
