"""The JAX trainer on 2 virtual CPU devices: data parallel, step-exact resume from a checkpoint,
and the TensorFlow export of its workdir giving the JAX model's descriptors."""

import json
import os
import subprocess
import sys

import checkpoint_state
import fixtures_export as fx
import numpy as np
import pytest
import tensorflow as tf
from tiny_dataset import make_dataset

from landmark_tf.modeling import model

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
                          timeout=3600)  # ~100 s of CPU; generous for shared machines
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f)


def _state(path) -> dict:
    return checkpoint_state.read(str(path))


def test_jax_run_is_data_parallel_and_resumes_step_exactly(jax_runs):
    out, results = jax_runs
    ref, resumed = results["reference"], results["resumed"]
    assert ref["backend"] == "jax" and ref["replicas"] == 2 and ref["device"] == "cpu"
    assert ref["step"] == 4 and np.isfinite(ref["loss"]) and ref["images_per_second"] > 0
    assert resumed["start_step"] == 2 and resumed["resumed_from"].endswith("ckpt-2")
    # One compilation per run: a state typed unlike the step's outputs compiled it twice.
    assert ref["train_step_compilations"] == resumed["train_step_compilations"] == 1
    assert sorted(os.listdir(out / "reference")) == [
        "checkpoints", "config.json", "logs", "summary.json"]
    with open(out / "reference" / "config.json") as f:
        assert json.load(f)["train"]["backend"] == "jax"
    a = _state(out / "reference" / "checkpoints" / "ckpt-4")
    b = _state(out / "resumed" / "checkpoints" / "ckpt-4")
    assert a.keys() == b.keys() and any(k.startswith("optimizer/") for k in a)
    for key, value in a.items():  # weights, BN statistics, AdaCos scale, momenta, RNG states
        np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    first = _state(out / "reference" / "checkpoints" / "ckpt-2")
    head = [k for k in a if k.startswith("head/")]
    assert head and not all(np.allclose(first[k], a[k]) for k in head)  # it did train


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
    assert np.all(np.isfinite(expected))  # assert_allclose takes NaN == NaN
    for image, want in zip(images, expected, strict=True):  # integer images: uint8 is exact
        got = loaded.signatures["serving_default"](
            input_image=tf.constant(image.astype(np.uint8)))["global_descriptor"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    tf_model, _ = model.restore_embedding_model(str(out / "reference"))
    np.testing.assert_allclose(tf_model(images).numpy(), expected, rtol=1e-4, atol=1e-5)
    # Kaggle GLR2020's TensorFlow 2.2 loads the export of a JAX-trained workdir.
    import load_savedmodel

    sizes = "64x48,33x70"
    r22 = fx.load_in_tf22(result["export_dir"], sizes, str(tmp_path / "tf22.npz"))
    assert r22["shapes"] == [[expected.shape[1]]] * 2 and r22["distinct"]
    here = [loaded.signatures["serving_default"](input_image=tf.constant(im))["global_descriptor"]
            for im in load_savedmodel.make_images(sizes)]
    np.testing.assert_allclose(np.load(tmp_path / "tf22.npz")["default"], np.stack(here),
                               atol=1e-4, rtol=0)


LANDMARK_TRAIN = os.path.join(os.path.dirname(sys.executable), "landmark-train")


def test_landmark_embed_of_a_jax_workdir_gives_the_jax_descriptors(jax_runs, tmp_path):
    """`landmark-embed --workdir` (TensorFlow, the trainer's strategy) on a JAX-trained
    workdir: the rows equal the JAX model's embeddings of the same records."""
    from landmark_tf.retrieval.embeddings import load_embeddings

    out, _ = jax_runs
    workdir = str(out / "reference")
    with open(os.path.join(workdir, "config.json")) as f:
        data = json.load(f)["train"]["data_dir"]
    output = str(tmp_path / "train.npz")
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "landmark-embed"), f"--workdir={workdir}",
         f"--records={data}/train-*", f"--output={output}", "--batch_size=5"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == 24 and result["skipped"] == 0
    es = load_embeddings(output)
    embedding_model, _ = model.restore_embedding_model(workdir)
    from landmark_tf.data import records
    from landmark_tf.preprocess import resize_for_model

    ds = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(f"{data}/train-*")))
    first = records.parse_example(next(iter(ds)))
    image = tf.io.decode_image(first["image/encoded"], channels=3, expand_animations=False)
    want = embedding_model(resize_for_model(image, 32)[None], training=False)[0].numpy()
    assert es.ids[0] == first["image/id"].numpy().decode()
    np.testing.assert_allclose(es.embeddings[0], want / np.linalg.norm(want), atol=1e-5)


@pytest.mark.slow
def test_killed_jax_run_resumes_to_the_same_weights(tmp_path):
    """landmark-train --backend=jax killed with SIGKILL after a checkpoint, then rerun: the
    final checkpoint equals an uninterrupted run's."""
    import signal
    import time

    data = str(tmp_path / "records")
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=32)
    env = _jax_env(tmp_path)

    def command(workdir):
        return [LANDMARK_TRAIN, "--backend=jax", f"--data_dir={data}", f"--workdir={workdir}",
                "--train_steps=6", "--batch_size=8", "--checkpoint_every=2", "--val_split=",
                "--image_size=32", "--embedding_dim=16", "--steps_per_execution=1"]

    reference = subprocess.run(command(tmp_path / "ref"), env=env, capture_output=True,
                               text=True, timeout=1200)
    assert reference.returncode == 0, reference.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    first = subprocess.Popen(command(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while not (ckpts / "ckpt-2" / "state.json").exists() and first.poll() is None and \
            time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("ckpt-*")
                  if (p / "state.json").exists())
    assert done and done[-1] < 6, "the first run should be killed mid-way"
    second = subprocess.run(command(tmp_path / "run"), env=env, capture_output=True, text=True,
                            timeout=1200)
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax" and result["step"] == 6
    assert result["start_step"] == done[-1]
    a, b = _state(tmp_path / "ref" / "checkpoints" / "ckpt-6"), _state(ckpts / "ckpt-6")
    for key, value in a.items():
        np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_tensorflow_stage_starts_from_a_jax_workdir(jax_runs, tmp_path):
    """--init_from across backends: the TF trainer restores backbone, neck and head."""
    from landmark_tf.config import ModelConfig, TrainConfig
    from landmark_tf.training import train

    out, _ = jax_runs
    data = str(tmp_path / "records")
    make_dataset(data, train_counts=(6, 6, 6, 6), val_counts=None, size=32)
    cfg = TrainConfig(data_dir=data, workdir=str(tmp_path / "tf_stage"), train_steps=1,
                      batch_size=8, val_split="", init_from=str(out / "reference"),
                      backend="tensorflow")
    mcfg = ModelConfig(image_size=48, embedding_dim=16, margin=0.1, head="adacos", num_classes=4)
    trainer = train.Run(mcfg, cfg, train.make_plan(cfg), tf.distribute.get_strategy())
    info = trainer.start_info["init_from"]
    assert info["restored"] == ["backbone", "head", "neck"] and info["checkpoint"].endswith(
        "ckpt-4")
    jax_model, _ = model.restore_embedding_model(str(out / "reference"))
    for mine, theirs in zip(trainer.models.embedding_model.weights, jax_model.weights,
                            strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
