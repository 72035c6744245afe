"""The serving `tf.Module` behind every SavedModel we write (single exports and ensembles).

Signatures (the Kaggle GLR2020 contract plus two for fast extraction):
  serving_default  input_image  uint8[H, W, 3]              -> global_descriptor  float32[D]
  serving_batch    input_images uint8[B, H, W, 3] one size   -> global_descriptors float32[B, D]
  serving_padded   input_images uint8[B, H, W, 3] zero-padded,
                   image_sizes  int32[B, 2] (height, width)  -> global_descriptors float32[B, D]

`serving_padded` exists so a batch of images of different sizes gives, image for image, exactly
what `serving_default` gives on each original image: every image is cropped back to its true size
and resized on its own, with the same `resize_for_model` the evaluation pipeline uses.

A module combines branches: each branch maps uint8 images to a [B, D_i] descriptor; the module
L2-normalises each, multiplies it by the branch weight, concatenates and L2-normalises the whole.
A single export is one branch of weight 1 (then the formula is just L2 normalisation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import keras
import tensorflow as tf

from landmark_tf.modeling.superglobal_pooling import combine_scales
from landmark_tf.preprocess import resize_for_model
from landmark_tf.serving import portable_savedmodel

DEFAULT = "serving_default"
BATCH = "serving_batch"
PADDED = "serving_padded"
SIGNATURES = (DEFAULT, BATCH, PADDED)
INPUT_IMAGE = "input_image"
INPUT_IMAGES = "input_images"
IMAGE_SIZES = "image_sizes"
OUTPUT = "global_descriptor"
OUTPUTS = "global_descriptors"

_IMAGE = tf.TensorSpec([None, None, 3], tf.uint8, name=INPUT_IMAGE)
_IMAGES = tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_IMAGES)
_SIZES = tf.TensorSpec([None, 2], tf.int32, name=IMAGE_SIZES)


def crop_and_resize(images: tf.Tensor, sizes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Crops each padded image to its true size, then `resize_for_model`s it on its own.

    Args:
      images: uint8 [B, H, W, 3], image i valid in [:sizes[i, 0], :sizes[i, 1]].
      sizes: int32 [B, 2] (height, width).
      image_size: output side S.

    Returns:
      float32 [B, S, S, 3] in 0..255.
    """

    def one(args):
        image, hw = args
        return resize_for_model(image[: hw[0], : hw[1]], image_size)

    spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)
    return tf.map_fn(one, (images, sizes), fn_output_signature=spec)


class KerasBranch(tf.Module):
    """A Keras embedding model at one or more square input sizes (multi-scale: `combine` the
    per-scale descriptors, "mean" or SuperGlobal's "max" of the normalised ones).

    Only the model's variables are tracked (as `keras.export.ExportArchive` does), so the
    SavedModel holds weights and traced graphs but no Keras objects: it loads with plain TF.
    """

    def __init__(self, model: keras.Model, sizes: Sequence[int], name: str | None = None,
                 combine: str = "mean"):
        super().__init__(name=name)
        self.model_variables = list(model.variables)
        self._sizes = [int(s) for s in sizes]
        self._combine = combine
        # Traced once for all signatures and scales (tracing EfficientNet is the slow part of
        # saving). A closure, not an attribute: tf.Module would track the Keras object graph.
        # Grouped convolutions are traced as TF 2.2 can run them (portable_savedmodel).
        def call(x):
            with portable_savedmodel.native_depthwise_convolutions(model):
                return tf.cast(model(x, training=False), tf.float32)

        self._call = tf.function(
            call, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
            autograph=False,
        )

    def batch(self, images: tf.Tensor) -> tf.Tensor:
        """uint8 [B, H, W, 3] (one size) -> float32 [B, D], combined over scales."""
        parts = [self._call(resize_for_model(images, s)) for s in self._sizes]
        return combine_scales(parts, self._combine)

    def padded(self, images: tf.Tensor, sizes: tf.Tensor) -> tf.Tensor:
        """uint8 [B, H, W, 3] zero-padded + int32 [B, 2] -> float32 [B, D], combined over scales."""
        parts = [self._call(crop_and_resize(images, sizes, s)) for s in self._sizes]
        return combine_scales(parts, self._combine)


class SavedModelBranch(tf.Module):
    """A loaded SavedModel of ours (`tf.saved_model.load`), called through its signatures."""

    def __init__(self, loaded, name: str | None = None):
        super().__init__(name=name)
        self.loaded = loaded

    def batch(self, images: tf.Tensor) -> tf.Tensor:
        return self.loaded.signatures[BATCH](**{INPUT_IMAGES: images})[OUTPUTS]

    def padded(self, images: tf.Tensor, sizes: tf.Tensor) -> tf.Tensor:
        fn = self.loaded.signatures[PADDED]
        return fn(**{INPUT_IMAGES: images, IMAGE_SIZES: sizes})[OUTPUTS]


class DescriptorModule(tf.Module):
    """Weighted, normalised concatenation of branches, exposed through the three signatures."""

    def __init__(self, branches: Sequence[tf.Module], weights: Sequence[float]):
        super().__init__(name="landmark_descriptor")
        if len(branches) != len(weights) or not branches:
            raise ValueError(f"{len(branches)} branches but {len(weights)} weights")
        self.branches = list(branches)
        self._weights = [float(w) for w in weights]

    def _combine(self, parts: list[tf.Tensor]) -> tf.Tensor:
        pairs = zip(self._weights, parts, strict=True)
        scaled = [w * tf.math.l2_normalize(p, axis=-1) for w, p in pairs]
        joined = scaled[0] if len(scaled) == 1 else tf.concat(scaled, axis=-1)
        return tf.math.l2_normalize(joined, axis=-1)

    @tf.function(input_signature=[_IMAGE], autograph=False)
    def serving_default(self, input_image):
        batch = input_image[tf.newaxis]
        return {OUTPUT: self._combine([b.batch(batch) for b in self.branches])[0]}

    @tf.function(input_signature=[_IMAGES], autograph=False)
    def serving_batch(self, input_images):
        return {OUTPUTS: self._combine([b.batch(input_images) for b in self.branches])}

    @tf.function(input_signature=[_IMAGES, _SIZES], autograph=False)
    def serving_padded(self, input_images, image_sizes):
        parts = [b.padded(input_images, image_sizes) for b in self.branches]
        return {OUTPUTS: self._combine(parts)}

    def signatures(self) -> dict:
        return {name: getattr(self, name) for name in SIGNATURES}


def save(module: DescriptorModule, path: str) -> None:
    """Writes `module` as a SavedModel at `path` with the three signatures (no metadata), in the
    form that TF 2.2 loads too (`portable_savedmodel`)."""
    portable_savedmodel.save(module, path, module.signatures())


def load_quietly(path: str):
    """`tf.saved_model.load` without the custom-gradient warning that exports written before
    `portable_savedmodel` trigger (one per function). TF logs it through absl or its own logger."""
    with _level("absl", logging.ERROR), _level("tensorflow", logging.ERROR):
        return tf.saved_model.load(path)


@contextlib.contextmanager
def _level(name: str, level: int):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)
