"""Tag pretraining: the tag loss and weights, tags in the batch, both heads training and resuming
on TensorFlow and JAX, and the stage chain synth -> records with tags -> tag head -> landmarks."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.data import convert
from landmark_tf.errors import UserError
from landmark_tf.modeling import losses
from landmark_tf.synth import generator, titles
from landmark_tf.training import input_pipeline, step_math, tag_targets, train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = generator.SynthConfig(num_landmarks=6, min_images=6, max_images=12, image_size=32,
                             novel_landmarks=0, nonlandmark_images=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tags")
    generator.generate(TINY, str(root / "synth"), progress=False)
    cfg = convert.ConvertConfig(
        image_dir=str(root / "synth" / "train"), output_dir=str(root / "records"),
        train_csv=str(root / "synth" / "train.csv"), num_shards=2,
        attribution_csv=str(root / "synth" / titles.ATTRIBUTION_FILE), tag_min_df=2)
    convert.convert_dataset(cfg, progress=False)
    return root


def test_tag_loss_is_the_weighted_sum_of_tag_cross_entropies():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
    tags = np.array([[1, 0], [2, -1]], np.int32)
    w = np.array([[1.0, 0.5], [2.0, 9.0]], np.float32)  # the 9 sits on padding: ignored
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -(log_p[0, 1] * 1.0 + log_p[0, 0] * 0.5 + log_p[1, 2] * 2.0) / 4
    got = float(losses.tag_cross_entropy(tags, logits, w, global_batch_size=4))
    assert got == pytest.approx(want, rel=1e-5)
    assert float(step_math.top1_hits(tags, logits)) == 2.0  # argmax 1 in {1, 0}; 2 in {2}
    assert float(step_math.top1_hits(np.array([[0, 2], [1, -1]]), logits)) == 0.0


def test_tag_weights_sum_tags_or_normalise_idf():
    tags = tf.constant([[0, 2, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(tag_targets.tag_weights(tags, None), [[1, 1, 0], [0, 0, 0]])
    idf = tag_targets.smooth_idf(np.array([9, 4, 1]), num_titles=9)
    assert idf[0] == pytest.approx(1.0) and idf[2] > idf[1] > idf[0]
    w = tag_targets.tag_weights(tags, tf.constant(idf)).numpy()
    np.testing.assert_allclose(w[0], [idf[0], idf[2], 0] / (idf[0] + idf[2]), rtol=1e-6)
    np.testing.assert_array_equal(w[1], 0)  # no tags: weight 0


def _cfg(data, **kw):
    return TrainConfig(data_dir=str(data / "records"), workdir=str(data / "w"), train_steps=2,
                       batch_size=8, val_split="", **kw)


def test_batches_carry_the_records_tags(data):
    cfg = _cfg(data)
    plan = tag_targets.for_head(train.make_plan(cfg), cfg, "label_weighted")
    info = json.loads((data / "records" / "dataset_info.json").read_text())
    assert plan.num_classes == info["tags"]["vocab_size"]
    assert plan.tag_width == info["tags"]["max_tags"] and plan.val_files == ()
    spec = train.train_input(cfg, plan, 32, 0)
    ctx = tf.distribute.InputContext(1, 0, 1)
    batch = next(iter(input_pipeline.train_dataset(spec, ctx)))
    assert batch["label"].shape == (8, plan.tag_width) and batch["label"].dtype == tf.int32
    tags = batch["label"].numpy()
    assert tags.max() < plan.num_classes and (tags >= 0).any()
    valid = tags >= 0
    assert np.all(valid[:, :-1] | ~valid[:, 1:])  # padding only at the end
    w = batch["weight"].numpy()
    np.testing.assert_allclose(w.sum(1)[valid.any(1)], 1.0, rtol=1e-5)
    assert np.all(w[~valid] == 0)


def test_tag_heads_refuse_records_without_tags_and_landmark_weighting(data, tmp_path):
    cfg = _cfg(data)
    with pytest.raises(UserError, match="class_weighting"):
        tag_targets.for_head(None, dataclasses.replace(cfg, class_weighting="log"), "multilabel")
    bare = tmp_path / "bare"
    convert.convert_dataset(convert.ConvertConfig(
        image_dir=str(data / "synth" / "train"), output_dir=str(bare),
        train_csv=str(data / "synth" / "train.csv"), num_shards=1), progress=False)
    with pytest.raises(UserError, match="attribution_csv"):
        train.train(ModelConfig(image_size=32, head="multilabel"),
                    dataclasses.replace(cfg, data_dir=str(bare), workdir=str(tmp_path / "w")))
    with pytest.raises(UserError, match="npairs_weight"):
        ModelConfig(head="multilabel", npairs_weight=0.1, num_classes=5).validate()


def _env(backend: str, tmp_path) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
               [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    if backend == "jax":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_tag_heads_train_resume_and_start_the_landmark_stage(data, tmp_path, backend):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tag_train_run.py"), "runs",
                           str(data / "records"), str(tmp_path)], env=_env(backend, tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for head in ("multilabel", "label_weighted"):
        assert results[head]["step"] == 4 and results[f"{head}_resumed"]["start_step"] == 2
        assert np.isfinite(results[head]["loss"]) and results[head]["loss"] > 0
        assert results[head]["backend"] == backend
        ref, res = np.load(tmp_path / f"{head}.npz"), np.load(tmp_path / f"{head}_resumed.npz")
        for k in ref.files:
            np.testing.assert_allclose(res[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # multilabel sums ~several tag cross-entropies per image, label_weighted averages them.
    assert results["multilabel"]["loss"] > results["label_weighted"]["loss"]
    stage = results["landmarks"]["init_from"]
    assert stage["restored"] == ["backbone", "neck"] and "head" in stage["skipped"]
    tagged, landmarks = np.load(tmp_path / "multilabel.npz"), np.load(tmp_path / "landmarks.npz")
    for k in tagged.files:
        np.testing.assert_array_equal(landmarks[k], tagged[k], err_msg=k)


def test_cli_stage_chain(data, tmp_path):
    env = _env("tensorflow", tmp_path)
    records = tmp_path / "records"
    subprocess.run([sys.executable, "-m", "landmark_tf.cli.tfrecords",
                    f"--train_csv={data}/synth/train.csv", f"--image_dir={data}/synth/train",
                    f"--output_dir={records}", "--num_shards=1", "--num_workers=1",
                    f"--attribution_csv={data}/synth/{titles.ATTRIBUTION_FILE}",
                    "--progress=false"], env=env, check=True, capture_output=True)

    def train_cli(*flags):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "tag_train_run.py"), "cli",
                               f"--data_dir={records}", "--image_size=32", "--embedding_dim=16",
                               "--batch_size=8", "--train_steps=1", "--val_split=", *flags],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    tags = train_cli("--head=multilabel", f"--workdir={tmp_path}/tags")
    assert tags["step"] == 1
    stage = train_cli("--head=cosface", f"--workdir={tmp_path}/landmarks",
                      f"--init_from={tmp_path}/tags")
    assert stage["init_from"]["restored"] == ["backbone", "neck"] and stage["step"] == 1
