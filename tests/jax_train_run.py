"""Helper of tests/test_jax_train.py, run with KERAS_BACKEND=jax and 2 virtual CPU devices:
an uninterrupted JAX run, and the same run resumed from its step-2 checkpoint (the workdir a
kill -9 after that checkpoint leaves), then the embedding of fixed images from the result.

  python tests/jax_train_run.py DATA_DIR OUT_DIR
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import numpy as np

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.modeling import model
from landmark_tf.training import train

MODEL = ModelConfig(image_size=32, embedding_dim=16, margin=0.1, head="adacos")


def config(data: str, workdir: str) -> TrainConfig:
    return TrainConfig(data_dir=data, workdir=workdir, train_steps=4, batch_size=8,
                       learning_rate=0.05, schedule="cosine", checkpoint_every=2, val_split="",
                       steps_per_execution=2, grad_accum_steps=2, backend="jax",
                       # 2 images per device and micro-step: per-replica statistics of 2 images
                       # at B0's 1x1 last stages blow the step up; statistics over all 4.
                       bn_statistics="global")


def main(data: str, out: str) -> None:
    reference, resumed = os.path.join(out, "reference"), os.path.join(out, "resumed")
    results = {"reference": train.train(MODEL, config(data, reference))}
    shutil.copytree(reference, resumed)
    for path in glob.glob(os.path.join(resumed, "checkpoints", "ckpt-4")):
        shutil.rmtree(path)
    shutil.rmtree(os.path.join(resumed, "logs"))
    results["resumed"] = train.train(MODEL, config(data, resumed))
    embedding_model, _ = model.restore_embedding_model(reference)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    np.save(os.path.join(out, "embeddings.npy"), np.asarray(embedding_model(images)))
    np.save(os.path.join(out, "images.npy"), images)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
