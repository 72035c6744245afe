"""Helper of tests/test_tag_training.py, run in a subprocess under KERAS_BACKEND=tensorflow or jax
with a small stand-in backbone (XLA:CPU compiles EfficientNet-B0 for minutes).

  python tests/tag_train_run.py runs DATA_DIR OUT_DIR
      each tag head: 4 steps, and the same run resumed from its step-2 checkpoint; then a
      cosface stage --init_from the multilabel run; results.json + final weights (.npz)
  python tests/tag_train_run.py cli [landmark-train flags...]
      landmark-train itself (flags and closing JSON) with the stand-in backbone
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import keras
import numpy as np
from frozen_bn_run import stand_in_backbone

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.modeling import model
from landmark_tf.training import train

HEADS = ("multilabel", "label_weighted")


def config(data: str, workdir: str, **kw) -> TrainConfig:
    settings = dict(train_steps=4, batch_size=8, learning_rate=0.05, schedule="cosine",
                    checkpoint_every=2, val_split="", backend=keras.backend.backend())
    return TrainConfig(data_dir=data, workdir=workdir, **{**settings, **kw})


def weights(workdir: str) -> dict[str, np.ndarray]:
    """Backbone and neck weights of a workdir's latest checkpoint, by variable path."""
    models = model.build_models(model.read_model_config(workdir), with_head=False)
    model.restore_parts(models, model.latest_checkpoint(workdir), ["backbone", "neck"])
    return {v.path: np.asarray(v) for v in models.embedding_model.weights}


def runs(data: str, out: str) -> None:
    results = {}
    for head in HEADS:
        cfg = ModelConfig(image_size=32, embedding_dim=16, head=head)
        reference, resumed = os.path.join(out, head), os.path.join(out, f"{head}_resumed")
        results[head] = train.train(cfg, config(data, reference))
        shutil.copytree(reference, resumed)
        for path in glob.glob(os.path.join(resumed, "checkpoints", "ckpt-4")):
            shutil.rmtree(path)
        results[f"{head}_resumed"] = train.train(cfg, config(data, resumed))
        np.savez(os.path.join(out, f"{head}.npz"), **weights(reference))
        np.savez(os.path.join(out, f"{head}_resumed.npz"), **weights(resumed))
    stage = ModelConfig(image_size=32, embedding_dim=16, head="cosface", margin=0.1)
    results["landmarks"] = train.train(stage, config(
        data, os.path.join(out, "landmarks"), train_steps=0,
        init_from=os.path.join(out, "multilabel")))
    np.savez(os.path.join(out, "landmarks.npz"), **weights(os.path.join(out, "landmarks")))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    model.backbones.build_backbone = stand_in_backbone
    if sys.argv[1] == "cli":
        from landmark_tf.cli import train as train_cli

        sys.argv = ["landmark-train", *sys.argv[2:]]
        train_cli.run()
    else:
        runs(sys.argv[2], sys.argv[3])
