"""The model code is backend-agnostic: one training step of every head gives the same loss,
gradients and state updates (BatchNorm statistics, AdaCos scale) under TensorFlow and JAX."""

import os
import subprocess
import sys

import numpy as np
import pytest

from landmark_tf.config import HEADS

pytest.importorskip("jax")
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_step.py")


def _run(backend: str, out: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, HELPER, out], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_each_head_trains_the_same_under_tensorflow_and_jax(tmp_path):
    tf_out = _run("tensorflow", str(tmp_path / "tf.npz"))
    jax_out = _run("jax", str(tmp_path / "jax.npz"))
    assert str(tf_out.pop("backend")) == "tensorflow" and str(jax_out.pop("backend")) == "jax"
    assert tf_out.keys() == jax_out.keys()
    heads = {k.split("/")[0] for k in tf_out}
    assert heads == set(HEADS)  # every head the trainer offers
    for key, value in tf_out.items():
        assert np.all(np.isfinite(value)), key
        np.testing.assert_allclose(jax_out[key], value, rtol=2e-4, atol=2e-5, err_msg=key)
    for head in heads:  # the step really has gradients for the neck and the head
        grads = [v for k, v in tf_out.items() if k.startswith(f"{head}/grad/")]
        assert len(grads) >= 5 and all(np.abs(g).sum() > 0 for g in grads), head
