"""landmark-embed on the accelerator: the training workdir's model under the trainer's strategy.

A workdir trained by either backend (its checkpoints are the same format), embedded with
TensorFlow here. The same strategy choice as landmark-train (training/distribute.py: TPU,
several GPUs, or the CPU), the same precision rule (mixed bfloat16 on TPU, mixed float16 on
GPU, float32 on CPU under "auto") and the preprocessing of the SavedModel exactly: each decoded
uint8 image is resized on its own by `resize_for_model` at every scale, the model outputs (cast
to float32) are averaged over scales and L2-normalised - what serving_default computes. So rows
equal the SavedModel path's within float tolerance (float32), or within mixed-precision rounding.

Images are decoded on host threads (which names every unreadable image, as the SavedModel path
does); resizing, batching and prefetching run in tf.data (training/embedder.py); batches of a
fixed global size (the last one zero-padded, so TPU shapes stay static) are split over the
replicas.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import keras
import numpy as np

from landmark_tf import fileio, workdir
from landmark_tf.modeling import checkpoint
from landmark_tf.modeling import model as model_lib
from landmark_tf.serving import export
from landmark_tf.training import distribute
from landmark_tf.training.embedder import StrategyEmbedder


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
    inference_pooling: str = "trained"  # or "superglobal", as landmark-export's


class AccelEmbedder(StrategyEmbedder):
    """The embedding model of a training workdir, restored under its strategy and precision."""

    def __init__(self, cfg: AccelConfig, batch_size: int):
        self.workdir = workdir.resolve(cfg.workdir)
        strategy = distribute.resolve_strategy(cfg.strategy, cfg.tpu)
        kind = distribute.device_kind(strategy)
        self.policy = distribute.precision_policy(cfg.precision, kind)
        saved = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.policy)
        try:
            with strategy.scope():
                model, mcfg = model_lib.restore_embedding_model(self.workdir,
                                                                cfg.inference_pooling)
        finally:
            keras.config.set_dtype_policy(saved)
        sizes = export.scaled_sizes(int(cfg.image_size or mcfg.image_size), cfg.scales)
        export.check_input_sizes(model, sizes)
        self.dim = mcfg.embedding_dim
        self.inference_pooling = cfg.inference_pooling
        super().__init__(model, strategy, sizes, batch_size, distribute.use_jit("auto", kind),
                         combine=export.scale_combine(cfg.inference_pooling))

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption."""
        found = model_lib.latest_checkpoint(self.workdir)
        digest = hashlib.sha256(checkpoint.fingerprint(found).encode())
        digest.update(fileio.read_bytes(fileio.join(self.workdir, workdir.CONFIG_FILE)))
        return {"workdir": self.workdir, "checkpoint": found.path, "policy": self.policy,
                "input_sizes": self.sizes, "inference_pooling": self.inference_pooling,
                "model_sha256": digest.hexdigest()}  # fmt: skip

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        return self.embed_stream(images)
