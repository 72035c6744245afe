"""Embedding datasets of images with a model placed for training (retrieval validation during
training, `landmark-embed --workdir`): what the SavedModel's serving_default computes, batch by
batch over the replicas.

Each decoded uint8 image is resized on its own by `resize_for_model` at every scale, the model
outputs (cast to float32) are averaged over scales and L2-normalised. Batches have a fixed
global size (the last one zero-padded, so compiled shapes stay static).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from landmark_tf.modeling.superglobal_pooling import combine_scales
from landmark_tf.preprocess import resize_for_model


class BatchEmbedder:
    """Base: tf.data preparation; subclasses run `_embed(batch) -> (vectors, valid)` NumPy.

    Args:
      sizes: input side per scale (multi-scale: mean of the descriptors).
      batch_size: global batch, rounded up to a multiple of `replicas`.
      dim: descriptor dimension D.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, replicas: int, dim: int):
        self.sizes = [int(s) for s in sizes]
        self.global_batch = -(-max(1, batch_size) // replicas) * replicas
        self.dim = int(dim)

    def _prepare(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        def prepare(image):
            out = {f"s{s}": resize_for_model(image, s) for s in self.sizes}
            return {**out, "valid": tf.ones([], tf.bool)}

        def pad(batch):
            missing = self.global_batch - tf.shape(batch["valid"])[0]
            return {k: tf.pad(v, [[0, missing]] + [[0, 0]] * (v.shape.rank - 1))
                    for k, v in batch.items()}  # fmt: skip

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.global_batch).map(pad).prefetch(2)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options)

    def _batches(self, ds: tf.data.Dataset):
        return self._prepare(ds)

    def _embed(self, batch) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def embed_dataset(self, images: tf.data.Dataset) -> np.ndarray:
        """float32 [n, D] unit rows for a dataset of n uint8 [H, W, 3] images, in order."""
        rows = []
        for batch in self._batches(images):
            vectors, valid = self._embed(batch)
            rows.append(vectors[valid])
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)

    def embed_stream(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """The same for a Python iterable of uint8 [H, W, 3] arrays (decoded on host threads)."""
        spec = tf.TensorSpec([None, None, 3], tf.uint8)
        return self.embed_dataset(
            tf.data.Dataset.from_generator(lambda: iter(images), output_signature=spec))


class StrategyEmbedder(BatchEmbedder):
    """A Keras embedding model whose variables live under a tf.distribute `strategy`.

    model: float32[B, S, S, 3] (0..255) -> [B, D] (any dtype policy); jit: XLA (TPU/GPU);
    combine: how the scales' descriptors combine (superglobal_pooling.combine_scales).
    """

    def __init__(self, model, strategy, sizes: Sequence[int], batch_size: int,
                 jit: bool = False, combine: str = "mean"):
        super().__init__(sizes, batch_size, strategy.num_replicas_in_sync,
                         int(model.output_shape[-1]))
        self.model, self.strategy, self.combine = model, strategy, combine
        self._step = tf.function(self._distributed, jit_compile=jit)

    def _replica(self, batch: dict) -> tuple[tf.Tensor, tf.Tensor]:
        parts = [tf.cast(self.model(batch[f"s{s}"], training=False), tf.float32)
                 for s in self.sizes]  # fmt: skip
        combined = combine_scales(parts, self.combine)  # mean, or SuperGlobal's max
        return tf.math.l2_normalize(combined, axis=-1), batch["valid"]

    def _distributed(self, batch: dict):
        return self.strategy.run(self._replica, args=(batch,))

    def _batches(self, ds: tf.data.Dataset):
        return self.strategy.experimental_distribute_dataset(self._prepare(ds))

    def _embed(self, batch) -> tuple[np.ndarray, np.ndarray]:
        local = self.strategy.experimental_local_results
        vectors, valid = self._step(batch)
        return (np.concatenate([v.numpy() for v in local(vectors)]),
                np.concatenate([v.numpy() for v in local(valid)]))


class JaxEmbedder(BatchEmbedder):
    """A Keras embedding model under JAX, run as a jit-compiled stateless call on `state()`
    (trainable, non-trainable arrays of the embedding model, e.g. the trainer's live state)
    with the batch sharded by `to_device` (a dict of NumPy arrays -> sharded jax arrays)."""

    def __init__(self, model, state, to_device, sizes: Sequence[int], batch_size: int,
                 replicas: int):
        import jax

        super().__init__(sizes, batch_size, replicas, int(model.output_shape[-1]))
        self.state, self.to_device = state, to_device

        def embed(trainable, non_trainable, images: dict):
            from keras import ops

            parts = [ops.cast(model.stateless_call(trainable, non_trainable,
                                                   ops.cast(images[f"s{s}"], "float32"),
                                                   training=False)[0], "float32")
                     for s in self.sizes]
            mean = parts[0] if len(parts) == 1 else sum(parts) / float(len(parts))
            return mean / ops.maximum(ops.norm(mean, axis=-1, keepdims=True), 1e-12)

        self._step = jax.jit(embed)

    def _embed(self, batch) -> tuple[np.ndarray, np.ndarray]:
        batch = {k: v.numpy() for k, v in batch.items()}
        valid = batch.pop("valid")
        trainable, non_trainable = self.state()
        vectors = self._step(trainable, non_trainable, self.to_device(batch))
        return np.asarray(vectors), valid
