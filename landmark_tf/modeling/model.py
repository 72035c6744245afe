"""The landmark models and their one checkpoint layout.

backbone (EfficientNet) -> neck (pool -> Dense [-> BN]) -> head (cosine classifier) for training;
backbone -> neck -> L2 normalisation for the product, the embedding model. Both share layers.
A training workdir holds `config.json` ({"model": ModelConfig.to_dict(), ...}) and
`checkpoints/` written either by a tf.train.CheckpointManager over `make_checkpoint(...)` (the
TensorFlow trainer) or as `ckpt-<step>.npz` files (`npz_checkpoint`, the JAX trainer). Every
reader here takes both, under either Keras backend; a TensorFlow checkpoint read under JAX goes
through a TensorFlow-backend subprocess that rewrites it as npz.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from typing import Any

import keras

from landmark_tf.config import ModelConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones, lever_heads, npz_checkpoint
from landmark_tf.modeling.pooling import EmbeddingNeck

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class LandmarkModels:
    """The parts and the models built from them (all sharing the same layer objects).

    train_model: {"image": float32 [B, S, S, 3] 0..255, "label": int32 [B]} -> float32 [B, C]
      logits, margin applied when called with training=True (as `fit` does), scaled.
    eval_logits_model: float32 [B, H, W, 3] -> float32 [B, C] logits without margin.
    embedding_model: float32 [B, H, W, 3] 0..255 -> float32 [B, D], L2-normalised.
    head, train_model and eval_logits_model are None when built with `with_head=False`.
    """

    config: ModelConfig
    backbone: keras.Model
    neck: EmbeddingNeck
    head: keras.layers.Layer | None
    embedding_model: keras.Model
    train_model: keras.Model | None
    eval_logits_model: keras.Model | None


def build_models(
    cfg: ModelConfig, pretrained_weights: str | None = None, *, with_head: bool = True,
    class_counts: list[int] | None = None,
) -> LandmarkModels:
    """Builds all models for `cfg`. Call under `strategy.scope()` to place the variables.

    pretrained_weights: Keras `efficientnetbN_notop.h5` ImageNet file (local or gs://), or None.
    class_counts: train images per class (dataset_info.json), for the dynamic_arcface margins.
    The backbone computes in the global dtype policy; neck, embeddings and logits are float32.
    With `cfg.backbone_mode == "frozen_bn"` the backbone runs in inference mode in every call
    (`backbones.InferenceModeBackbone`); the neck and head follow the call's `training`.
    """
    cfg.validate()
    backbone = backbones.build_backbone(cfg.backbone, pretrained_weights)
    neck = EmbeddingNeck(cfg.pooling, cfg.gem_p, cfg.embedding_dim, cfg.neck,
                         cfg.neck_activation, name="neck")
    image = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    # frozen_bn: the wrapper fixes the backbone's mode; `backbone` stays the object that
    # checkpoints save and restore (the wrapper holds no variables of its own).
    run_backbone = (backbones.InferenceModeBackbone(backbone, name="frozen_bn_backbone")
                    if cfg.backbone_mode == "frozen_bn" else backbone)
    features = neck(run_backbone(image))
    normalized = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")(features)
    embedding_model = keras.Model(image, normalized, name="embedding_model")
    if not with_head:
        return LandmarkModels(cfg, backbone, neck, None, embedding_model, None, None)
    head = lever_heads.build_lever_head(
        cfg.head, cfg.num_classes, scale=cfg.scale, margin=cfg.margin,
        subcenters=cfg.subcenters, rank=cfg.head_rank, class_counts=class_counts,
        margin_a=cfg.dynamic_margin_a, margin_b=cfg.dynamic_margin_b, name="head",
    )
    label = keras.Input(shape=(), dtype="int32", name="label")
    train_features = features
    if cfg.npairs_weight > 0:  # adds its loss to train_model.losses in training
        train_features = lever_heads.NPairsLoss(cfg.npairs_weight, cfg.npairs_l2_reg,
                                          name="npairs")(features, label)
    train_model = keras.Model(
        {"image": image, "label": label}, head(train_features, label), name="train_model"
    )
    eval_logits_model = keras.Model(image, head(features), name="eval_logits_model")
    return LandmarkModels(
        cfg, backbone, neck, head, embedding_model, train_model, eval_logits_model
    )


def make_checkpoint(models: LandmarkModels, **extra: Any):
    """The TF checkpoint layout: backbone=, neck=, head= plus `extra` (optimizer=, step=, ...)."""
    import tensorflow as tf

    parts = {"backbone": models.backbone, "neck": models.neck}
    if models.head is not None:
        parts["head"] = models.head
    return tf.train.Checkpoint(**parts, **extra)


def read_model_config(workdir: str) -> ModelConfig:
    """The ModelConfig saved under "model" in workdir/config.json."""
    from landmark_tf import fileio

    path = fileio.join(workdir, CONFIG_FILE)
    if not fileio.exists(path):
        raise UserError(f"{path}: not found; is {workdir} a landmark-train workdir?")
    config = fileio.read_json(path)
    if not isinstance(config, dict) or "model" not in config:
        raise UserError(f"{path}: has no \"model\" section")
    return ModelConfig.from_dict(config["model"])


def latest_checkpoint(workdir: str) -> str:
    """The newest checkpoint in workdir/checkpoints: a TF path prefix or an npz file path
    (`is_npz`); UserError when none."""
    import tensorflow as tf

    directory = os.path.join(workdir, CHECKPOINT_DIR)
    path = npz_checkpoint.latest(directory) or tf.train.latest_checkpoint(directory)
    if path is None:
        raise UserError(f"no checkpoint in {directory}")
    return path


def is_npz(checkpoint: str) -> bool:
    """Whether a `latest_checkpoint` path is the JAX trainer's npz format."""
    return checkpoint.endswith(".npz")


def restore_parts(models: LandmarkModels, path: str, parts: list[str]) -> None:
    """Restores `parts` (of backbone, neck, head) from a TF or npz checkpoint `path`."""
    if not is_npz(path) and keras.backend.backend() != "tensorflow":
        with tempfile.TemporaryDirectory(prefix="landmark_tf_convert_") as tmp:
            converted = os.path.join(tmp, "ckpt.npz")
            convert_to_npz(path, converted, models.config, with_head="head" in parts)
            restore_parts(models, converted, parts)
        return
    if is_npz(path):
        with npz_checkpoint.Reader(path) as reader:
            for part in parts:
                reader.restore(part, getattr(models, part).variables)
        backbones.refresh_normalization(models.backbone)
        return
    import tensorflow as tf

    _restore(tf.train.Checkpoint(**{p: getattr(models, p) for p in parts}), path, models)


def convert_to_npz(checkpoint: str, output: str, cfg: ModelConfig, with_head: bool) -> None:
    """Rewrites a TF checkpoint of `cfg`'s model as npz, in a TensorFlow-backend subprocess
    (the Keras backend is fixed per process; a JAX process cannot build TF variables)."""
    import json

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "landmark_tf.modeling.model", checkpoint, output,
               json.dumps(cfg.to_dict()), "1" if with_head else "0"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise UserError(f"cannot read TensorFlow checkpoint {checkpoint} for the JAX backend: "
                        f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")


def restore_embedding_model(workdir: str) -> tuple[keras.Model, ModelConfig]:
    """Builds the embedding model from workdir/config.json and restores the latest checkpoint.

    The head (C x D, large) is neither built nor read.
    """
    cfg = read_model_config(workdir)
    path = latest_checkpoint(workdir)
    models = build_models(cfg, with_head=False)
    restore_parts(models, path, ["backbone", "neck"])
    return models.embedding_model, cfg


def restore_for_stage(models: LandmarkModels, workdir_from: str) -> dict[str, Any]:
    """Starts a training stage from another workdir's latest checkpoint.

    Restores backbone and neck (their architecture must match), and the head only when head type,
    class count and sub-centres match. The image size may differ: the backbone takes any size.
    Returns {"checkpoint": path, "restored": [part names], "skipped": {part: reason}}.
    """
    source, mine = read_model_config(workdir_from), models.config
    for field in ("backbone", "pooling", "embedding_dim", "neck_activation", "neck"):
        if field == "neck" and (source.neck == "dense") == (mine.neck == "dense"):
            continue  # dense_bn and dense_syncbn hold the same variables
        if getattr(source, field) != getattr(mine, field):
            raise UserError(
                f"cannot start from {workdir_from}: its {field} is {getattr(source, field)!r}, "
                f"this run's is {getattr(mine, field)!r}"
            )
    path = latest_checkpoint(workdir_from)
    parts = ["backbone", "neck"]
    skipped = {}
    reason = _head_mismatch(source, mine) if models.head is not None else "no head built"
    if reason:
        skipped["head"] = reason
    else:
        parts.append("head")
    if not is_npz(path) and keras.backend.backend() != "tensorflow":
        with tempfile.TemporaryDirectory(prefix="landmark_tf_convert_") as tmp:
            converted = os.path.join(tmp, "ckpt.npz")
            convert_to_npz(path, converted, source, with_head="head" in parts)
            restore_parts(models, converted, parts)
    else:
        restore_parts(models, path, parts)
    return {"checkpoint": path, "restored": sorted(parts), "skipped": skipped}


def _head_mismatch(source: ModelConfig, mine: ModelConfig) -> str | None:
    for field in ("head", "num_classes", "subcenters", "head_rank"):
        if field == "subcenters" and mine.head not in ("subcenter_arcface", "dynamic_arcface"):
            continue
        if getattr(source, field) != getattr(mine, field):
            return f"{field} differs: {getattr(source, field)!r} -> {getattr(mine, field)!r}"
    return None


def _restore(checkpoint, path: str, models: LandmarkModels) -> None:
    status = checkpoint.restore(path).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise UserError(f"checkpoint {path} does not match the model config: {e}") from e
    backbones.refresh_normalization(models.backbone)


def _convert_main(argv: list[str]) -> None:
    """`python -m landmark_tf.modeling.model CHECKPOINT OUTPUT CONFIG_JSON WITH_HEAD`."""
    import json

    checkpoint, output, config_json, with_head = argv
    cfg = ModelConfig.from_dict(json.loads(config_json))
    models = build_models(cfg, with_head=with_head == "1")
    parts = ["backbone", "neck"] + (["head"] if with_head == "1" else [])
    restore_parts(models, checkpoint, parts)
    npz_checkpoint.save(output, {p: getattr(models, p).variables for p in parts},
                        {"step": 0, "backend": "tensorflow", "converted_from": checkpoint})


if __name__ == "__main__":
    try:
        _convert_main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
