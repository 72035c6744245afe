"""--backbone=convnext-*: keras.applications ConvNeXt with its ImageNet input normalisation, Keras's
ImageNet weights from a file by path (the same model as Keras's weights="imagenet"), the options
it refuses, SuperGlobal pooling on its map. Slow: CLI runs of convnext-tiny on TensorFlow
(export in the Kaggle format, loaded in TF 2.2 with the same descriptors) and on JAX. The TF 2.2
load of ConvNeXt's ops is in make test through test_kaggle_contract's every_neck export."""

import os
import subprocess
import sys

import fixtures_export as fx
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils
from tiny_convnext import tiny_convnext
from tiny_dataset import make_dataset

from landmark_tf import config
from landmark_tf.config import ModelConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones, superglobal_pooling
from landmark_tf.modeling import model as model_lib

IMAGES = np.random.default_rng(0).uniform(0, 255, size=(2, 64, 40, 3)).astype("float32")
MEAN, STD = np.array(backbones.IMAGENET_MEAN_RGB), np.array(backbones.IMAGENET_STDDEV_RGB)


@pytest.fixture(scope="module")
def random_tiny():
    keras.utils.set_random_seed(0)
    return backbones.build_backbone("convnext-tiny")


@pytest.fixture(scope="module")
def weights_file(random_tiny, tmp_path_factory):
    """A Keras-format (legacy h5, as Keras's released files) convnext_tiny_notop.h5 of random
    weights, LayerScales off their init so that a load that missed them shows."""
    scales = [la.gamma for la in random_tiny._flatten_layers()
              if type(la).__name__ == "LayerScale"]
    init = [keras.ops.convert_to_numpy(g) for g in scales]
    for gamma in scales:
        gamma.assign(np.random.default_rng(1).uniform(0.5, 1.5, gamma.shape))
    path = tmp_path_factory.mktemp("weights") / backbones.weights_file_name("convnext-tiny")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, random_tiny)
    for gamma, value in zip(scales, init, strict=True):
        gamma.assign(value)
    return str(path)


def test_names_and_refused_options():
    sizes = ("tiny", "small", "base", "large", "xlarge")
    assert [f"convnext-{s}" for s in sizes] == list(config.CONVNEXTS)
    assert set(config.CONVNEXTS) <= set(config.BACKBONES)
    assert backbones.weights_file_name("convnext-xlarge") == "convnext_xlarge_notop.h5"
    with pytest.raises(UserError, match="DOLG taps EfficientNet"):
        ModelConfig(backbone="convnext-tiny", neck="dolg", num_classes=3).validate()
    with pytest.raises(UserError, match="backbone_mode must be train with ConvNeXt"):
        ModelConfig(backbone="convnext-base", backbone_mode="frozen_bn", num_classes=3).validate()


def test_random_init_normalises_inputs_and_starts_blocks_near_identity(random_tiny):
    net = random_tiny
    assert net.name == "convnext_tiny" and net.count_params() == 27_820_128
    norm = net.layers[1]
    assert isinstance(norm, keras.layers.Normalization)
    pixels = np.stack([MEAN * 255, (MEAN + STD) * 255])[None, None].astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm(pixels))[0, 0],
                               [[0, 0, 0], [1, 1, 1]], atol=1e-5)
    scales = [la for la in net._flatten_layers() if type(la).__name__ == "LayerScale"]
    assert len(scales) == 18  # 3 + 3 + 9 + 3 blocks
    assert all(np.all(keras.ops.convert_to_numpy(s.gamma) == np.float32(1e-6)) for s in scales)
    # No BatchNorm, no stochastic depth: training and inference mode are one function, which
    # is why config refuses --backbone_mode=frozen_bn with it.
    assert not any(isinstance(la, (keras.layers.BatchNormalization, keras.layers.Dropout))
                   or "stochastic_depth" in la.name for la in net._flatten_layers())
    train, infer = (keras.ops.convert_to_numpy(net(IMAGES, training=t)) for t in (True, False))
    assert train.shape == (2, 2, 1, 768)
    np.testing.assert_array_equal(train, infer)
    assert net(IMAGES[:, :32, :32]).shape == (2, 1, 1, 768)


def test_weights_file_builds_kerass_imagenet_model(weights_file, monkeypatch):
    """Keras's own weights="imagenet" path (its downloader patched to hand back the file) and
    ours from a non-local path (TF's ram://, as gs:// goes) give the same model."""
    asked = []

    def fake_get_file(fname, origin, **kwargs):
        asked.append(fname)
        return weights_file

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    online = keras.applications.ConvNeXtTiny(include_top=False, weights="imagenet",
                                              input_shape=(None, None, 3))
    assert asked == [backbones.weights_file_name("convnext-tiny")]
    tf.io.gfile.makedirs("ram://convnext")
    remote = "ram://convnext/" + os.path.basename(weights_file)
    tf.io.gfile.copy(weights_file, remote, overwrite=True)
    offline = backbones.build_backbone("convnext-tiny", remote)
    assert len(offline.weights) == len(online.weights) == 180
    for ours, theirs in zip(offline.weights, online.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)
    np.testing.assert_allclose(offline(IMAGES).numpy(), online(IMAGES).numpy(), atol=1e-5)


def test_superglobal_pooling_takes_its_map(monkeypatch):
    monkeypatch.setattr(model_lib.backbones, "build_backbone", tiny_convnext)
    models = model_lib.build_models(ModelConfig(backbone="convnext-tiny", image_size=32,
                                                embedding_dim=8, num_classes=3),
                                    with_head=False)
    model_lib.check_superglobal_pooling(models)
    model = superglobal_pooling.build_embedding_model(models.backbone, models.neck)
    got = keras.ops.convert_to_numpy(model(IMAGES))
    assert got.shape == (2, 8) and np.all(np.isfinite(got))
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"landmark_tf.cli.{module}", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                               "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.slow
def test_cli_trains_convnext_and_its_exports_load_in_tf22(tmp_path):
    import load_savedmodel

    data, workdir = str(tmp_path / "records"), str(tmp_path / "run")
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=32)
    train = ["--data_dir=" + data, "--workdir=" + workdir, "--train_steps=2", "--batch_size=8",
             "--image_size=32", "--backbone=convnext-tiny", "--embedding_dim=16",
             "--val_split=", "--schedule=constant", "--pooling=gem"]
    for bad, needle in (("--neck=dolg", "DOLG taps EfficientNet"),
                        ("--backbone_mode=frozen_bn", "frozen_bn would change nothing")):
        fx.assert_one_line_error(_cli("train", *train, bad), needle)
    result = fx.closing_json(_cli("train", *train))
    assert result["step"] == 2 and np.isfinite(result["loss"])
    sizes = "37x501,64x48,33x33"
    images = load_savedmodel.make_images(sizes)
    for pooling, size, scales in (("trained", 32, "1,1.5"), ("superglobal", 64, None)):
        export_dir = str(tmp_path / f"export_{pooling}")
        exported = fx.closing_json(_cli(
            "export", "--workdir=" + workdir, "--export_dir=" + export_dir,
            f"--image_size={size}", f"--inference_pooling={pooling}",
            *([f"--scales={scales}"] if scales else [])))
        assert exported["kaggle_contract_ok"] is True and exported["embedding_dim"] == 16
        model, _ = model_lib.restore_embedding_model(workdir, pooling)
        sizes_px = [32, 48] if scales else [45, 64, 91]  # SuperGlobal: 0.7071, 1, 1.4142
        combine = "mean" if scales else "max"
        want = np.stack([fx.l2n(keras.ops.convert_to_numpy(superglobal_pooling.combine_scales(
            [model(fx.resize_for_model(im[None], s), training=False) for s in sizes_px],
            combine))[0]) for im in images])
        fx.load_in_fresh_process(export_dir, sizes, str(tmp_path / "fresh.npz"))
        np.testing.assert_allclose(np.load(tmp_path / "fresh.npz")["default"], want, atol=1e-4)
        fx.load_in_tf22(export_dir, sizes, str(tmp_path / "tf22.npz"))
        np.testing.assert_allclose(np.load(tmp_path / "tf22.npz")["default"], want, atol=1e-4)


@pytest.mark.slow
def test_convnext_trains_and_resumes_on_jax(tmp_path):
    from test_dolg_jax import run_on_jax, same_descriptors_on_tensorflow

    cfg = ModelConfig(backbone="convnext-tiny", image_size=32, embedding_dim=16, pooling="gem")
    run_on_jax(tmp_path, cfg)
    same_descriptors_on_tensorflow(tmp_path / "jax")
