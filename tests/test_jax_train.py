"""The JAX trainer on 2 virtual CPU devices: data parallel, step-exact resume from a checkpoint,
and the TensorFlow export of its workdir giving the JAX model's descriptors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tiny_dataset import make_dataset

pytest.importorskip("jax")
HERE = os.path.dirname(os.path.abspath(__file__))


def _jax_env(tmp_path) -> dict:
    return {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            # The resumed run compiles the same step: let it reuse the first compilation.
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("records"))
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=32)
    out = tmp_path_factory.mktemp("jax")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "jax_train_run.py"), data,
                           str(out)], env=_jax_env(out), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f)


def _npz(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "meta"}


def test_jax_run_is_data_parallel_and_resumes_step_exactly(jax_runs):
    out, results = jax_runs
    ref, resumed = results["reference"], results["resumed"]
    assert ref["backend"] == "jax" and ref["replicas"] == 2 and ref["device"] == "cpu"
    assert ref["step"] == 4 and np.isfinite(ref["loss"]) and ref["images_per_second"] > 0
    assert resumed["start_step"] == 2 and resumed["resumed_from"].endswith("ckpt-2.npz")
    assert sorted(os.listdir(out / "reference")) == [
        "checkpoints", "config.json", "logs", "summary.json"]
    with open(out / "reference" / "config.json") as f:
        assert json.load(f)["train"]["backend"] == "jax"
    a = _npz(out / "reference" / "checkpoints" / "ckpt-4.npz")
    b = _npz(out / "resumed" / "checkpoints" / "ckpt-4.npz")
    assert a.keys() == b.keys() and any(k.startswith("optimizer/") for k in a)
    for key, value in a.items():  # weights, BN statistics, AdaCos scale, momenta, RNG states
        np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    first = _npz(out / "reference" / "checkpoints" / "ckpt-2.npz")
    assert not np.allclose(first["head/0000"], a["head/0000"])  # it did train


def test_tensorflow_export_of_a_jax_workdir_gives_the_jax_descriptors(jax_runs, tmp_path):
    from landmark_tf.serving import export

    out, _ = jax_runs
    result = export.export_model(export.ExportConfig(
        workdir=str(out / "reference"), export_dir=str(tmp_path / "export")))
    with open(tmp_path / "export" / "metadata.json") as f:
        assert json.load(f)["step"] == 4
    loaded = tf.saved_model.load(result["export_dir"])
    images = np.load(out / "images.npy")
    expected = np.load(out / "embeddings.npy")
    for image, want in zip(images, expected, strict=True):  # integer images: uint8 is exact
        got = loaded.signatures["serving_default"](
            input_image=tf.constant(image.astype(np.uint8)))["global_descriptor"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    from landmark_tf.modeling import model

    tf_model, _ = model.restore_embedding_model(str(out / "reference"))
    np.testing.assert_allclose(tf_model(images).numpy(), expected, rtol=1e-4, atol=1e-5)
