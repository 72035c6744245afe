"""--backbone=hub:SOURCE: keras-hub backbones from a preset folder (weights, input scaling) or a
tiny random-init config, the class token of ViT/DINOv2, one-line errors, a CLI run that exports
in the Kaggle format and loads in TF 2.2, and a JAX run. No network: presets are written here."""

import os
import subprocess
import sys

import fixtures_export as fx
import keras
import numpy as np
import pytest
from test_dolg_jax import run_on_jax, same_descriptors_on_tensorflow
from tiny_dataset import make_dataset

from landmark_tf.config import ModelConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import hub_backbones
from landmark_tf.modeling import model as model_lib

keras_hub = pytest.importorskip("keras_hub")
IMAGES = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
SCALE, OFFSET = [0.01, 0.02, 0.03], [-1.0, -0.5, 0.25]


@pytest.fixture(scope="module")
def dinov2_preset(tmp_path_factory):
    """A keras-hub preset folder of a small DINOv2 (random weights) with a non-ImageNet image
    converter, and the backbone object it was saved from."""
    path = str(tmp_path_factory.mktemp("preset") / "dinov2_small_test")
    keras.utils.set_random_seed(3)
    net = keras_hub.models.DINOV2Backbone(
        patch_size=8, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3), position_embedding_shape=(32, 32, 3))
    net.save_to_preset(path)
    keras_hub.layers.DINOV2ImageConverter(image_size=(32, 32), scale=SCALE, offset=OFFSET
                                          ).save_to_preset(path)
    return path, net


def test_preset_weights_and_input_scaling_are_the_presets(dinov2_preset):
    path, net = dinov2_preset
    built = hub_backbones.build(f"hub:{path}", 32, load_weights=True)
    scaled = IMAGES * np.array(SCALE, "float32") + np.array(OFFSET, "float32")
    want = keras.ops.convert_to_numpy(net({"images": scaled}))[:, 0]  # the class token
    got = keras.ops.convert_to_numpy(built(IMAGES))
    assert got.shape == (2, 1, 1, 16)
    np.testing.assert_allclose(got[:, 0, 0], want, atol=1e-5)
    architecture_only = hub_backbones.build(f"hub:{path}", 32, load_weights=False)
    assert not np.allclose(keras.ops.convert_to_numpy(architecture_only(IMAGES)), got)


def test_tiny_configs_scale_imagenet_mean_to_zero_and_keep_feature_maps():
    for name in hub_backbones.TINY_CONFIGS:
        built = hub_backbones.build(f"hub:{name}", 32)
        scaling = built.get_layer("input_scaling")
        mean = np.array([[[[0.485, 0.456, 0.406]]]], "float32") * 255.0
        np.testing.assert_allclose(keras.ops.convert_to_numpy(scaling(mean)), 0.0, atol=1e-5)
        shape = built(IMAGES).shape
        if hub_backbones.is_token_backbone(f"hub:{name}"):
            assert shape == (2, 1, 1, 32)
        else:
            assert len(shape) == 4 and shape[-1] == 64 and shape[1] == shape[2] > 1


def test_bad_hub_settings_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="use --pooling=gap"):
        model_lib.build_models(ModelConfig(backbone="hub:tiny_vit", image_size=32,
                                           num_classes=3, pooling="gem"))
    with pytest.raises(UserError, match="takes its weights from the preset"):
        model_lib.build_models(ModelConfig(backbone="hub:tiny_vit", image_size=32,
                                           num_classes=3), "weights.h5")
    with pytest.raises(UserError, match="no keras-hub preset there"):
        hub_backbones.build(f"hub:{tmp_path}/missing", 32)
    with pytest.raises(UserError, match="backbone must be one of"):
        ModelConfig(backbone="hub:", num_classes=3).validate()
    with pytest.raises(UserError, match="DOLG taps EfficientNet"):
        ModelConfig(backbone="hub:tiny_efficientnetv2", neck="dolg", num_classes=3).validate()
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs keras-hub: pip install 'landmark-tf\[hub\]'"):
        hub_backbones.build("hub:tiny_vit", 32)


def test_preset_without_image_converter_is_a_user_error(tmp_path):
    path = str(tmp_path / "p")
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1,
                                 num_heads=2, hidden_dim=16, mlp_dim=32).save_to_preset(path)
    with pytest.raises(UserError, match="not a loadable keras-hub image preset"):
        hub_backbones.build(f"hub:{path}", 32)


def _cli(module: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"landmark_tf.cli.{module}", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return fx.closing_json(proc)


def test_cli_trains_a_preset_and_its_export_loads_in_tf22(dinov2_preset, tmp_path):
    import load_savedmodel

    data, workdir, export_dir = (str(tmp_path / n) for n in ("records", "run", "export"))
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=32)
    result = _cli("train", f"--data_dir={data}", f"--workdir={workdir}", "--train_steps=2",
                  "--batch_size=8", "--image_size=32", f"--backbone=hub:{dinov2_preset[0]}",
                  "--embedding_dim=16", "--val_split=", "--schedule=constant")
    assert result["step"] == 2 and np.isfinite(result["loss"])
    exported = _cli("export", f"--workdir={workdir}", f"--export_dir={export_dir}")
    assert exported["kaggle_contract_ok"] is True and exported["embedding_dim"] == 16
    embedding_model, cfg = model_lib.restore_embedding_model(workdir)
    assert cfg.backbone == f"hub:{dinov2_preset[0]}"
    sizes = "37x501,64x48,33x33"
    want = np.stack([fx.l2n(keras.ops.convert_to_numpy(embedding_model(
        fx.resize_for_model(im[None], 32), training=False))[0])
        for im in load_savedmodel.make_images(sizes)])
    fx.load_in_fresh_process(export_dir, sizes, str(tmp_path / "fresh.npz"))
    np.testing.assert_allclose(np.load(tmp_path / "fresh.npz")["default"], want, atol=1e-4)
    fx.load_in_tf22(export_dir, sizes, str(tmp_path / "tf22.npz"))
    np.testing.assert_allclose(np.load(tmp_path / "tf22.npz")["default"], want, atol=1e-4)
    proc = subprocess.run([sys.executable, "-m", "landmark_tf.cli.export",
                           f"--workdir={workdir}", f"--export_dir={tmp_path}/e2",
                           "--scales=1,1.5"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    fx.assert_one_line_error(proc, "takes only 32 x 32 inputs", "--scales=1")


def test_hub_backbone_trains_and_resumes_on_jax(tmp_path):
    cfg = ModelConfig(backbone="hub:tiny_efficientnetv2", image_size=32, embedding_dim=16,
                      pooling="gem", head="dynamic_arcface", scale=45.0)
    run_on_jax(tmp_path, cfg)
    same_descriptors_on_tensorflow(tmp_path / "jax")
