"""Helper of tests/test_dolg_jax.py and tests/test_hub_backbones.py, run with KERAS_BACKEND=jax:
a run of the model config MODEL_JSON, 2 steps then resumed to 3, and the embeddings of fixed
images from the result. With --stand_in, EfficientNet is the stage-named stand-in backbone.

  python tests/jax_model_run.py DATA_DIR OUT_DIR MODEL_JSON [--stand_in]
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


def main(data: str, out: str, model_json: str, stand_in: bool) -> None:
    if stand_in:
        model.backbones.build_backbone = stage_named_backbone
    model_cfg = ModelConfig.from_dict(json.loads(model_json))
    workdir = os.path.join(out, "run")
    results = {}
    for steps in (2, 3):
        cfg = TrainConfig(data_dir=data, workdir=workdir, train_steps=steps, batch_size=8,
                          learning_rate=0.05, schedule="constant", checkpoint_every=1,
                          val_split="", backend="jax")
        results[steps] = train.train(model_cfg, cfg)
    embedding_model, _ = model.restore_embedding_model(workdir)
    size = model_cfg.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("float32")
    np.save(os.path.join(out, "embeddings.npy"), np.asarray(embedding_model(images)))
    np.save(os.path.join(out, "images.npy"), images)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--stand_in" in sys.argv[4:])
