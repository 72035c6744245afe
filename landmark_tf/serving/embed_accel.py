"""landmark-embed on the accelerator: the training workdir's model under the trainer's strategy.

The same strategy choice as landmark-train (training/distribute.py: TPU, several GPUs, or the
CPU), the same precision rule (mixed bfloat16 on TPU, mixed float16 on GPU, float32 on CPU under
"auto") and the preprocessing of the SavedModel exactly: each decoded uint8 image is resized on
its own by `resize_for_model` at every scale, the model outputs (cast to float32) are averaged
over scales and L2-normalised - what serving_default computes. So rows equal the SavedModel
path's within float tolerance (float32), or within mixed-precision rounding.

Images are decoded on host threads (which names every unreadable image, as the SavedModel path
does); resizing, batching and prefetching run in tf.data; batches of a fixed global size (the
last one zero-padded, so TPU shapes stay static) are split over the replicas.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.errors import UserError
from landmark_tf.modeling import model as model_lib
from landmark_tf.preprocess import resize_for_model
from landmark_tf.serving import export
from landmark_tf.training import distribute


@dataclasses.dataclass
class AccelConfig:
    """workdir: a landmark-train workdir (config.json + checkpoints/); image_size None = the
    trained size; strategy/tpu/precision as landmark-train's flags."""

    workdir: str
    strategy: str = "auto"
    tpu: str = ""
    precision: str = "auto"
    scales: Sequence[float] = (1.0,)
    image_size: int | None = None


def workdir_of(path: str) -> str:
    """A workdir as given, or the workdir an export of ours was made from (metadata.json)."""
    if fileio.exists(fileio.join(path, model_lib.CONFIG_FILE)):
        return path
    meta_path = fileio.join(path, export.METADATA_FILE)
    if fileio.exists(meta_path):
        checkpoint = fileio.read_json(meta_path).get("checkpoint") or ""
        workdir = checkpoint.rsplit("/" + model_lib.CHECKPOINT_DIR + "/", 1)[0]
        if checkpoint and fileio.exists(fileio.join(workdir, model_lib.CONFIG_FILE)):
            return workdir
        raise UserError(f"--workdir {path}: an export whose training workdir ({workdir}) is gone")
    raise UserError(f"--workdir {path}: no {model_lib.CONFIG_FILE} (not a landmark-train workdir)")


class StrategyEmbedder:
    """Embeds datasets of uint8 [H, W, 3] images with a Keras embedding model placed under
    `strategy`: what serving_default computes, batch by batch over the replicas.

    Args:
      model: float32[B, S, S, 3] (0..255) -> [B, D] embedding model (any dtype policy).
      strategy: the strategy whose scope holds the model's variables.
      sizes: input side per scale (multi-scale: mean of the descriptors).
      batch_size: global batch, rounded up to a multiple of the replicas.
      jit: XLA-compile the step (TPU/GPU).
    """

    def __init__(self, model, strategy, sizes: Sequence[int], batch_size: int, jit: bool = False):
        self.model, self.strategy, self.sizes = model, strategy, [int(s) for s in sizes]
        replicas = strategy.num_replicas_in_sync
        self.global_batch = -(-max(1, batch_size) // replicas) * replicas
        self._step = tf.function(self._distributed, jit_compile=jit)

    def _replica(self, batch: dict) -> tuple[tf.Tensor, tf.Tensor]:
        parts = [tf.cast(self.model(batch[f"s{s}"], training=False), tf.float32)
                 for s in self.sizes]  # fmt: skip
        mean = parts[0] if len(parts) == 1 else tf.add_n(parts) / float(len(parts))
        return tf.math.l2_normalize(mean, axis=-1), batch["valid"]

    def _distributed(self, batch: dict):
        return self.strategy.run(self._replica, args=(batch,))

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

    def embed_dataset(self, images: tf.data.Dataset) -> np.ndarray:
        """float32 [n, D] unit rows for a dataset of n uint8 [H, W, 3] images, in order."""
        dist = self.strategy.experimental_distribute_dataset(self._prepare(images))
        local = self.strategy.experimental_local_results
        rows = []
        for batch in dist:
            vectors, valid = self._step(batch)
            vectors = np.concatenate([v.numpy() for v in local(vectors)])
            valid = np.concatenate([v.numpy() for v in local(valid)])
            rows.append(vectors[valid])
        dim = int(self.model.output_shape[-1])
        return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)

    def embed_stream(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """The same for a Python iterable of uint8 [H, W, 3] arrays (decoded on host threads)."""
        spec = tf.TensorSpec([None, None, 3], tf.uint8)
        return self.embed_dataset(
            tf.data.Dataset.from_generator(lambda: iter(images), output_signature=spec))


class AccelEmbedder(StrategyEmbedder):
    """The embedding model of a training workdir, restored under its strategy and precision."""

    def __init__(self, cfg: AccelConfig, batch_size: int):
        self.workdir = workdir_of(cfg.workdir)
        strategy = distribute.resolve_strategy(cfg.strategy, cfg.tpu)
        kind = distribute.device_kind(strategy)
        self.policy = distribute.precision_policy(cfg.precision, kind)
        saved = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.policy)
        try:
            with strategy.scope():
                model, mcfg = model_lib.restore_embedding_model(self.workdir)
        finally:
            keras.config.set_dtype_policy(saved)
        sizes = export.scaled_sizes(int(cfg.image_size or mcfg.image_size), cfg.scales)
        self.dim = mcfg.embedding_dim
        super().__init__(model, strategy, sizes, batch_size, distribute.use_jit("auto", kind))

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption."""
        checkpoint = model_lib.latest_checkpoint(self.workdir)
        digest = hashlib.sha256(fileio.read_bytes(checkpoint + ".index"))
        digest.update(fileio.read_bytes(fileio.join(self.workdir, model_lib.CONFIG_FILE)))
        return {"workdir": self.workdir, "checkpoint": checkpoint, "policy": self.policy,
                "input_sizes": self.sizes, "model_sha256": digest.hexdigest()}  # fmt: skip

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        return self.embed_stream(images)
