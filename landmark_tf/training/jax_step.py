"""The JAX train and eval steps: pure functions of (state, batch), jit-compiled.

state = (trainable, non_trainable, optimizer) lists of arrays in the order of
`train_model.trainable_variables`, `train_model.non_trainable_variables` (BatchNorm statistics,
the AdaCos scale, dropout seed states) and `optimizer.variables`. A step runs forward/backward
(`Model.stateless_call`) on each of `accum_steps` micro-batches (a `fori_loop` carrying the
gradient sums: memory of one micro-batch), then one `optimizer.stateless_apply`. The batch is
sharded over the devices on its first axis and the weights replicated (keras.distribution
DataParallel), so XLA (GSPMD) inserts the gradient all-reduce: the loss is the global mean, as the
TF trainer's sum over replicas of sum(ce * w) / global_batch. What a micro-batch computes is
step_math's, shared with the TensorFlow step; micro-batch j holds rows j*micro..(j+1)*micro-1
of each device's share, the rows TensorFlow's replica r takes for its micro-step j.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from keras import ops

from landmark_tf.training import step_math
from landmark_tf.training.step_math import TRAIN_KEYS  # noqa: F401


def make_train_step(net, optimizer, *, global_batch: int, accum_steps: int,
                    replicas: int = 1) -> Callable:
    """step(state, batch) -> (state, {"loss", "correct", "count", "pair_anchors"} float32
    scalars; "pair_anchors": examples with another of their class in their micro-batch).

    batch: {"image": [B, S, S, 3] float32 or uint8 0..255, "label": int32 [B],
    "weight": float32 [B], optional "flip": bool [B]}, B the global batch. "loss" is the mean
    weighted loss of the global batch, "correct" / "count" top-1 hits of the margin logits.
    replicas: the devices the batch is sharded over (in order), for the micro-batch split.
    """

    def forward(trainable, non_trainable, image, label, weight):
        logits, non_trainable, extra = net.stateless_call(
            trainable, non_trainable, {"image": image, "label": label}, training=True,
            return_losses=True)
        # Layer regularisers, once per optimizer step.
        loss = step_math.micro_loss(label, logits, weight, global_batch, extra,
                                    1.0 / float(accum_steps))
        counts = jnp.stack([step_math.top1_hits(label, logits), step_math.pair_anchors(label)])
        return loss, (non_trainable, counts)

    grad_fn = jax.value_and_grad(forward, has_aux=True)

    def step(state, batch):
        trainable, non_trainable, opt_vars = state
        image = step_math.prepare_images(batch)
        label, weight = batch["label"].astype(jnp.int32), batch["weight"]
        if accum_steps == 1:
            (loss, (non_trainable, hits)), grads = grad_fn(
                trainable, non_trainable, image, label, weight)
        else:
            # [R * accum * m] -> [R, accum, m]: device r's rows stay on device r (no
            # resharding); micro-batch j is [:, j] flattened back to [R * m].
            split = lambda x: x.reshape((replicas, accum_steps, -1, *x.shape[1:]))
            micro = [split(x) for x in (image, label, weight)]

            def body(j, carry):
                grads, loss, hits, non_trainable = carry
                parts = [jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)
                         for x in micro]
                parts = [p.reshape((-1, *p.shape[2:])) for p in parts]
                (l_j, (non_trainable, h_j)), g_j = grad_fn(trainable, non_trainable, *parts)
                grads = jax.tree_util.tree_map(jnp.add, grads, g_j)
                return grads, loss + l_j, hits + h_j, non_trainable

            zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
            carry = (zeros, jnp.float32(0.0), jnp.zeros([2], jnp.float32), non_trainable)
            grads, loss, hits, non_trainable = jax.lax.fori_loop(0, accum_steps, body, carry)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        # hits: [top-1 hits, pair anchors] summed over micro-batches.
        metrics = {"loss": loss.astype(jnp.float32), "correct": hits[0],
                   "count": jnp.float32(label.shape[0]), "pair_anchors": hits[1]}
        return (trainable, non_trainable, opt_vars), metrics

    return step


def make_eval_step(eval_model, train_model) -> Callable:
    """step(state, batch) -> {"correct", "count"}: top-1 of the head without margin.

    `state` is the train state (train_model's variable order); eval_model shares its variables.
    Examples with weight 0 (padding) count in neither.
    """
    t_pick, n_pick = subset_indices(train_model, eval_model)

    def step(state, batch):
        trainable, non_trainable, _ = state
        logits, _ = eval_model.stateless_call(
            [trainable[i] for i in t_pick], [non_trainable[i] for i in n_pick],
            ops.cast(batch["image"], "float32"), training=False)
        return step_math.eval_counts(batch["label"], logits, batch["weight"])

    return step


def subset_indices(net, part) -> tuple[list[int], list[int]]:
    """Where `part`'s trainable and non-trainable variables (a model sharing `net`'s layers)
    sit in `net`'s lists: to run `part` on `net`'s state."""
    picks = []
    for mine, theirs in ((net.trainable_variables, part.trainable_variables),
                         (net.non_trainable_variables, part.non_trainable_variables)):
        index = {id(v): i for i, v in enumerate(mine)}
        picks.append([index[id(v)] for v in theirs])
    return picks[0], picks[1]
