"""Helper of tests/test_backend_parity.py: the same training runs on 2 devices under the Keras
backend of this process (2 logical CPUs under TensorFlow's MirroredStrategy, 2 virtual CPU
devices under JAX), a small backbone standing in for EfficientNet (XLA:CPU takes minutes to
compile B0's step; no dropout, whose masks come from each backend's own RNG).

  KERAS_BACKEND=jax python tests/backend_parity_run.py DATA OUT [TF_OUT]

Writes OUT/results.json and, per run, OUT/<head>-<bn_statistics>/ (a workdir). With TF_OUT (a
TensorFlow helper's OUT) it also resumes a copy of TF_OUT's arcface-replica workdir from its
step-2 checkpoint under this backend (OUT/resumed).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import keras
import numpy as np

from landmark_tf.config import HEADS, TAG_HEADS, ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones, model
from landmark_tf.training import train

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def small_backbone(name, weights_path=None):
    del name, weights_path
    image = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(x)
    return keras.Model(image, x, name="small_backbone")


def same_initial_weights(*args, **kwargs):
    """build_models, then every random-initialised weight drawn by NumPy: Keras's initialisers
    draw from each backend's own RNG, so the same seed gives other weights per backend."""
    models = _build_models(*args, **kwargs)
    rng = np.random.default_rng(0)
    for v in models.embedding_model.trainable_variables + (
            models.head.trainable_variables if models.head is not None else []):
        if len(v.shape) >= 2:
            bound = np.sqrt(3.0 / np.prod(v.shape[:-1]))
            v.assign(rng.uniform(-bound, bound, v.shape).astype("float32"))
    return models


backbones.build_backbone = small_backbone
_build_models = model.build_models
model.build_models = same_initial_weights
# (head, bn_statistics): every head with per-replica statistics, and global statistics once
# Landmark heads (the tag heads train on tag records: tests/test_tag_training.py).
LANDMARK_HEADS = [h for h in HEADS if h not in TAG_HEADS]
RUNS = [(h, "replica") for h in LANDMARK_HEADS] + [("arcface", "global")]


def configs(data: str, workdir: str, head: str, bn: str, **changes):
    model_cfg = ModelConfig(image_size=32, embedding_dim=8, head=head, margin=0.1,
                            neck="dense_bn", num_classes=4)
    cfg = TrainConfig(data_dir=data, workdir=workdir, train_steps=4, batch_size=8,
                      learning_rate=0.1, schedule="constant", val_split="", augment=["flip"],
                      checkpoint_every=2, steps_per_execution=2, bn_statistics=bn,
                      weight_decay=0.0, backend=BACKEND, strategy="auto", **changes)
    return model_cfg, cfg


def strategy():
    if BACKEND != "tensorflow":
        return None
    from landmark_tf.training import distribute

    # One MirroredStrategy per process: two collide on collective keys.
    return distribute.resolve_strategy("mirrored")


def main(data: str, out: str, tf_out: str | None) -> None:
    from landmark_tf.training.retrieval_validation import RetrievalValConfig

    results, shared = {"runs": RUNS}, strategy()
    # Held-out mAP@100 during training, once per backend (batches of 3: padded over 2 devices).
    retrieval = RetrievalValConfig(os.path.join(data, "val-*"), os.path.join(data, "train-*"),
                                   every=2, batch_size=3)
    for head, bn in RUNS:
        model_cfg, cfg = configs(data, os.path.join(out, f"{head}-{bn}"), head, bn)
        r = train.Run(model_cfg, cfg, train.make_plan(cfg), strategy=shared,
                      retrieval_val=retrieval if head == "arcface" else None).run()
        keras.mixed_precision.set_global_policy("float32")
        results[f"{head}-{bn}"] = {k: r.get(k) for k in (
            "step", "loss", "replicas", "backend", "bn_statistics", "retrieval_map@100")}
    # --init_from a workdir whose classes are other landmarks: refused, head not kept.
    other = os.path.join(out, "other_data")
    shutil.copytree(data, other)
    with open(os.path.join(other, "label_map.csv"), "w") as f:
        f.write("label,landmark_id,count\n" + "".join(f"{i},{900 + i},6\n" for i in range(4)))
    model_cfg, cfg = configs(other, os.path.join(out, "stage"), "arcface", "replica",
                             init_from=os.path.join(out, "arcface-replica"))
    try:
        train.Run(model_cfg, cfg, train.make_plan(cfg), strategy=shared)
        results["init_from_refusal"] = None
    except UserError as e:
        results["init_from_refusal"] = str(e)
    if tf_out:
        resumed = os.path.join(out, "resumed")
        shutil.copytree(os.path.join(tf_out, "arcface-replica"), resumed)
        shutil.rmtree(os.path.join(resumed, "checkpoints", "ckpt-4"))
        shutil.rmtree(os.path.join(resumed, "logs"))
        model_cfg, cfg = configs(data, resumed, "arcface", "replica")
        r = train.Run(model_cfg, cfg, train.make_plan(cfg), strategy=shared).run()
        results["resumed"] = {k: r[k] for k in ("step", "start_step", "resumed_from", "backend")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
