"""SuperGlobal's training-free pooling at inference (Shao et al., "Global Features are All You Need
for Image Retrieval and Reranking", ICCV 2023): regional GeM, GeM+ and Scale-GeM.

Follows ShihaoShao-GH/SuperGlobal at commit 86946964b907e6f28a7264add2c15640fae30009
(modules/coarse_retrieval/{rgem,gemp,sgem}.py and model/resnet.py `_forward_singlescale`/`forward`):
  regional GeM  x <- 0.5 * LPPool_{p=2.5, 5x5, stride 1}(ReflectionPad2d(2)(x) / 25^(1/p)) + 0.5 x,
                i.e. half the 5x5 power mean of each neighbourhood, half the map itself;
  GeM+          GeM with p fixed at 4.6 (the trained p, or GAP, replaced at inference);
  Scale-GeM     the image at scales 0.7071, 1, 1.4142; per scale the L2-normalised descriptor;
                their elementwise max (sgem with infinity=True), L2-normalised again.
Here: backbone -> regional GeM -> GeM+ -> the trained neck (Dense [+ BN]) -> L2, per scale.

Deviations, each with its reason:
  - The power mean clamps the map at `eps` first (as our GeM does): the released code runs on
    post-ReLU ResNet maps, EfficientNet's last activation is swish (down to -0.28), and a
    negative value to the power 2.5 is NaN. The 0.5 x half keeps the map as it is.
  - Reflection padding is done by index arithmetic that reflects again and again, so maps
    smaller than the window (2x2 or 1x1, from small images or the 0.7071 scale) work; PyTorch's
    ReflectionPad2d raises there (pad must be smaller than the side). Where the side is at least 3
    the two agree exactly.
  - Upstream L2-normalises the pooled vector before its (linear) head; our neck was trained on
    the raw pooled vector (a Dense with bias and activation), so it gets the raw vector.
  - Scales resize to squares of round(image_size * s), our export's multi-scale convention,
    instead of the image's own aspect ratio.
"""

from __future__ import annotations

import keras
from keras import ops

from landmark_tf.errors import UserError
from landmark_tf.modeling.pooling import GeM

NAME = "superglobal"
POOLINGS = ("trained", NAME)  # inference pooling: the model's own, or SuperGlobal's
SCALES = (0.7071, 1.0, 1.4142)
GEM_P = 4.6
REGIONAL_P = 2.5
REGIONAL_SIZE = 5
SCALE_COMBINES = ("mean", "max")


@keras.saving.register_keras_serializable(package="landmark_tf")
class RegionalGeM(keras.layers.Layer):
    """0.5 * (size x size power mean of clamp(x, eps), reflect-padded, stride 1) + 0.5 * x.

    Input: [B, H, W, F] any float dtype, any H, W >= 1. Output: float32 [B, H, W, F].
    """

    def __init__(self, p: float = REGIONAL_P, size: int = REGIONAL_SIZE, eps: float = 1e-6,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if p <= 0 or size < 1 or size % 2 == 0:
            raise UserError(f"regional GeM needs p > 0 and an odd window, got p={p}, size={size}")
        self.p, self.size, self.eps = float(p), int(size), float(eps)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        clamped = ops.maximum(x, self.eps)
        # Per-channel peak: the power mean of x / peak lies in (0, 1], no overflow of x ** p.
        peak = ops.max(clamped, axis=(1, 2), keepdims=True)
        powered = ops.power(clamped / peak, self.p)
        pad = (self.size - 1) // 2
        padded = _reflect(_reflect(powered, pad, axis=1), pad, axis=2)
        window = ops.average_pool(padded, self.size, strides=1, padding="valid")
        regional = peak * ops.power(ops.maximum(window, 1e-30), 1.0 / self.p)
        return 0.5 * regional + 0.5 * x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(p=self.p, size=self.size, eps=self.eps)
        return config


def _reflect(x, pad: int, axis: int):
    """Reflection padding (edge not repeated) by `pad` on both sides of `axis`, reflecting again
    where `pad` exceeds the side, so any side >= 1 works (side 1 repeats its only row)."""
    if pad == 0:
        return x
    n = ops.shape(x)[axis]
    period = ops.maximum(2 * (n - 1), 1)
    idx = ops.mod(ops.arange(-pad, n + pad, dtype="int32"), period)
    idx = ops.where(idx >= n, period - idx, idx)
    return ops.take(x, idx, axis=axis)


def build_embedding_model(backbone: keras.Model, neck) -> keras.Model:
    """float32 [B, H, W, 3] 0..255 -> float32 [B, D] unit rows: backbone -> regional GeM -> GeM+
    -> the neck's Dense (and BatchNorm, in inference) -> L2. Shares the restored layers."""
    image = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    features = RegionalGeM(name="regional_gem")(backbone(image, training=False))
    pooled = GeM(p=GEM_P, trainable_p=False, name="gem_plus")(features)
    x = neck.dense(pooled)
    if neck.bn is not None:
        x = neck.bn(x, training=False)
    normalized = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")(x)
    return keras.Model(image, normalized, name="superglobal_embedding_model")


def scales_for(inference_pooling: str, given: list[float] | None) -> list[float] | None:
    """The scales a user gave, else SuperGlobal's three with its pooling (None: the default)."""
    if given is None and inference_pooling == NAME:
        return list(SCALES)
    return given


def combine_scales(parts: list, how: str):
    """Per-scale descriptors [B, D] -> [B, D] (not normalised): `mean` of the descriptors as
    they are, or `max`, SuperGlobal's Scale-GeM: elementwise max of the L2-normalised ones."""
    if how not in SCALE_COMBINES:
        raise UserError(f"unknown scale combination {how!r}; expected one of {SCALE_COMBINES}")
    if len(parts) == 1:
        return parts[0]
    if how == "mean":
        return sum(parts) / float(len(parts))
    unit = [p / ops.maximum(ops.norm(p, axis=-1, keepdims=True), 1e-12) for p in parts]
    return ops.max(ops.stack(unit, axis=0), axis=0)
