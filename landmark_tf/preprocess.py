"""The one image preprocessing step shared by training, evaluation, export and embedding.

Every backbone (EfficientNet, ConvNeXt, keras-hub) rescales and normalises inside the model, so
the model input is float32 in 0..255: here we only resize. Square bilinear resize without
keeping the aspect ratio, as the GLR2020 winner did; the same function everywhere keeps train
and serve identical.
"""

from __future__ import annotations

import tensorflow as tf

from landmark_tf.errors import UserError


def resize_for_model(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes an image or a batch of images for the model.

    Args:
      image: uint8 or float [H, W, 3] or [B, H, W, 3], values in 0..255.
      image_size: side S of the square output.

    Returns:
      float32 [S, S, 3] (or [B, S, S, 3]) with values in 0..255.
    """
    if int(image_size) != image_size or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    image = tf.convert_to_tensor(image)
    _check_shape(image)
    resized = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], "bilinear")
    # Bilinear weights are convex, so the range stays 0..255 up to rounding; clip that rounding
    # away so float16/bfloat16 casts downstream never see 255.00002.
    return tf.clip_by_value(resized, 0.0, 255.0)


def _check_shape(image: tf.Tensor) -> None:
    rank = image.shape.rank
    if rank not in (3, 4):
        raise UserError(f"image must be [H, W, 3] or [B, H, W, 3], got shape {image.shape}")
    channels = image.shape[-1]
    if channels is not None and channels != 3:
        raise UserError(f"image must have 3 channels (RGB), got shape {image.shape}")
    if not (image.dtype.is_integer or image.dtype.is_floating):
        raise UserError(f"image must be uint8 or float, got dtype {image.dtype.name}")
