"""Training end to end on tiny records: it learns, resumes exactly after kill -9, stages, errors."""

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import checkpoint_state
import numpy as np
import pytest
import tensorflow as tf
from tiny_dataset import make_dataset

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import model
from landmark_tf.training import checkpointing, tf_trainer, train

MODEL = ModelConfig(image_size=32, embedding_dim=32, margin=0.1)
STEPS, EVERY = 36, 6  # 6 epochs of 6 steps of 8 examples


def _config(data_dir, workdir, **kw) -> TrainConfig:
    args = dict(data_dir=data_dir, workdir=workdir, train_steps=STEPS, batch_size=8,
                learning_rate=0.05, schedule="constant", checkpoint_every=EVERY, val_split="",
                augment=["flip"], steps_per_execution=3)
    args.update(kw)
    return TrainConfig(**args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    make_dataset(out, train_counts=(12, 12, 12, 12), val_counts=(3, 3, 3, 3), size=32)
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run (with validation each epoch), shared by the tests below."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train.train(MODEL, _config(data, workdir, val_split="val"))
    return workdir, result


def _scalars(workdir: str, split: str, tag: str) -> list[float]:
    values = []
    for path in sorted(glob.glob(os.path.join(workdir, "logs", split, "*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            values += [float(tf.make_ndarray(v.tensor)) for v in event.summary.value
                       if v.tag == tag]
    return values


def _state(workdir: str) -> dict[str, np.ndarray]:
    """Every array of the latest checkpoint: weights, optimizer slots, step, dropout RNG."""
    return checkpoint_state.read_latest(workdir)


def test_tiny_model_learns_and_logs(reference):
    workdir, r = reference
    assert r["step"] == STEPS and r["start_step"] == 0
    losses = _scalars(workdir, "train", "loss")
    assert len(losses) == STEPS // 3  # one point per execution of 3 steps
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:2]), losses
    accuracy = _scalars(workdir, "train", "accuracy")
    assert np.mean(accuracy[-4:]) > 0.55, accuracy  # 4 classes: chance is 0.25
    assert _scalars(workdir, "train", "learning_rate")[-1] == pytest.approx(0.05)
    assert len(_scalars(workdir, "train", "images_per_second")) == STEPS // 3
    assert len(_scalars(workdir, "val", "accuracy")) == STEPS // EVERY  # once per epoch
    assert r["val_examples"] == 12 and 0.0 <= r["val_accuracy"] <= 1.0
    assert r["images_per_second"] > 0 and np.isfinite(r["loss"])
    assert r["train_step_compilations"] == 1  # the step is traced once for every execution
    assert r["checkpoint"].endswith(f"ckpt-{STEPS}")
    names = sorted(os.listdir(workdir))
    assert names == ["checkpoints", "config.json", "logs", "summary.json"]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    assert config["data"]["num_classes"] == 4 and config["model"]["num_classes"] == 4


def _latest_step(workdir: str) -> int:
    return checkpoint_state.latest_step(workdir)


def _assert_same_state(workdir: str, reference_workdir: str) -> None:
    resumed, uninterrupted = _state(workdir), _state(reference_workdir)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 500
    for key, value in uninterrupted.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-3, atol=1e-4, err_msg=key)


def test_resuming_from_a_checkpoint_reaches_the_same_weights(data, reference, tmp_path):
    """The workdir as a kill -9 right after the step-24 checkpoint leaves it, then a rerun."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    for path in glob.glob(os.path.join(ckpts, "ckpt-3[06]")):
        shutil.rmtree(path)
    shutil.rmtree(os.path.join(workdir, "logs"))
    result = train.train(MODEL, _config(data, workdir, val_split="val", steps_per_execution=1))
    assert result["step"] == STEPS and result["start_step"] == 24
    assert result["resumed_from"].endswith("ckpt-24")
    _assert_same_state(workdir, reference[0])
    # Steps 25..36 saw the same data as in the uninterrupted run: compare mean losses over
    # steps 25-30 and 31-36 (logged per step here, per 3 steps there).
    here, there = _scalars(workdir, "train", "loss"), _scalars(reference[0], "train", "loss")
    assert len(here) == 12 and len(there) == 12
    np.testing.assert_allclose([np.mean(here[:6]), np.mean(here[6:])],
                               [np.mean(there[8:10]), np.mean(there[10:])], rtol=1e-3)


def test_cli_rerun_of_a_finished_run_prints_its_json_last(data, reference, tmp_path):
    flagfile = tmp_path / "train.flags"
    flagfile.write_text(_flags(data, reference[0], val_split="val"))
    proc = subprocess.run([LANDMARK_TRAIN, f"--flagfile={flagfile}"], capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == STEPS and result["loss"] == pytest.approx(reference[1]["loss"])
    assert result["images_per_second"] == pytest.approx(reference[1]["images_per_second"])


LANDMARK_TRAIN = os.path.join(os.path.dirname(sys.executable), "landmark-train")


def _flags(data: str, workdir: str, val_split: str = "") -> str:
    """The flags that make the CLI run the same config as `_config`."""
    return "\n".join([
        f"--data_dir={data}", f"--workdir={workdir}", f"--train_steps={STEPS}",
        "--batch_size=8", "--learning_rate=0.05", "--schedule=constant",
        f"--checkpoint_every={EVERY}", f"--val_split={val_split}", "--augment=flip",
        "--steps_per_execution=3", "--image_size=32", "--embedding_dim=32", "--margin=0.1",
    ]) + "\n"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(data, reference, tmp_path):
    """landmark-train killed with SIGKILL mid-run, rerun with the same flagfile."""
    workdir = str(tmp_path / "run")
    flagfile = tmp_path / "train.flags"
    flagfile.write_text(_flags(data, workdir))
    command = [LANDMARK_TRAIN, f"--flagfile={flagfile}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _latest_step(workdir) < 2 * EVERY and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = _latest_step(workdir)
    assert 2 * EVERY <= killed_at < STEPS, "the first run should be killed mid-way"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert {"step", "loss", "images_per_second"} <= set(result)
    assert result["step"] == STEPS and result["start_step"] == killed_at
    assert result["resumed_from"].endswith(f"ckpt-{killed_at}")
    _assert_same_state(workdir, reference[0])
    # The steps after the checkpoint were recomputed on the same data: same logged losses.
    np.testing.assert_allclose(_scalars(workdir, "train", "loss")[-(STEPS - killed_at) // 3:],
                               _scalars(reference[0], "train", "loss")[killed_at // 3:],
                               rtol=1e-3)


def test_sigterm_saves_a_checkpoint_of_the_step_reached_then_resumes(data, tmp_path):
    """A preemption notice (SIGTERM) mid-run: the run checkpoints the step it reached (no
    periodic checkpoint is due), says how to resume and exits 130; a rerun resumes there."""
    workdir = str(tmp_path / "run")
    flagfile = tmp_path / "train.flags"
    flagfile.write_text(_flags(data, workdir).replace(f"--checkpoint_every={EVERY}",
                                                      "--checkpoint_every=1000"))
    command = [LANDMARK_TRAIN, f"--flagfile={flagfile}", "--steps_per_execution=1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 600
    while not glob.glob(os.path.join(workdir, "logs", "train", "*")) and first.poll() is None \
            and time.time() < deadline:
        time.sleep(0.1)  # the first step has run once its loss is logged
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err
    stopped_at = _latest_step(workdir)
    assert 1 <= stopped_at < STEPS
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["start_step"] == stopped_at and result["step"] == STEPS


def test_rerun_with_conflicting_config_is_an_error(data, reference):
    workdir, _ = reference
    with pytest.raises(UserError, match=r"train.learning_rate: 0.05 -> 0.2.*new --workdir"):
        train.train(MODEL, _config(data, workdir, val_split="val", learning_rate=0.2))


def test_a_finished_constant_schedule_run_extends_with_more_steps(data, reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    longer = train.train(MODEL, _config(data, workdir, val_split="val", train_steps=STEPS + 6))
    assert longer["start_step"] == STEPS and longer["step"] == STEPS + 6
    assert _latest_step(workdir) == STEPS + 6
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["train_steps"] == STEPS + 6


def test_a_cosine_run_cannot_be_extended(data, tmp_path):
    workdir = str(tmp_path / "cosine")
    os.makedirs(workdir)
    cfg = _config(data, workdir, schedule="cosine", train_steps=6)
    checkpointing.check_and_write_config(
        workdir, checkpointing.workdir_config(MODEL, cfg, 4))
    with pytest.raises(UserError, match=r"train.train_steps: 6 -> 12 \(the cosine schedule "
                                        r"depends on the total number of steps"):
        train.train(MODEL, dataclasses.replace(cfg, train_steps=12))


def test_finished_run_reruns_without_training(data, reference):
    workdir, first = reference
    again = train.train(MODEL, _config(data, workdir, val_split="val", steps_per_execution=1))
    assert again["step"] == STEPS and again["start_step"] == STEPS
    assert again["loss"] == first["loss"]


def test_next_stage_restores_backbone_and_matching_head(data, reference, tmp_path):
    workdir, _ = reference
    bigger = dataclasses.replace(MODEL, image_size=48)  # a higher-resolution stage
    cfg = _config(data, str(tmp_path / "stage2"), init_from=workdir)
    trainer = train.Run(dataclasses.replace(bigger, num_classes=4), cfg,
                            train.make_plan(cfg), tf.distribute.get_strategy())
    info = trainer.start_info["init_from"]
    assert info["restored"] == ["backbone", "head", "neck"] and not info["skipped"]
    source = _state(workdir)
    kernel = trainer.models.head.kernel.numpy()
    saved = [v for k, v in source.items() if k.startswith("head/") and v.shape == kernel.shape]
    assert len(saved) == 1
    np.testing.assert_array_equal(kernel, saved[0])
    restored, _ = model.restore_embedding_model(workdir)  # the exporter's view of the weights
    for mine, theirs in zip(trainer.models.embedding_model.weights, restored.weights,
                            strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)

    other = str(tmp_path / "five")
    make_dataset(other, train_counts=(4, 4, 4, 4, 4), val_counts=None, size=32)
    cfg5 = _config(other, str(tmp_path / "stage3"), init_from=workdir)
    five = train.Run(dataclasses.replace(bigger, num_classes=5), cfg5,
                         train.make_plan(cfg5), tf.distribute.get_strategy())
    assert five.start_info["init_from"]["skipped"]["head"].startswith("num_classes differs")


def _stage(data_dir: str, workdir: str, init_from: str) -> train.Run:
    cfg = _config(data_dir, workdir, init_from=init_from)
    return train.Run(dataclasses.replace(MODEL, num_classes=4), cfg, train.make_plan(cfg),
                         tf.distribute.get_strategy())


def test_init_from_refuses_a_head_of_another_label_map(data, reference, tmp_path):
    """Same class count, other landmarks behind the class numbers: the head must not be kept."""
    with open(os.path.join(reference[0], "config.json")) as f:
        assert len(json.load(f)["data"]["label_map_sha256"]) == 64
    assert _stage(data, str(tmp_path / "same"), reference[0]).start_info["init_from"][
        "label_map"] == "same"
    other = str(tmp_path / "other")
    shutil.copytree(data, other)
    with open(os.path.join(other, "label_map.csv"), "w") as f:
        f.write("label,landmark_id,count\n" + "".join(f"{i},{2000 + i},12\n" for i in range(4)))
    with pytest.raises(UserError, match=r"--init_from .*another label_map.csv \(sha256 ") as e:
        _stage(other, str(tmp_path / "w"), reference[0])
    assert "\n" not in str(e.value)


def test_init_from_an_older_workdir_without_the_digest_warns_and_continues(
        data, reference, tmp_path, caplog):
    older = str(tmp_path / "older")
    shutil.copytree(reference[0], older)
    path = os.path.join(older, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["data"]["label_map_sha256"]
    with open(path, "w") as f:
        json.dump(config, f)
    with caplog.at_level("WARNING"):
        info = _stage(data, str(tmp_path / "w"), older).start_info["init_from"]
    assert info["label_map"] == "unchecked" and "head" in info["restored"]
    assert "cannot check that class numbers mean the same landmarks" in caplog.text
    # Resuming the older workdir itself is no config conflict either.
    again = train.train(MODEL, _config(data, older, val_split="val"))
    assert again["step"] == STEPS


@pytest.mark.parametrize("change, message", [
    (dict(data_dir="/nonexistent"), "dataset_info.json not found"),
    (dict(train_split="test"), "split 'test' not in"),
    (dict(grad_accum_steps=3), "does not split over 1 replica"),
    (dict(train_steps=-1), "--train_steps=-1: must be >= 0"),
    (dict(train_steps=4, epochs=1.0), "give --train_steps or --epochs, not both"),
    (dict(batch_size=64), "exceeds the 48 examples"),
    (dict(sampling="sqrt"), "--sampling=sqrt"),
    (dict(init_from="/nonexistent/run"), "config.json: not found"),
])
def test_bad_input_is_a_user_error(data, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        train.train(MODEL, dataclasses.replace(_config(data, str(tmp_path / "w")), **change))


@pytest.mark.parametrize("model_cfg, message", [
    (ModelConfig(backbone="resnet50"), "backbone must be one of"),
    (ModelConfig(head="triplet"), "head must be one of"),
])
def test_unknown_backbone_or_head_is_a_user_error(data, tmp_path, model_cfg, message):
    with pytest.raises(UserError, match=message):
        train.train(model_cfg, _config(data, str(tmp_path / "w")))


def test_epochs_set_the_number_of_steps(data, tmp_path):
    plan = train.make_plan(_config(data, str(tmp_path), train_steps=0, epochs=1.5))
    assert plan.steps_per_epoch == 6 and plan.train_steps == 9 and plan.num_classes == 4


def test_loss_weights_are_normalised_after_the_not_clean_factor(tmp_path):
    out = str(tmp_path / "nc")
    make_dataset(out, train_counts=(6, 3, 9), val_counts=None, size=32, not_clean_every=2)
    cfg = _config(out, str(tmp_path / "w"), class_weighting="log", not_clean_weight=0.5)
    plan = train.make_plan(cfg)
    assert sum(plan.not_clean_counts) == 9  # every second of the 18 examples
    w = train.loss_weights(cfg, plan)
    n, u = np.array(plan.class_counts), np.array(plan.not_clean_counts)
    assert np.dot(w, n - u + 0.5 * u) / n.sum() == pytest.approx(1.0, rel=1e-6)
    assert train.loss_weights(dataclasses.replace(cfg, class_weighting="none",
                                                  not_clean_weight=1.0), plan) is None
    old = dataclasses.replace(plan, not_clean_counts=None)  # records from before the field
    with pytest.raises(UserError, match="no not_clean_class_counts"):
        train.loss_weights(cfg, old)
    assert train.loss_weights(dataclasses.replace(cfg, not_clean_weight=1.0), old) is not None
    ones = dataclasses.replace(plan, class_counts=[6, 1, 9])
    with pytest.raises(UserError, match="log_unshifted.*one example"):
        train.loss_weights(dataclasses.replace(cfg, class_weighting="log_unshifted"), ones)


def test_sync_bn_neck_refuses_what_tensorflow_cannot_synchronise():
    sync = ModelConfig(neck="dense_syncbn")
    cfg = TrainConfig(grad_accum_steps=2)
    with pytest.raises(UserError, match="grad_accum_steps=2 over 2 replicas"):
        tf_trainer.check_sync_bn(sync, cfg, 2, "tpu", "auto")
    with pytest.raises(UserError, match="jit_compile=on on CPU replicas"):
        tf_trainer.check_sync_bn(sync, TrainConfig(), 2, "cpu", "on")
    tf_trainer.check_sync_bn(sync, cfg, 1, "cpu", "on")  # one replica: plain batch norm
    tf_trainer.check_sync_bn(ModelConfig(), cfg, 2, "cpu", "on")
    tf_trainer.check_sync_bn(sync, TrainConfig(), 2, "gpu", "on")


def test_winner_options_train_end_to_end(data, tmp_path):
    """dense+swish neck, per-batch AdaCos, inverse-time decay, log_unshifted weights: the real
    trainer runs them and logs the decayed learning rate."""
    winner = dataclasses.replace(MODEL, neck="dense", neck_activation="swish",
                                 head="adacos_per_batch", margin=0.0, scale=None)
    cfg = _config(data, str(tmp_path / "w"), train_steps=6, schedule="inverse_time",
                  lr_decay=0.1, weight_decay=0.0, class_weighting="log_unshifted")
    result = train.train(winner, cfg)
    assert result["step"] == 6 and np.isfinite(result["loss"])
    assert _scalars(str(tmp_path / "w"), "train", "learning_rate")[-1] == pytest.approx(
        0.05 / (1 + 0.1 * 6), rel=1e-5)  # logged after 6 updates: the next step's rate


def test_zero_steps_checkpoint_the_initialisation_and_export(data, tmp_path):
    """--train_steps=0: the random initialisation of `seed` is the run's checkpoint (step 0,
    validated), and it exports to the descriptors of a freshly built model of that seed."""
    from landmark_tf.serving import export

    workdir = str(tmp_path / "init")
    r = train.train(MODEL, _config(data, workdir, train_steps=0, val_split="val", seed=3))
    assert r["step"] == 0 and r["train_steps"] == 0 and r["loss"] is None
    assert r["checkpoint"].endswith("ckpt-0") and r["val_examples"] == 12
    assert _scalars(workdir, "val", "accuracy") == [pytest.approx(r["val_accuracy"])]
    again = train.train(MODEL, _config(data, workdir, train_steps=0, val_split="val", seed=3))
    assert again["step"] == 0 and again["checkpoint"] == r["checkpoint"]  # a rerun is a no-op

    out = export.export_model(export.ExportConfig(workdir=workdir,
                                                  export_dir=str(tmp_path / "export")))
    served = tf.saved_model.load(out["export_dir"])
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = np.stack([served.signatures["serving_default"](input_image=tf.constant(i))[
        "global_descriptor"].numpy() for i in images])
    import keras
    keras.utils.set_random_seed(3)  # what the trainer does before building its models
    fresh = model.build_models(dataclasses.replace(MODEL, num_classes=4))
    want = fresh.embedding_model(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_bn_momentum_reaches_every_batchnorm(data, tmp_path):
    cfg = _config(data, str(tmp_path / "w"), bn_momentum=0.9)
    trainer = train.Run(dataclasses.replace(MODEL, num_classes=4), cfg, train.make_plan(cfg),
                            tf.distribute.get_strategy())
    import keras
    bns = [la for la in trainer.models.train_model._flatten_layers()
           if isinstance(la, keras.layers.BatchNormalization)]
    assert len(bns) > 40 and {la.momentum for la in bns} == {0.9}  # backbone and neck


def test_a_field_missing_from_an_old_config_counts_as_its_default():
    from landmark_tf.training import checkpointing

    assert checkpointing.conflicts({"train": {}}, {"train": {"bn_momentum": 0.99}}) == []
    assert checkpointing.conflicts({"train": {}}, {"train": {"bn_momentum": 0.9}}) == [
        "train.bn_momentum: 0.99 -> 0.9"]


def test_out_of_memory_is_one_line_naming_the_step_size():
    cfg = TrainConfig(data_dir="d", workdir="w", batch_size=64, grad_accum_steps=2)
    oom = r"out of memory with --batch_size=64, --grad_accum_steps=2, --image_size=512"
    with pytest.raises(UserError, match=oom), train._out_of_memory_is_a_user_error(cfg, 512):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 29742274560 bytes.")
    with pytest.raises(UserError, match=oom), train._out_of_memory_is_a_user_error(cfg, 512):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    # anything else passes through unchanged
    with pytest.raises(ValueError, match="other"), train._out_of_memory_is_a_user_error(cfg, 512):
        raise ValueError("other")


def test_automatic_accumulation_is_refused_under_tensorflow(tmp_path):
    cfg = TrainConfig(workdir=str(tmp_path), train_steps=1, grad_accum_steps=0,
                      backend="tensorflow")
    with pytest.raises(UserError, match="--grad_accum_steps=auto plans from XLA"):
        train.Run(ModelConfig(num_classes=4), cfg, plan=None)
