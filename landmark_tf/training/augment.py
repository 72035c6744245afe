"""Decoding and augmentation of training images, with stateless (seeded) randomness.

Per example (needs the JPEG): parse, decode (or decode a random crop: "crop", a random-resized
crop covering 25-100% of the area), resize with `preprocess.resize_for_model`, and the draws of
"color" and "flip". Per batch (vectorised): "color" (brightness +-32, contrast x0.8-1.25, per
image); "flip" (horizontal, p = 0.5; the default and the GLR2020 winner's only augmentation) is
applied by the train step on the accelerator. All draws are functions of the seed passed in.
"""

from __future__ import annotations

import tensorflow as tf

from landmark_tf import preprocess
from landmark_tf.data import records

_FIELDS = ("image/encoded", "image/class/label", "image/is_clean")
_SPEC = {k: records.FEATURE_SPEC[k] for k in _FIELDS}


def fold(seed: tf.Tensor, value) -> tf.Tensor:
    """A new stateless seed int64[2] from `seed` and an integer."""
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))


def decode_example(
    serialized: tf.Tensor, image_size: int, crop: bool = False, seed: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Serialized example -> (float32[S, S, 3] 0..255, int32 label, int32 is_clean)."""
    ex = tf.io.parse_single_example(serialized, _SPEC)
    encoded = ex["image/encoded"]
    if crop:
        box, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.io.extract_jpeg_shape(encoded), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed, min_object_covered=0.25, aspect_ratio_range=(0.75, 1.33),
            area_range=(0.25, 1.0), use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([box[0], box[1], size[0], size[1]])
        image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
    else:
        image = records.decode_image(encoded)
    image = preprocess.resize_for_model(image, image_size)
    label = tf.cast(ex["image/class/label"], tf.int32)
    return image, label, tf.cast(ex["image/is_clean"], tf.int32)


def example_draws(seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """One example's random draws from its own seed: "flip" (bool, p = 0.5), "delta"
    (brightness, float32 in +-32) and "factor" (contrast, float32 in 0.8-1.25).

    Per example, not per batch: the draws then do not depend on how a global batch is cut into
    per-replica or per-host batches, so both backends and any device count see the same data.
    """
    return {"flip": tf.random.stateless_uniform([], seed=fold(seed, 1)) < 0.5,
            "delta": tf.random.stateless_uniform([], fold(seed, 2), -32.0, 32.0),
            "factor": tf.random.stateless_uniform([], fold(seed, 3), 0.8, 1.25)}


def color_batch(images: tf.Tensor, delta: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """float32[B, S, S, 3] 0..255 -> the same with brightness delta[B] and contrast factor[B]
    (example_draws), vectorised over the batch."""
    delta, factor = delta[:, None, None, None], factor[:, None, None, None]
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((images - mean) * factor + mean + delta, 0.0, 255.0)
