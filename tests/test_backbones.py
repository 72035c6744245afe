"""Offline ImageNet weights must give exactly the model `weights="imagenet"` builds.

The "online" path runs offline here: `get_file` (Keras's downloader) is patched to hand back a
weights file saved from a randomly initialised model, so the test needs no network yet runs
Keras's own `weights == "imagenet"` code.
"""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones

IMAGES = np.random.default_rng(0).uniform(0, 255, size=(2, 64, 40, 3)).astype("float32")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A Keras-format efficientnetb0_notop.h5 holding random weights and, as Keras's real file
    does, the ImageNet mean and (in the variance slot) std in its Normalization layer."""
    source = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    norm = source.layers[2]
    assert isinstance(norm, keras.layers.Normalization)
    norm.adapt_mean.assign(backbones.IMAGENET_MEAN_RGB)
    norm.adapt_variance.assign(backbones.IMAGENET_STDDEV_RGB)
    path = tmp_path_factory.mktemp("weights") / "efficientnetb0_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    return str(path)


@pytest.fixture(scope="module")
def online(weights_file):
    calls = []

    def fake_get_file(fname, origin, **kwargs):
        calls.append(fname)
        return weights_file

    patch = pytest.MonkeyPatch()
    patch.setattr(file_utils, "get_file", fake_get_file)
    try:
        model = keras.applications.EfficientNetB0(
            include_top=False, weights="imagenet", input_shape=(None, None, 3)
        )
    finally:
        patch.undo()
    assert calls == [backbones.weights_file_name("efficientnet-b0")]
    return model


@pytest.fixture(scope="module")
def offline(weights_file):
    # Through a non-local filesystem (TF's in-memory ram://), as a gs:// path would go.
    remote = "ram://pretrained/efficientnetb0_notop.h5"
    tf.io.gfile.makedirs("ram://pretrained")
    tf.io.gfile.copy(weights_file, remote, overwrite=True)
    return backbones.build_backbone("efficientnet-b0", remote)


def _layer_configs(model):
    """Layer class and config, without auto-generated names (they depend on creation order)."""
    out = []
    for layer in model.layers:
        config = dict(layer.get_config())
        if not layer.name.startswith(("block", "stem", "top")):
            config.pop("name")
        out.append((type(layer).__name__, config))
    return out


def test_offline_file_builds_the_online_imagenet_model(online, offline):
    assert _layer_configs(offline) == _layer_configs(online)
    stem = [type(la).__name__ for la in offline.layers[:4]]
    assert stem == ["InputLayer", "Rescaling", "Normalization", "Rescaling"]
    assert len(offline.weights) == len(online.weights)
    for ours, theirs in zip(offline.weights, online.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)
    np.testing.assert_allclose(offline(IMAGES).numpy(), online(IMAGES).numpy(), atol=1e-5)


def test_no_weights_keeps_imagenet_input_scaling(online):
    # Same function of the input as the ImageNet model up to the first learned layer, so a
    # checkpoint trained from ImageNet weights restores into a weights-free build unchanged.
    plain = backbones.build_backbone("efficientnet-b0")
    np.testing.assert_allclose(_stem(plain), _stem(online), atol=1e-5)
    normalized = (IMAGES / 255.0 - backbones.IMAGENET_MEAN_RGB) / backbones.IMAGENET_STDDEV_RGB
    np.testing.assert_allclose(_stem(plain), normalized, atol=1e-4)


def _stem(model):
    """The input after the layers before the first convolution's padding."""
    x = IMAGES
    for layer in model.layers[1 : [la.name for la in model.layers].index("stem_conv_pad")]:
        x = layer(x)
    return keras.ops.convert_to_numpy(x)


def test_any_input_size(offline):
    assert offline(IMAGES[:, :32, :32]).shape == (2, 1, 1, 1280)
    assert offline(IMAGES).shape == (2, 2, 1, 1280)


def test_bad_weights_and_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        backbones.build_backbone("efficientnet-b0", str(tmp_path / "missing_notop.h5"))
    empty = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(empty, "w") as f:
        f.attrs["layer_names"] = []
    with pytest.raises(UserError, match="not ImageNet weights for efficientnetb0"):
        backbones.build_backbone("efficientnet-b0", str(empty))
    with pytest.raises(UserError, match="unknown backbone"):
        backbones.build_backbone("resnet50")
    assert backbones.weights_file_name("efficientnet-b7") == "efficientnetb7_notop.h5"


def test_random_init_starts_residual_blocks_as_identity():
    """Zero-gamma: each residual branch's last BN has gamma 0, the others keep gamma 1."""
    net = backbones.build_backbone("efficientnet-b0")
    names = [layer.name for layer in net.layers]
    residual = [n[:-4] + "_project_bn" for n in names if n.endswith("_add")]
    assert len(residual) == 9  # B0: 16 blocks, 9 with a skip connection
    for name in residual:
        assert not np.any(net.get_layer(name).gamma.numpy())
    assert np.all(net.get_layer("block1a_project_bn").gamma.numpy() == 1.0)  # no skip there
