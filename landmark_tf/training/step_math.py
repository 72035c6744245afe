"""The arithmetic of a training and an evaluation step that both backends share (keras.ops).

Only gradients, the optimizer update and the accumulation primitive differ per backend
(tf_step: GradientTape and a tf.range loop under tf.distribute; jax_step: value_and_grad and
a fori_loop under GSPMD); what a micro-batch computes is written here once.
"""

from __future__ import annotations

from keras import ops

from landmark_tf.modeling import losses

# pair_anchors: examples with another of their class in their micro-batch (step_math.pair_anchors),
# the anchors a pair loss such as n-pairs can use.
TRAIN_KEYS = ("loss", "correct", "count", "pair_anchors")
EVAL_KEYS = ("correct", "count")


def prepare_images(batch: dict):
    """float32 [B, S, S, 3] images of a batch (uint8 or float32 infeed, 0..255), mirrored where
    batch["flip"] (bool [B], drawn on the host) says so: flips run on the device."""
    image = ops.cast(batch["image"], "float32")
    if "flip" in batch:
        image = ops.where(batch["flip"][:, None, None, None], ops.flip(image, axis=2), image)
    return image


def micro_loss(label, logits, weight, global_batch: int, extra_losses, share: float):
    """A micro-batch's share of the step's loss (float32 scalar): its part of the global mean
    weighted cross-entropy plus `share` of the layer regularisers (`extra_losses`, a list of
    scalars: a replica's and micro-step's part, so that they count once per optimizer step).
    label int [B] and weight float32 [B] for landmark heads; int [B, T] tag ids (-1 padded) and
    float32 [B, T] weights for the tag heads (losses.tag_cross_entropy)."""
    if is_tags(label):
        loss = losses.tag_cross_entropy(label, logits, weight, global_batch)
    else:
        loss = losses.weighted_cross_entropy(label, logits, weight, global_batch)
    if extra_losses:
        loss = loss + ops.sum(ops.stack([ops.cast(x, "float32") for x in extra_losses])) * share
    return loss


def is_tags(label) -> bool:
    """True for tag targets (int [B, T]), False for landmark labels (int [B]); static."""
    return len(label.shape) == 2


def top1_hits(label, logits):
    """float32 scalar: how many rows of logits [B, C] have their maximum at label int32 [B]
    (for tag targets int [B, T]: at one of the image's tags)."""
    top = ops.cast(ops.argmax(logits, axis=-1), "int32")
    if is_tags(label):
        hits = ops.any(ops.equal(top[:, None], ops.cast(label, "int32")), axis=-1)
    else:
        hits = ops.equal(top, ops.cast(label, "int32"))
    return ops.sum(ops.cast(hits, "float32"))


def pair_anchors(label):
    """float32 scalar: how many of the labels int [B] have another example of their class in
    the batch, i.e. the anchors with a positive that a pair loss (n-pairs) can use; 0 for tag
    targets (no pair loss trains on them)."""
    if is_tags(label):
        return ops.sum(ops.zeros((1,), "float32"))
    label = ops.reshape(ops.cast(label, "int32"), (-1,))
    same = ops.cast(ops.equal(label[:, None], label[None, :]), "float32")
    return ops.sum(ops.cast(ops.sum(same, axis=1) > 1.0, "float32"))


def eval_counts(label, logits, weight) -> dict:
    """{"correct", "count"} float32 scalars: top-1 hits and examples, padding (weight 0) left
    out of both."""
    hits = ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), ops.cast(label, "int32"))
    valid = ops.cast(ops.greater(weight, 0), "float32")
    return {"correct": ops.sum(ops.cast(hits, "float32") * valid), "count": ops.sum(valid)}
