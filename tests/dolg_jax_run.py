"""Helper of tests/test_dolg_jax.py, run with KERAS_BACKEND=jax: a --neck=dolg run with the
dynamic-margin sub-center ArcFace head on the stage-named stand-in backbone, 2 steps then
resumed to 3, and the embeddings of fixed images from the result.

  python tests/dolg_jax_run.py DATA_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from stage_named_backbone import stage_named_backbone

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.modeling import model
from landmark_tf.training import train

MODEL = ModelConfig(image_size=32, embedding_dim=16, neck="dolg", pooling="gem",
                    head="dynamic_arcface", scale=45.0, dolg_dilations=[1, 2, 3])


def main(data: str, out: str) -> None:
    model.backbones.build_backbone = stage_named_backbone
    workdir = os.path.join(out, "run")
    results = {}
    for steps in (2, 3):
        cfg = TrainConfig(data_dir=data, workdir=workdir, train_steps=steps, batch_size=8,
                          learning_rate=0.05, schedule="constant", checkpoint_every=1,
                          val_split="", backend="jax")
        results[steps] = train.train(MODEL, cfg)
    embedding_model, _ = model.restore_embedding_model(workdir)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    np.save(os.path.join(out, "embeddings.npy"), np.asarray(embedding_model(images)))
    np.save(os.path.join(out, "images.npy"), images)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
