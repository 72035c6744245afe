"""The landmark models, and restoring them from a workdir's checkpoints.

backbone (EfficientNet, ConvNeXt, keras-hub) -> neck (pool -> Dense [-> BN]) -> head (cosine
classifier) for training; backbone -> neck -> L2 normalisation for the product, the embedding
model. Both share layers.
Checkpoints are modeling/checkpoint's format, the same under both Keras backends; workdirs of
earlier versions (tf.train.Checkpoint or npz files) are read through legacy_checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from landmark_tf import workdir as workdir_lib
from landmark_tf.config import TAG_HEADS, ModelConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import (
    backbones,
    checkpoint,
    dolg,
    head_variants,
    hub_backbones,
    legacy_checkpoints,
    superglobal_pooling,
)
from landmark_tf.modeling.pooling import EmbeddingNeck
from landmark_tf.workdir import CHECKPOINT_DIR, CONFIG_FILE, read_model_config  # noqa: F401

PARTS = checkpoint.PARTS


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
    neck: EmbeddingNeck | dolg.DOLGNeck
    head: keras.layers.Layer | None
    embedding_model: keras.Model
    train_model: keras.Model | None
    eval_logits_model: keras.Model | None


def build_models(
    cfg: ModelConfig, pretrained_weights: str | None = None, *, with_head: bool = True,
    class_counts: list[int] | None = None, preset_weights: bool = False,
) -> LandmarkModels:
    """Builds all models for `cfg`. Call under `strategy.scope()` to place the variables.

    pretrained_weights: Keras's no-top ImageNet weights file of a keras.applications backbone
      (`backbones.weights_file_name`: efficientnetbN_notop.h5, convnext_SIZE_notop.h5), local
      or gs://, or None.
    class_counts: train images per class (dataset_info.json), for the dynamic_arcface margins.
    preset_weights: with a `hub:` backbone, load the preset's weights (a training run's start);
      else only its architecture is built (restores read the checkpoint).
    The backbone computes in the global dtype policy; neck, embeddings and logits are float32.
    With `cfg.backbone_mode == "frozen_bn"` the backbone runs in inference mode in every call
    (`backbones.InferenceModeBackbone`); the neck and head follow the call's `training`.
    """
    cfg.validate()
    backbone = _build_backbone(cfg, pretrained_weights, preset_weights)
    neck = _build_neck(cfg)
    if cfg.neck == "dolg":  # two feature maps, same layers (without the unused top conv)
        backbone = dolg.feature_taps(backbone)
    # [None, None, 3], or [S, S, 3] for backbones whose position embeddings fix the size.
    image = keras.Input(shape=backbone.input_shape[1:], dtype="float32", name="image")
    # frozen_bn: the wrapper fixes the backbone's mode; `backbone` stays the object that
    # checkpoints save and restore (the wrapper holds no variables of its own).
    run_backbone = (backbones.InferenceModeBackbone(backbone, name="frozen_bn_backbone")
                    if cfg.backbone_mode == "frozen_bn" else backbone)
    features = neck(run_backbone(image))
    normalized = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")(features)
    embedding_model = keras.Model(image, normalized, name="embedding_model")
    if not with_head:
        return LandmarkModels(cfg, backbone, neck, None, embedding_model, None, None)
    head = head_variants.build_training_head(
        cfg.head, cfg.num_classes, scale=cfg.scale, margin=cfg.margin,
        subcenters=cfg.subcenters, rank=cfg.head_rank, class_counts=class_counts,
        margin_a=cfg.dynamic_margin_a, margin_b=cfg.dynamic_margin_b, name="head",
    )
    # Tag heads train on int32 [B, T] tag ids (padded with -1), landmark heads on int32 [B].
    label = keras.Input(shape=(None,) if cfg.head in TAG_HEADS else (), dtype="int32",
                        name="label")
    train_features = features
    if cfg.npairs_weight > 0:  # adds its loss to train_model.losses in training
        train_features = head_variants.NPairsLoss(cfg.npairs_weight, cfg.npairs_l2_reg,
                                          name="npairs")(features, label)
    train_model = keras.Model(
        {"image": image, "label": label}, head(train_features, label), name="train_model"
    )
    eval_logits_model = keras.Model(image, head(features), name="eval_logits_model")
    return LandmarkModels(
        cfg, backbone, neck, head, embedding_model, train_model, eval_logits_model
    )


def _build_backbone(cfg: ModelConfig, pretrained_weights: str | None, preset_weights: bool):
    if not hub_backbones.is_hub(cfg.backbone):
        return backbones.build_backbone(cfg.backbone, pretrained_weights)
    if pretrained_weights:
        raise UserError(f"--pretrained_weights is for keras.applications backbones; "
                        f"--backbone={cfg.backbone} takes its weights from the preset")
    backbone = hub_backbones.build(cfg.backbone, cfg.image_size, preset_weights)
    if isinstance(backbone.layers[-1], hub_backbones.ClassToken) and cfg.pooling != "gap":
        raise UserError(f"--backbone={cfg.backbone} gives its class token (already pooled, "
                        f"signed values that GeM would clamp): use --pooling=gap")
    return backbone


def _build_neck(cfg: ModelConfig):
    if cfg.neck == "dolg":
        return dolg.DOLGNeck(cfg.pooling, cfg.gem_p, cfg.embedding_dim, cfg.dolg_dilations,
                             cfg.neck_activation, name="neck")
    return EmbeddingNeck(cfg.pooling, cfg.gem_p, cfg.embedding_dim, cfg.neck,
                         cfg.neck_activation, name="neck")


def make_checkpoint(models: LandmarkModels, **extra: Any):
    """The tf.train.Checkpoint layout of earlier versions (backbone=, neck=, head= plus `extra`):
    what their workdirs hold; tests build such workdirs with it to check they still load."""
    import tensorflow as tf

    parts = {"backbone": models.backbone, "neck": models.neck}
    if models.head is not None:
        parts["head"] = models.head
    return tf.train.Checkpoint(**parts, **extra)


def latest_checkpoint(workdir: str) -> checkpoint.Found:
    """The newest checkpoint in workdir/checkpoints, any format; UserError when none."""
    return workdir_lib.latest_checkpoint(workdir)


def restore_parts(models: LandmarkModels, found: checkpoint.Found, parts: list[str]) -> None:
    """Restores `parts` (of backbone, neck, head) from a checkpoint of any format."""
    if found.kind != "keras":
        legacy_checkpoints.restore_parts(models, found, parts, models.config)
        return
    for part in parts:
        checkpoint.load_part(found.path, part, getattr(models, part))
    backbones.refresh_normalization(models.backbone)


def restore_train_state(models: LandmarkModels, found: checkpoint.Found, optimizer,
                        seeds: list) -> int:
    """Resumes a run: every part, the optimizer's variables and the dropout seed states from
    `found`; returns its step. Either backend reads what either wrote."""
    if found.kind != "keras":
        return legacy_checkpoints.restore_train_state(found, models, optimizer, seeds)
    state = checkpoint.read_state(found.path)
    restore_parts(models, found, list(PARTS))
    checkpoint.load_part(found.path, checkpoint.OPTIMIZER, optimizer)
    checkpoint.restore_seeds(found.path, state, seeds)
    return int(state["step"])


def restore_embedding_model(workdir: str, pooling: str = "trained",
                            ) -> tuple[keras.Model, ModelConfig]:
    """Builds the embedding model from workdir/config.json and restores the latest checkpoint.

    pooling: "trained" (the model's own pooling) or "superglobal" (regional GeM + GeM p=4.6 in
    front of the trained neck; modeling/superglobal_pooling.py).
    The head (C x D, large) is neither built nor read.
    """
    if pooling not in superglobal_pooling.POOLINGS:
        raise UserError(f"unknown inference pooling {pooling!r}; expected one of "
                        f"{superglobal_pooling.POOLINGS}")
    cfg = read_model_config(workdir)
    found = latest_checkpoint(workdir)
    models = build_models(cfg, with_head=False)
    restore_parts(models, found, ["backbone", "neck"])
    if pooling == superglobal_pooling.NAME:
        check_superglobal_pooling(models)
        return superglobal_pooling.build_embedding_model(models.backbone, models.neck), cfg
    return models.embedding_model, cfg


def check_superglobal_pooling(models: LandmarkModels) -> None:
    """UserError unless SuperGlobal's pooling can replace the model's: it pools a backbone's
    map of any size in front of the Dense of a pooling neck (not DOLG's two-branch neck, nor
    a fixed-size token backbone)."""
    cfg = models.config
    if not isinstance(models.neck, EmbeddingNeck) or models.backbone.input_shape[1]:
        raise UserError(f"--inference_pooling={superglobal_pooling.NAME} replaces the pooling "
                        "of a --neck=dense|dense_bn|dense_syncbn model on a convolutional "
                        f"backbone, not --neck={cfg.neck} on --backbone={cfg.backbone}")


def restore_for_stage(models: LandmarkModels, workdir_from: str) -> dict[str, Any]:
    """Starts a training stage from another workdir's latest checkpoint.

    Restores backbone and neck (their architecture must match), and the head only when head type,
    class count and sub-centres match. The image size may differ: the backbone takes any size.
    Returns {"checkpoint": path, "restored": [part names], "skipped": {part: reason}}.
    The caller checks that a kept head's classes mean the same landmarks (label maps).
    """
    source, mine = read_model_config(workdir_from), models.config
    same_variables = {"dense_bn", "dense_syncbn"}  # the two hold the same variables
    for field in ("backbone", "pooling", "embedding_dim", "neck_activation", "neck",
                  "dolg_dilations"):
        if field == "neck" and {source.neck, mine.neck} <= same_variables:
            continue
        if field == "dolg_dilations" and mine.neck != "dolg":
            continue
        if getattr(source, field) != getattr(mine, field):
            raise UserError(
                f"cannot start from {workdir_from}: its {field} is {getattr(source, field)!r}, "
                f"this run's is {getattr(mine, field)!r}"
            )
    found = latest_checkpoint(workdir_from)
    parts = ["backbone", "neck"]
    skipped = {}
    reason = _head_mismatch(source, mine) if models.head is not None else "no head built"
    if reason:
        skipped["head"] = reason
    else:
        parts.append("head")
    if found.kind == "tensorflow":  # a legacy checkpoint holds the source's model
        legacy_checkpoints.restore_parts(models, found, parts, source)
    else:
        restore_parts(models, found, parts)
    return {"checkpoint": found.path, "restored": sorted(parts), "skipped": skipped}


def _head_mismatch(source: ModelConfig, mine: ModelConfig) -> str | None:
    for field in ("head", "num_classes", "subcenters", "head_rank"):
        if field == "subcenters" and mine.head not in ("subcenter_arcface", "dynamic_arcface"):
            continue
        if getattr(source, field) != getattr(mine, field):
            return f"{field} differs: {getattr(source, field)!r} -> {getattr(mine, field)!r}"
    return None
