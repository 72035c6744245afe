"""Helper of tests/test_frozen_bn.py: the same four tiny runs under the Keras backend of this
process (the test runs it in-process for TensorFlow and as a KERAS_BACKEND=jax subprocess).

  start       train mode, 1 step at learning rate 0 with bn_momentum 0: the backbone's moving
              statistics become one batch's (a calibrated start; a random EfficientNet's
              default statistics shrink its features towards 0, where descriptors say nothing)
  train_lr0   --init_from start, backbone_mode train, 5 steps at learning rate 0
  frozen_lr0  --init_from start, backbone_mode frozen_bn, 5 steps at learning rate 0
  frozen_lr   --init_from start, backbone_mode frozen_bn, 3 steps at learning rate 0.5

start and train_lr0 share every setting that reaches the compiled step, so under JAX the second
reuses the first's compilation (from JAX_COMPILATION_CACHE_DIR when the caller sets it).
Writes OUT/results.npz: per run the descriptors of fixed images ("<run>/embeddings") and every
backbone BatchNorm variable ("<run>/<layer>/<gamma|beta|moving_mean|moving_variance>").

  python tests/frozen_bn_run.py DATA_DIR OUT_DIR [--stand_in]

--stand_in builds a small conv/BatchNorm/Dropout backbone instead of EfficientNet-B0 (whose
train step XLA:CPU takes minutes to compile): the same wrapper, trainer and checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import keras
import numpy as np

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.modeling import model
from landmark_tf.training import train

# The released recipe's neck and head (no BatchNorm outside the backbone), tiny.
MODEL = ModelConfig(image_size=32, embedding_dim=8, neck="dense", neck_activation="swish",
                    head="adacos_per_batch", margin=0.0)
RUNS = {  # name: (backbone_mode, steps, learning rate); bn_momentum 0 throughout
    "start": ("train", 1, 0.0),
    "train_lr0": ("train", 5, 0.0),
    "frozen_lr0": ("frozen_bn", 5, 0.0),
    "frozen_lr": ("frozen_bn", 3, 0.5),
}
BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")


def stand_in_backbone(name: str, weights=None) -> keras.Model:
    """[B, H, W, 3] 0..255 -> [B, H/4, W/4, 16]: stem conv + "stem_bn", two conv + BatchNorm
    blocks, dropout between them; named like an EfficientNet so read_run finds it."""
    del name, weights
    x = keras.Input((None, None, 3))
    y = keras.layers.Rescaling(1 / 255.0)(x)
    for i, (filters, stride) in enumerate(((8, 2), (8, 1), (16, 2))):
        y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                name=f"conv{i}")(y)
        y = keras.layers.BatchNormalization(name="stem_bn" if i == 0 else f"block{i}_bn")(y)
        y = keras.layers.Activation("swish")(y)
        if i == 1:
            y = keras.layers.Dropout(0.3)(y)
    return keras.Model(x, y, name="efficientnet_stand_in")


def images() -> np.ndarray:
    """float32 [2, 32, 32, 3], integer values 0..255 (exact as uint8 for the SavedModel)."""
    return np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype("float32")


def run(data: str, out: str) -> dict[str, np.ndarray]:
    backend = keras.backend.backend()
    results = {}
    for name, (mode, steps, lr) in RUNS.items():
        workdir = os.path.join(out, name)
        cfg = TrainConfig(data_dir=data, workdir=workdir, train_steps=steps, batch_size=4,
                          learning_rate=lr, momentum=0.9, weight_decay=0.0,
                          bn_momentum=0.0, schedule="constant", checkpoint_every=steps,
                          val_split="", augment=[], backend=backend,
                          init_from="" if name == "start" else os.path.join(out, "start"))
        train.train(dataclasses.replace(MODEL, backbone_mode=mode), cfg)
        results.update(read_run(workdir, name))
    np.savez(os.path.join(out, "results.npz"), **results)
    return results


def read_run(workdir: str, name: str) -> dict[str, np.ndarray]:
    """Descriptors and backbone BatchNorm variables of the latest checkpoint of `workdir`."""
    embedding_model, _ = model.restore_embedding_model(workdir)
    found = {f"{name}/embeddings": keras.ops.convert_to_numpy(embedding_model(images()))}
    backbone = next(la for la in embedding_model._flatten_layers()
                    if isinstance(la, keras.Model) and la.name.startswith("efficientnet"))
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for var in BN_VARIABLES:
                found[f"{name}/{layer.name}/{var}"] = keras.ops.convert_to_numpy(
                    getattr(layer, var))
    return found


if __name__ == "__main__":
    if "--stand_in" in sys.argv:
        model.backbones.build_backbone = stand_in_backbone
    run(sys.argv[1], sys.argv[2])
