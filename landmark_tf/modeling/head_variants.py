"""Head variants on top of heads.py: dynamic-margin sub-center ArcFace (GLR2021 1st place), a
factorised (low-rank) class matrix (Cookpad GLR2019), and the n-pairs loss (Baidu GLR2019).
`build_training_head` builds any head, these included.

Shapes as in heads.py: embeddings float32 [B, D], labels int [B] -> logits float32 [B, C].
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from landmark_tf.config import TAG_HEADS
from landmark_tf.errors import UserError
from landmark_tf.modeling.heads import (
    _EPS,
    ArcFace,
    CosFace,
    SubCenterArcFace,
    _CosineHead,
    build_head,
)

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


def build_training_head(head: str, num_classes: int, *, scale: float | None = None,
                     margin: float = 0.0, subcenters: int = 1, rank: int = 0,
                     class_counts=None, margin_a: float = 0.45, margin_b: float = 0.05,
                     name: str = "head") -> keras.layers.Layer:
    """build_head plus the variants: "dynamic_arcface", and `rank` > 0 for a factorised matrix."""
    if rank > 0 and head not in _LOW_RANK:
        raise UserError(f"a factorised head (rank {rank}) is available for "
                        f"{sorted(_LOW_RANK)}, not {head!r}")
    if head in TAG_HEADS:  # a softmax over the tag vocabulary; the loss is in step_math
        return build_head("softmax", num_classes, name=name)
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
