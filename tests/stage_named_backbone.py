"""A two-conv stand-in for EfficientNet whose layers carry EfficientNet's stage names (block5*,
block7*: the taps of --neck=dolg), for tests about the pooling, necks and heads rather than the
backbone: XLA:CPU takes minutes to compile EfficientNet-B0's train step, this compiles in seconds.
Same signature as `backbones.build_backbone`."""

from __future__ import annotations

import keras


def stage_named_backbone(name: str = "efficientnet-b0", weights_path: str | None = None):
    del name, weights_path
    image = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, -1.0, name="rescaling")(image)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="block5a_conv")(x)
    x = keras.layers.BatchNormalization(name="block5a_bn")(x)
    x = keras.layers.Activation("swish", name="block5a_activation")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="block7a_conv")(x)
    x = keras.layers.Activation("swish", name="block7a_activation")(x)
    return keras.Model(image, x, name="tiny_backbone")
