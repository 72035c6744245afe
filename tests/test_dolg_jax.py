"""--neck=dolg on the JAX backend: it trains, resumes from its checkpoint, and TensorFlow
restores the JAX workdir to the same descriptors (one checkpoint format for both backends).
The backbone is the stage-named stand-in: this tests the DOLG neck and head, not EfficientNet,
whose XLA:CPU train step takes minutes to compile."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from stage_named_backbone import stage_named_backbone
from tiny_dataset import make_dataset

from landmark_tf.config import ModelConfig
from landmark_tf.modeling import dolg, model

pytest.importorskip("jax")
HERE = os.path.dirname(os.path.abspath(__file__))


def run_on_jax(tmp_path, model_cfg: ModelConfig, *extra: str) -> dict:
    """tests/jax_model_run.py in a JAX process on tiny records: its results.json."""
    data, out = str(tmp_path / "records"), tmp_path / "jax"
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=model_cfg.image_size)
    out.mkdir()
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "jax_model_run.py"), data,
                           str(out), json.dumps(model_cfg.to_dict()), *extra], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["2"]["step"] == 2 and results["3"]["step"] == 3
    assert results["3"]["backend"] == "jax" and np.isfinite(results["3"]["loss"])
    return results


def same_descriptors_on_tensorflow(out) -> model.keras.Model:
    """Restores the JAX workdir here (TensorFlow) and checks it gives the JAX descriptors."""
    embedding_model, _ = model.restore_embedding_model(str(out / "run"))
    got = np.asarray(embedding_model(np.load(out / "images.npy"), training=False))
    np.testing.assert_allclose(got, np.load(out / "embeddings.npy"), atol=1e-5)
    return embedding_model


def test_dolg_trains_and_resumes_on_jax_and_restores_on_tensorflow(tmp_path, monkeypatch):
    cfg = ModelConfig(image_size=32, embedding_dim=16, neck="dolg", pooling="gem",
                      head="dynamic_arcface", scale=45.0, dolg_dilations=[1, 2, 3])
    run_on_jax(tmp_path, cfg, "--stand_in")
    monkeypatch.setattr(model.backbones, "build_backbone", stage_named_backbone)
    embedding_model = same_descriptors_on_tensorflow(tmp_path / "jax")
    assert isinstance(embedding_model.get_layer("neck"), dolg.DOLGNeck)
