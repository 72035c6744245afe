"""EfficientNet B0-B7 and ConvNeXt feature extractors from `keras.applications`, with offline
ImageNet weights.

`keras.applications.EfficientNetBx(weights="imagenet")` adds, after its Normalization layer, a
Rescaling by 1/sqrt(ImageNet std), because the released weight files store the std (not the
variance) in the Normalization layer. With `weights=<file path>` Keras silently leaves that layer
out (tensorflow/tensorflow#62193), so the input scaling is wrong. We always build the model the
`weights="imagenet"` code path builds (also without weights, so that a checkpoint trained from
ImageNet weights restores into the same function), then load the file ourselves.

A random initialisation starts every residual block as the identity: the last BatchNorm of each
block with a skip connection (`blockNx_project_bn` before `blockNx_add`) gets gamma = 0
("zero-gamma", Goyal et al. 2017, sec. 5.1; timm's `zero_init_last`, on by default for its
EfficientNets). With Keras's init (gamma = 1) a random EfficientNet-B1 trained from scratch on
the demo's 60 classes stayed at chance for 80 SGD steps (train accuracy 0.003); with zero-gamma
it reached 0.32 (validation 0.36) in the same steps. ImageNet weights overwrite these gammas.

ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"; `--backbone=convnext-tiny|small|base|
large|xlarge`) is Keras's `ConvNeXtTiny`... with `include_preprocessing=True`: its first layer
normalises 0..255 inputs by the ImageNet mean and std of 0..255 pixels (its "prestem"), as
its ImageNet weight files expect, so no fix as above is needed. Its no-top model ends in a
LayerNormalization over the channels at each position of the stride-32 map: the features are
signed (about half negative), so GeM and SuperGlobal pool their part above eps, GAP all of
them. A random ConvNeXt already starts its residual blocks near the identity: each block's
LayerScale is 1e-6 (Touvron et al. 2021), the role zero-gamma plays above. Its norms are
LayerNorms (no statistics) and Keras builds these variants without stochastic depth, so the
training and inference modes compute the same function (config refuses frozen_bn with it).

`InferenceModeBackbone` wraps a backbone so that it always runs in inference mode, also inside a
training step (`--backbone_mode=frozen_bn`, the GLR2020 winner's released training).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile

import keras

from landmark_tf.config import BACKBONES, CONVNEXTS
from landmark_tf.errors import UserError

# What Keras's efficientnetbN_notop.h5 files hold in their Normalization layer: the mean and,
# in the variance slot, the std (see keras/src/applications/efficientnet.py).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def keras_name(backbone: str) -> str:
    """Keras's model name and weight-file stem: 'efficientnet-b3' -> 'efficientnetb3',
    'convnext-tiny' -> 'convnext_tiny'."""
    _check_name(backbone)
    if backbone in CONVNEXTS:
        return backbone.replace("-", "_")
    return backbone.replace("-", "")


def weights_file_name(backbone: str) -> str:
    """The Keras ImageNet no-top weight file for a backbone, e.g. 'efficientnetb0_notop.h5',
    'convnext_tiny_notop.h5'."""
    return f"{keras_name(backbone)}_notop.h5"


def build_backbone(backbone: str, weights_path: str | None = None) -> keras.Model:
    """Builds a no-top EfficientNet or ConvNeXt: float32 [B, H, W, 3] in 0..255 -> features
    [B, h, w, F] (stride 32; F = 1280 for B0, 768 for convnext-tiny).

    Any H, W >= 32 works. The features are in the global dtype policy's compute dtype
    (bfloat16 under mixed_bfloat16). `weights_path`: Keras's no-top ImageNet weights file
    (`weights_file_name`), local or gs://; None keeps the random initialisation (with the
    ImageNet input normalisation).
    """
    _check_name(backbone)
    if weights_path and not _fileio().exists(weights_path):
        raise UserError(f"pretrained weights file not found: {weights_path}")
    if backbone in CONVNEXTS:
        size = backbone.split("-")[1]
        constructor = getattr(keras.applications, "ConvNeXt" + (
            "XLarge" if size == "xlarge" else size.capitalize()))
        model = constructor(include_top=False, include_preprocessing=True, weights=None,
                            input_shape=(None, None, 3), name=keras_name(backbone))
    else:
        constructor = getattr(keras.applications, f"EfficientNetB{backbone[-1]}")
        plain = constructor(include_top=False, weights=None, input_shape=(None, None, 3))
        model = _with_imagenet_input_scaling(plain)
        _zero_init_residual_gammas(model)
    if weights_path:
        _load_weights_file(model, weights_path)
    return model


@keras.saving.register_keras_serializable(package="landmark_tf")
class InferenceModeBackbone(keras.layers.Layer):
    """Calls `backbone` with training=False whatever the outer call's `training` is.

    Why a layer: a Keras 3 Functional passes its own `training` to every node it runs, so a
    nested model's mode cannot be fixed at graph-building time (`backbone(x, training=False)`
    in the functional graph is overridden by `train_model(..., training=True)`); the explicit
    argument in this layer's `call` is what the backbone sees. In inference mode every
    BatchNormalization normalises with its moving mean/variance and leaves them unchanged, while
    gamma and beta still get gradients and train; Dropout (drop-connect) is the identity. This
    is what the GLR2020 winner's `cosine = model(images)` (no training=) did in tf.keras 2
    (seungkee/google_landmark_retrieval_2020_1st_place_solution, v2clean_train.ipynb and
    v2total_train.ipynb, cell 11).

    The layer owns no variables: its variables are the backbone's, in the same order, so
    checkpoints (which save the backbone object itself) and exports are unchanged.

    Input: float32 [B, H, W, 3] in 0..255. Output: the backbone's features [B, h, w, F] in the
    backbone's compute dtype.
    """

    def __init__(self, backbone: keras.Model, **kwargs):
        # float32 like the input image: the wrapper neither casts the image (the backbone's own
        # layers do, as when it is called directly) nor changes the backbone's dtype policy.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)

    def call(self, inputs, training=None):
        del training  # the point of the layer: the outer mode never reaches the backbone
        return self.backbone(inputs, training=False)

    def compute_output_spec(self, inputs, training=None):
        return self.backbone.compute_output_spec(inputs)

    def get_config(self):
        config = super().get_config()
        config["backbone"] = keras.saving.serialize_keras_object(self.backbone)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # deep copy: deserialisation consumes the nested dicts it reads.
        config["backbone"] = keras.saving.deserialize_keras_object(
            copy.deepcopy(config["backbone"]))
        return cls(**config)


def _zero_init_residual_gammas(model: keras.Model) -> None:
    """gamma = 0 in the BatchNorm that ends each residual branch (see the module docstring)."""
    names = {layer.name for layer in model.layers}
    for name in names:
        if name.endswith("_add") and f"{name[:-4]}_project_bn" in names:
            bn = model.get_layer(f"{name[:-4]}_project_bn")
            bn.gamma.assign(keras.ops.zeros(bn.gamma.shape, dtype=bn.gamma.dtype))


def refresh_normalization(model: keras.Model) -> None:
    """Re-reads Normalization mean/variance variables into the tensors the layer computes with.

    Keras's Normalization snapshots its variables when built or loaded through Keras; a
    `tf.train.Checkpoint` restore updates the variables only. Call this after such a restore.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()
        elif isinstance(layer, keras.Model):
            refresh_normalization(layer)


def _check_name(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")


def _with_imagenet_input_scaling(plain: keras.Model) -> keras.Model:
    """Rebuilds `plain` (same layer objects) with the Rescaling that weights="imagenet" adds."""
    norm = next(la for la in plain.layers if isinstance(la, keras.layers.Normalization))
    norm.adapt_mean.assign(IMAGENET_MEAN_RGB)
    norm.adapt_variance.assign(IMAGENET_STDDEV_RGB)
    norm.finalize_state()
    fix = keras.layers.Rescaling([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB])

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        return fix(out) if layer is norm else out

    return keras.models.clone_model(plain, clone_function=lambda layer: layer, call_function=call)


def _fileio():
    """landmark_tf.fileio (tf.io.gfile) only when a file is read: the model itself builds and
    trains without TensorFlow (bench/train_bench.py on a JAX-only machine)."""
    from landmark_tf import fileio

    return fileio


def _load_weights_file(model: keras.Model, weights_path: str) -> None:
    import tensorflow as tf

    tmpdir = tempfile.mkdtemp(prefix="landmark_tf_weights_")
    try:
        # Keras picks the loader from the file suffix and reads only local files.
        local = os.path.join(tmpdir, os.path.basename(weights_path.rstrip("/")))
        tf.io.gfile.copy(weights_path, local, overwrite=True)
        try:
            model.load_weights(local)
        except (ValueError, OSError, KeyError) as e:
            raise UserError(
                f"pretrained weights {weights_path}: not ImageNet weights for {model.name} "
                f"(expected Keras's {model.name}_notop.h5): {e}"
            ) from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
