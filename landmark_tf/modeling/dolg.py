"""DOLG neck: local and global branches fused orthogonally, as in the GLR2021 1st place.

Follows Christoph Henkel's released model `models/ch_mdl_dolg_efficientnet.py` (repository
ChristofHenkel/kaggle-landmark-2021-1st-place, commit 1ddd3f676431a7639f0b8a99606235548a0983d7;
configs/cfg_ch_dolg_b{5,6,7}_step*.py), itself after DOLG (Yang et al., ICCV 2021):

  local map  [B, h16, w16, C4]  (EfficientNet stage 5 output, stride 16: timm feature_info[-2])
    -> multi-atrous: three 3x3 convs, 512 filters each, dilations d1 d2 d3 ('same' padding,
       bias), concatenated -> 1x1 conv to 1024 -> ReLU
    -> spatial attention: 1x1 conv 1024 -> BatchNorm -> (a) L2-normalised over channels,
       (b) ReLU -> 1x1 conv to 1 -> softplus = attention a; local features fl = a * (a)
  deep map   [B, h32, w32, C7]  (stage 7 output, stride 32, before the 1280-wide head conv:
                                 timm feature_info[-1])
    -> 1x1 conv to 1024 -> BatchNorm(eps 1e-3) -> SiLU -> GeM (p trainable, 3) = fg [B, 1024]
  orthogonal fusion: fl_orth = fl - (fl . fg / |fg|) fg at each position; [fl_orth, fg]
    concatenated (fg repeated over positions) and average-pooled -> [B, 2048]
  neck: Dense(2048 -> D) -> BatchNorm -> PReLU (one shared slope, 0.25 at init).

Dilations: the B5 config uses (6, 12, 18), the B6/B7 configs (3, 6, 9) (ModelConfig default).
Differences from the released code, and why:
- The average pool of the fused map is computed as [mean_hw(fl) - (mean_hw(fl) . fg / |fg|) fg,
  fg]: the projection is linear in fl, so this is the same value without materialising a
  [B, h, w, 2048] tensor.
- The projection divides by |fg| as the released code does (the DOLG paper divides by |fg|^2,
  which makes fl_orth exactly orthogonal to fg); we follow the code that won. |fg| is floored
  at 1e-12 (GeM's clamp already keeps it above 0).
- The convolutions compute in the global dtype policy (bfloat16 on TPU): they are this neck's
  FLOPs. Normalisation, attention, pooling and the neck's Dense are float32.
- The neck's Dense activation is `activation` ("linear" in the released code).
BatchNorm epsilons are PyTorch's: 1e-5, except 1e-3 in the global branch as released.

Inputs: [local, deep] feature maps in any float dtype. Output: float32 [B, embedding_dim],
not normalised (the embedding model L2-normalises it; cosine heads normalise it themselves).
"""

from __future__ import annotations

import keras
from keras import ops

from landmark_tf.config import NECK_ACTIVATIONS, POOLINGS
from landmark_tf.errors import UserError
from landmark_tf.modeling.pooling import GeM

ATROUS_FILTERS = 512  # per dilation, as released
BRANCH_DIM = 1024  # feature_dim_l_g of the released code: local and global branch width


def feature_taps(backbone: keras.Model, mid_stage: str = "block5",
                 deep_stage: str = "block7") -> keras.Model:
    """The same layers as `backbone` with two outputs: the last layer of `mid_stage` (stride 16
    in EfficientNet) and of `deep_stage` (stride 32, before the head conv), by Keras's layer
    names. The top conv is not part of the result (DOLG's global branch replaces it).

    Input: float32 [B, H, W, 3] 0..255. Outputs: [B, H/16, W/16, C5], [B, H/32, W/32, C7].
    """
    taps = {}
    for stage in (mid_stage, deep_stage):
        names = [la.name for la in backbone.layers if la.name.startswith(stage)]
        if not names:
            raise UserError(f"DOLG needs an EfficientNet backbone: {backbone.name} has no "
                            f"'{stage}' layers")
        taps[names[-1]] = None

    def record(layer, *args, **kwargs):  # the tensors of this new graph, not the backbone's
        out = layer(*args, **kwargs)
        if layer.name in taps:
            taps[layer.name] = out
        return out

    # clone_model with the same layer objects (variables shared) re-runs the graph: a layer's
    # `.output` would be the tensor of its first call, not connected to these inputs.
    clone = keras.models.clone_model(backbone, clone_function=lambda layer: layer,
                                     call_function=record)
    return keras.Model(clone.input, list(taps.values()), name=f"{backbone.name}_dolg_taps")


def _compute_policy() -> str:
    return keras.config.dtype_policy().name


@keras.saving.register_keras_serializable(package="landmark_tf")
class DOLGNeck(keras.layers.Layer):
    """[local map, deep map] -> float32 [B, embedding_dim] (see the module docstring)."""

    def __init__(self, pooling: str = "gem", gem_p: float = 3.0, embedding_dim: int = 512,
                 dilations=(3, 6, 9), activation: str = "linear", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if activation not in NECK_ACTIVATIONS:
            raise UserError(f"unknown neck activation {activation!r}; expected one of "
                            f"{NECK_ACTIVATIONS}")
        if len(dilations) != 3 or min(dilations) < 1:
            raise UserError(f"DOLG dilations must be 3 whole numbers >= 1, got {dilations}")
        self.pooling, self.gem_p = pooling, float(gem_p)
        self.embedding_dim, self.activation = int(embedding_dim), activation
        self.dilations = tuple(int(d) for d in dilations)
        conv = _compute_policy()
        self.atrous = [keras.layers.Conv2D(ATROUS_FILTERS, 3, padding="same", dilation_rate=d,
                                           dtype=conv, name=f"atrous_{d}")
                       for d in self.dilations]
        self.atrous_merge = keras.layers.Conv2D(BRANCH_DIM, 1, activation="relu", dtype=conv,
                                                name="atrous_merge")
        self.attention_conv = keras.layers.Conv2D(BRANCH_DIM, 1, dtype=conv,
                                                  name="attention_conv")
        self.attention_bn = keras.layers.BatchNormalization(epsilon=1e-5, dtype=conv,
                                                            name="attention_bn")
        self.attention_score = keras.layers.Conv2D(1, 1, dtype="float32",
                                                   name="attention_score")
        self.global_conv = keras.layers.Conv2D(BRANCH_DIM, 1, dtype=conv, name="global_conv")
        self.global_bn = keras.layers.BatchNormalization(epsilon=1e-3, dtype=conv,
                                                         name="global_bn")
        self.pool = (GeM(p=gem_p, dtype="float32", name="gem") if pooling == "gem" else
                     keras.layers.GlobalAveragePooling2D(dtype="float32", name="gap"))
        self.dense = keras.layers.Dense(embedding_dim, activation=activation, dtype="float32",
                                        name="dense")
        self.bn = keras.layers.BatchNormalization(epsilon=1e-5, dtype="float32", name="bn")
        self.prelu = keras.layers.PReLU(keras.initializers.Constant(0.25), shared_axes=[1],
                                        dtype="float32", name="prelu")

    def build(self, input_shape):
        local_shape, deep_shape = input_shape
        for layer in self.atrous:
            layer.build(local_shape)
        self.atrous_merge.build((*local_shape[:3], ATROUS_FILTERS * 3))
        branch = (*local_shape[:3], BRANCH_DIM)
        self.attention_conv.build(branch)
        self.attention_bn.build(branch)
        self.attention_score.build(branch)
        self.global_conv.build(deep_shape)
        self.global_bn.build((*deep_shape[:3], BRANCH_DIM))
        self.pool.build((*deep_shape[:3], BRANCH_DIM))
        self.dense.build((local_shape[0], 2 * BRANCH_DIM))
        self.bn.build((local_shape[0], self.embedding_dim))
        self.prelu.build((local_shape[0], self.embedding_dim))

    def local_features(self, local_map, training=None):
        """[B, h, w, C] -> (fl float32 [B, h, w, 1024], attention float32 [B, h, w, 1])."""
        x = ops.concatenate([conv(local_map) for conv in self.atrous], axis=-1)
        x = self.attention_bn(self.attention_conv(self.atrous_merge(x)), training=training)
        x = ops.cast(x, "float32")
        unit = x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)
        attention = ops.softplus(self.attention_score(ops.relu(x)))
        return attention * unit, attention

    def global_features(self, deep_map, training=None):
        """[B, h, w, C] -> fg float32 [B, 1024]."""
        x = self.global_bn(self.global_conv(deep_map), training=training)
        return self.pool(ops.silu(ops.cast(x, "float32")))

    def call(self, inputs, training=None):
        local_map, deep_map = inputs
        fl, _ = self.local_features(local_map, training)
        fg = self.global_features(deep_map, training)
        fused = orthogonal_fusion_pooled(fl, fg)
        x = self.bn(self.dense(fused), training=training)
        return self.prelu(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.embedding_dim)

    def get_config(self):
        config = super().get_config()
        config.update(pooling=self.pooling, gem_p=self.gem_p, embedding_dim=self.embedding_dim,
                      dilations=list(self.dilations), activation=self.activation)
        return config


def orthogonal_fusion_pooled(fl, fg):
    """Average pool of the released OrthogonalFusion's output, [B, 2 * C] float32.

    fl: float32 [B, h, w, C] local features; fg: float32 [B, C] global vector. Per position the
    released code keeps fl - (fl . fg / |fg|) fg and appends fg; both are linear in fl, so their
    mean over positions is mean(fl) - (mean(fl) . fg / |fg|) fg, and fg.
    """
    mean_local = ops.mean(fl, axis=(1, 2))
    norm = ops.maximum(ops.norm(fg, axis=-1, keepdims=True), 1e-12)
    projection = ops.sum(mean_local * fg, axis=-1, keepdims=True) / norm * fg
    return ops.concatenate([mean_local - projection, fg], axis=-1)
