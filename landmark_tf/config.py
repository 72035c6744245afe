"""Config objects the CLIs build from flags and the library takes; serialised into config.json.

Library code never reads flags: it takes these dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from landmark_tf.errors import UserError

EFFICIENTNETS = tuple(f"efficientnet-b{i}" for i in range(8))
# keras.applications ConvNeXt (Liu et al. 2022): LayerNorm, no BatchNorm (modeling/backbones.py).
CONVNEXTS = tuple(f"convnext-{size}" for size in ("tiny", "small", "base", "large", "xlarge"))
BACKBONES = EFFICIENTNETS + CONVNEXTS
# --backbone=hub:SOURCE: a keras-hub backbone (modeling/hub_backbones.py) from a preset folder
# (local or gs://), a hub handle (online only) or one of the tiny random-init test configs.
HUB_PREFIX = "hub:"
POOLINGS = ("gap", "gem")
# Pool -> Dense(embedding_dim, neck_activation) -> then: BatchNorm (dense_bn), BatchNorm with
# statistics over all replicas (dense_syncbn), or nothing (dense: the GLR2020 winner's neck).
# dolg: the GLR2021 winner's DOLG (modeling/dolg.py): a multi-atrous, attention-weighted local
# branch on EfficientNet's stride-16 map fused orthogonally with the pooled global branch,
# then Dense -> BatchNorm -> PReLU.
NECKS = ("dense_bn", "dense_syncbn", "dense", "dolg")
NECK_ACTIVATIONS = ("linear", "swish", "relu", "gelu")
# How the backbone runs inside a training step. train: BatchNorm on batch statistics (moving
# averages updated), drop-connect on. frozen_bn: inference mode (BatchNorm on its stored moving
# statistics, which stay as they are; gamma/beta still train; no drop-connect), as the GLR2020
# winner's released step `cosine = model(images)` without training= ran in tf.keras 2.
BACKBONE_MODES = ("train", "frozen_bn")
# Heads over title tags instead of landmarks (tag pretraining, training/tag_targets.py): a
# softmax over the tag vocabulary; multilabel sums the cross-entropy over an image's tags (WT-Set),
# label_weighted weights each tag's cross-entropy (LW-Set).
TAG_HEADS = ("multilabel", "label_weighted")
HEADS = ("cosface", "arcface", "adacos", "subcenter_arcface", "softmax", "adacos_per_batch",
         "dynamic_arcface", *TAG_HEADS)


def auto_scale(num_classes: int) -> float:
    """The fixed AdaCos logit scale sqrt(2) * ln(C - 1) (Zhang et al. 2019), used by the GLR2020
    winner; C - 1 is floored at 2 so that tiny test class counts still give a positive scale."""
    return math.sqrt(2.0) * math.log(max(num_classes - 1, 2))


@dataclasses.dataclass
class ModelConfig:
    """Architecture: backbone -> pooling -> neck (Dense(embedding_dim) [-> BN]) -> cosine head.

    `scale=None` means "auto": the fixed AdaCos scale sqrt(2) * ln(C - 1). `neck` (NECKS) and
    `neck_activation` (NECK_ACTIVATIONS, the Dense's activation) choose the embedding layer.
    Head variants: `head="dynamic_arcface"` takes per-class margins
    dynamic_margin_a * minmax(n_c^(-1/4)) + dynamic_margin_b from the train counts;
    `head_rank` > 0 factorises the class matrix into D x r and r x C; `npairs_weight` > 0 adds
    the n-pairs loss of the embeddings (with `npairs_l2_reg`) to the head's cross-entropy.
    `backbone_mode` (BACKBONE_MODES): "frozen_bn" runs the backbone in inference mode inside
    training steps (the GLR2020 winner's release); "train", the default, as workdirs written
    before the field existed trained.
    `neck="dolg"` (GLR2021 1st place) takes the dilations of its multi-atrous local branch from
    `dolg_dilations`; `pooling` is its global branch's pooling.
    """

    backbone: str = "efficientnet-b0"
    image_size: int = 512
    pooling: str = "gap"
    gem_p: float = 3.0
    embedding_dim: int = 512
    head: str = "cosface"
    scale: float | None = None
    margin: float = 0.15
    subcenters: int = 3
    num_classes: int = 0
    neck: str = "dense_bn"
    neck_activation: str = "linear"
    head_rank: int = 0
    dynamic_margin_a: float = 0.45
    dynamic_margin_b: float = 0.05
    npairs_weight: float = 0.0
    npairs_l2_reg: float = 0.002
    backbone_mode: str = "train"
    dolg_dilations: list[int] = dataclasses.field(default_factory=lambda: [3, 6, 9])

    def effective_scale(self) -> float:
        """The logit scale actually used; auto is sqrt(2) * ln(C - 1) (AdaCos fixed scale)."""
        if self.scale is not None:
            return float(self.scale)
        return auto_scale(self.num_classes)

    def validate(self) -> ModelConfig:
        """Raises UserError naming the first bad field and its value; returns self."""
        checks = [
            ("backbone", self.backbone in BACKBONES or (
                self.backbone.startswith(HUB_PREFIX) and len(self.backbone) > len(HUB_PREFIX)),
             f"one of {BACKBONES} or hub:SOURCE (a keras-hub preset)"),
            ("pooling", self.pooling in POOLINGS, f"one of {POOLINGS}"),
            ("head", self.head in HEADS, f"one of {HEADS}"),
            ("neck", self.neck in NECKS, f"one of {NECKS}"),
            ("neck_activation", self.neck_activation in NECK_ACTIVATIONS,
             f"one of {NECK_ACTIVATIONS}"),
            ("image_size", self.image_size >= 32, ">= 32 (the backbones' minimum)"),
            ("embedding_dim", self.embedding_dim > 0, "> 0"),
            ("gem_p", self.gem_p > 0, "> 0"),
            ("scale", self.scale is None or self.scale > 0, "> 0, or None for auto"),
            ("margin", 0 <= self.margin < math.pi / 2, "in [0, pi/2)"),
            ("subcenters", self.subcenters >= 1, ">= 1"),
            ("num_classes", self.num_classes >= 2, ">= 2"),
            ("head_rank", self.head_rank >= 0, ">= 0 (0 = full class matrix)"),
            ("head_rank", self.head_rank == 0 or self.head not in ("adacos", "softmax",
                                                                     *TAG_HEADS),
             "0 with the adacos, softmax and tag heads"),
            ("npairs_weight", self.npairs_weight == 0 or self.head not in TAG_HEADS,
             "0 with the tag heads (the n-pairs loss needs landmark labels)"),
            ("dynamic_margin_a", self.dynamic_margin_a >= 0, ">= 0"),
            ("dynamic_margin_b", 0 <= self.dynamic_margin_b < math.pi / 2, "in [0, pi/2)"),
            ("npairs_weight", self.npairs_weight >= 0, ">= 0"),
            ("npairs_l2_reg", self.npairs_l2_reg >= 0, ">= 0"),
            ("backbone_mode", self.backbone_mode in BACKBONE_MODES, f"one of {BACKBONE_MODES}"),
            ("dolg_dilations", len(self.dolg_dilations) == 3 and all(
                isinstance(d, int) and d >= 1 for d in self.dolg_dilations),
             "3 whole numbers >= 1"),
            ("neck", self.neck != "dolg" or self.backbone in EFFICIENTNETS,
             "not dolg with this backbone (DOLG taps EfficientNet's stage 5 and 7 outputs)"),
            ("backbone_mode", self.backbone_mode != "frozen_bn" or self.backbone not in CONVNEXTS,
             "train with ConvNeXt (frozen_bn would change nothing: it has LayerNorms, no "
             "BatchNorm statistics to freeze, and keras.applications builds it without drop "
             "path)"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise UserError(f"model config: {field} must be {expected}, got "
                                f"{getattr(self, field)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


STRATEGIES = ("auto", "tpu", "mirrored", "multi_worker", "cpu")
BACKENDS = ("auto", "tensorflow", "jax")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
JIT_MODES = ("auto", "on", "off")
# inverse_time: lr / (1 + lr_decay * step), the `decay` argument of Keras 2 optimizers.
SCHEDULES = ("constant", "cosine", "inverse_time")
SAMPLINGS = ("uniform", "class_balanced", "log")
# log: 1 / ln(1 + n); log_unshifted: 1 / ln(n) (the GLR2020 winner's clean stage; needs n >= 2).
CLASS_WEIGHTINGS = ("none", "inverse", "inverse_sqrt", "log", "log_unshifted")
AUGMENTATIONS = ("flip", "crop", "color")
# Which examples a BatchNormalization's batch statistics cover on several replicas (see
# training/batch_stats.py): each replica's own micro-batch, or all replicas' together.
BN_STATISTICS = ("replica", "global")
# TrainConfig keys that may change between runs into one workdir: they do not change the math.
# The backend is one of them: both write the same checkpoints and compute the same steps.
RESUME_SAFE = frozenset(
    {"strategy", "tpu", "steps_per_execution", "checkpoint_every", "keep_checkpoints",
     "eval_every", "jit_compile", "workdir", "backend"}
)


@dataclasses.dataclass
class TrainConfig:
    """Everything `landmark_tf.training.train.train` needs besides the ModelConfig.

    `batch_size` is global: examples per optimizer step over all replicas and accumulation
    micro-steps. `train_steps` counts optimizer steps; 0 means "derive from `epochs`", and with
    `epochs` also 0 the run trains nothing: it writes a checkpoint of the initialisation (random,
    `pretrained_weights` or `init_from`) at step 0, the untrained baseline that exports like any
    run.
    `grad_accum_steps=0` (`--grad_accum_steps=auto`, JAX only) takes the fewest micro-batches
    whose compiled step fits the device's memory (training/jax_memory.plan); the run records
    the count it chose.
    `eval_every=0` evaluates once per epoch. Keys in RESUME_SAFE may change between runs into the
    same workdir (they do not change what is computed); any other difference is a conflict.
    """

    data_dir: str = ""
    workdir: str = ""
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 64
    train_steps: int = 0
    epochs: float = 0.0
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn_momentum: float = 0.99
    bn_statistics: str = "replica"
    schedule: str = "cosine"
    warmup_steps: int = 0
    lr_decay: float = 0.0
    grad_accum_steps: int = 1
    sampling: str = "uniform"
    class_weighting: str = "none"
    not_clean_weight: float = 1.0
    augment: list[str] = dataclasses.field(default_factory=lambda: ["flip"])
    shuffle_buffer: int = 4096
    # K > 0: per-replica batches of P classes x K images (input_pipeline, sampling.class_groups)
    # so that pair losses (n-pairs) see positives; 0: i.i.d. examples.
    batch_classes: int = 0
    seed: int = 0
    strategy: str = "auto"
    tpu: str = ""
    # Keras backend; config.json stores the one that ran ("auto" is resolved first).
    backend: str = "auto"
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    steps_per_execution: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 0
    init_from: str = ""
    pretrained_weights: str = ""

    def validate(self) -> TrainConfig:
        """Raises UserError naming the first bad setting (as its flag); returns self."""
        choices = [("schedule", SCHEDULES), ("sampling", SAMPLINGS),
                   ("class_weighting", CLASS_WEIGHTINGS), ("strategy", STRATEGIES),
                   ("backend", BACKENDS), ("bn_statistics", BN_STATISTICS),
                   ("mixed_precision", PRECISIONS), ("jit_compile", JIT_MODES)]
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name}={getattr(self, name)}: expected one of {allowed}")
        bad_augment = sorted(set(self.augment) - set(AUGMENTATIONS))
        checks = [
            (self.data_dir, "--data_dir is required"),
            (self.workdir, "--workdir is required"),
            (self.train_steps >= 0, f"--train_steps={self.train_steps}: must be >= 0"),
            (self.epochs >= 0, f"--epochs={self.epochs}: must be >= 0"),
            (not (self.train_steps > 0 and self.epochs > 0), "give --train_steps or --epochs, "
             "not both"),
            (self.batch_size > 0, f"--batch_size={self.batch_size}: must be > 0"),
            (self.grad_accum_steps >= 0, "--grad_accum_steps must be > 0 (or auto)"),
            # 0 is allowed: only BatchNorm moving statistics (and the dynamic AdaCos scale)
            # change, a statistics-recalibration run (and the frozen-BN tests' reference).
            (self.learning_rate >= 0, "--learning_rate must be >= 0"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight_decay must be >= 0"),
            (0 <= self.bn_momentum < 1, "--bn_momentum must be in [0, 1)"),
            (self.warmup_steps >= 0, "--warmup_steps must be >= 0"),
            (self.lr_decay >= 0, "--lr_decay must be >= 0"),
            (self.schedule == "inverse_time" or self.lr_decay == 0,
             f"--lr_decay={self.lr_decay} only applies to --schedule=inverse_time"),
            (self.not_clean_weight >= 0, "--not_clean_weight must be >= 0"),
            (not bad_augment, f"--augment: unknown {bad_augment}; expected {AUGMENTATIONS}"),
            (self.shuffle_buffer > 0, "--shuffle_buffer must be > 0"),
            (self.batch_classes >= 0, f"--batch_classes={self.batch_classes}: must be >= 0"),
            (self.batch_classes == 0 or self.batch_size % self.batch_classes == 0,
             f"--batch_classes={self.batch_classes}: --batch_size={self.batch_size} must be a "
             "multiple of it (per replica and micro-step too)"),
            (self.steps_per_execution > 0, "--steps_per_execution must be > 0"),
            (self.checkpoint_every > 0, "--checkpoint_every must be > 0"),
            (self.keep_checkpoints > 0, "--keep_checkpoints must be > 0"),
            (self.eval_every >= 0, "--eval_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
