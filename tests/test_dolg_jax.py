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

from landmark_tf.modeling import dolg, model

pytest.importorskip("jax")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_dolg_trains_and_resumes_on_jax_and_restores_on_tensorflow(tmp_path, monkeypatch):
    data, out = str(tmp_path / "records"), tmp_path / "jax"
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=32)
    out.mkdir()
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dolg_jax_run.py"), data,
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["2"]["step"] == 2 and results["3"]["step"] == 3
    assert results["3"]["backend"] == "jax" and np.isfinite(results["3"]["loss"])
    monkeypatch.setattr(model.backbones, "build_backbone", stage_named_backbone)
    embedding_model, cfg = model.restore_embedding_model(str(out / "run"))
    assert cfg.neck == "dolg" and isinstance(embedding_model.get_layer("neck"), dolg.DOLGNeck)
    got = np.asarray(embedding_model(np.load(out / "images.npy"), training=False))
    np.testing.assert_allclose(got, np.load(out / "embeddings.npy"), atol=1e-5)
