"""The training workdir: its layout, the config conflict check, checkpoints and the run summary.

  WORKDIR/config.json       {"model": ModelConfig, "train": TrainConfig, "data": {...}}
  WORKDIR/checkpoints/      tf.train.CheckpointManager over model.make_checkpoint(
                            models, optimizer=..., step=...): ckpt-<step>.index/.data-*, checkpoint
  WORKDIR/logs/train/       TensorBoard: loss, accuracy, learning_rate, images_per_second
  WORKDIR/logs/val/         TensorBoard: accuracy (top-1, cosine head without margin)
  WORKDIR/summary.json      the closing JSON of the latest finished run or checkpoint

CheckpointManager writes the checkpoint files first and the `checkpoint` index file last, so a
kill -9 mid-save leaves the previous checkpoint as the latest one. Saves are synchronous (see
`save_options` for why not async).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import Any

import tensorflow as tf
from absl import logging

from landmark_tf import fileio
from landmark_tf.config import RESUME_SAFE, ModelConfig, TrainConfig
from landmark_tf.data import records
from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones
from landmark_tf.modeling.model import CHECKPOINT_DIR, CONFIG_FILE, LandmarkModels

LOGS_DIR = "logs"
SUMMARY_FILE = "summary.json"


def workdir_config(model_cfg: ModelConfig, cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The config.json of a run; data.label_map_sha256 names what each class number means."""
    data = {"data_dir": cfg.data_dir, "num_classes": num_classes,
            "image_size": model_cfg.image_size,
            LABEL_MAP_KEY: label_map_digest(cfg.data_dir)}
    return {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "data": data}


LABEL_MAP_KEY = "label_map_sha256"


def label_map_digest(data_dir: str) -> str | None:
    """sha256 of the (label, landmark_id) pairs of data_dir/label_map.csv; None without one.

    The count column is left out: it does not change which landmark a head row stands for
    (stages on the same classes with other images keep the same digest).
    """
    path = fileio.join(data_dir, records.LABEL_MAP)
    if not fileio.exists(path):
        return None
    rows = csv.reader(io.StringIO(fileio.read_text(path)))
    header = next(rows, [])
    try:
        cols = header.index("label"), header.index("landmark_id")
    except ValueError:
        raise UserError(f"{path}: header {header} lacks label and landmark_id") from None
    digest = hashlib.sha256()
    for row in rows:
        if row:
            digest.update(f"{row[cols[0]]},{row[cols[1]]}\n".encode())
    return digest.hexdigest()


def check_head_labels(workdir_from: str, digest: str | None) -> str:
    """Before keeping a head restored from `workdir_from`: 'same' label maps, or 'unchecked'
    (with a warning) when either side has no digest; UserError when they differ."""
    path = fileio.join(workdir_from, CONFIG_FILE)
    theirs = (fileio.read_json(path).get("data") or {}).get(LABEL_MAP_KEY)
    if theirs is None or digest is None:
        logging.warning("--init_from %s: %s has no label map digest (written before it was "
                        "recorded, or no label_map.csv): cannot check that class numbers mean the "
                        "same landmarks; restoring the head anyway", workdir_from,
                        path if theirs is None else "this run's data")
        return "unchecked"
    if theirs != digest:
        raise UserError(
            f"--init_from {workdir_from}: its head has as many classes as this run's but was "
            f"trained on another label_map.csv (sha256 {theirs[:12]}... vs {digest[:12]}...): "
            "the same class numbers are other landmarks; start from a workdir of the same "
            "label map, or use a --data_dir whose class count differs so only backbone and neck "
            "are restored")
    return "same"


def conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'section.key: old -> new' for every difference that resuming cannot honour.

    A key that the old config.json lacks (a field added to the package since) counts as its
    default, which new fields keep equal to the earlier behaviour.
    """
    found = []
    defaults = {"model": ModelConfig().to_dict(), "train": TrainConfig().to_dict()}
    for section in ("model", "data", "train"):
        a, b = old.get(section) or {}, new.get(section) or {}
        # backend: stored resolved ("tensorflow"/"jax"); a workdir without it ran TensorFlow.
        a = {**_roundtrip({k: v for k, v in defaults.get(section, {}).items()
                           if k in b and k != "backend"}), **a}
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RESUME_SAFE:
                continue
            if section == "train" and key == "backend":  # older workdirs: TensorFlow ran
                a, b = {**a, key: a.get(key, "tensorflow")}, {**b, key: b.get(key, "tensorflow")}
            if section == "data" and key == LABEL_MAP_KEY and key not in a:
                continue  # a workdir from before the digest was recorded
            if a.get(key) == b.get(key):
                continue
            change = f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}"
            if section == "train" and key in _LENGTH_KEYS:
                schedule = b.get("schedule")
                if schedule in EXTENDABLE_SCHEDULES:
                    continue
                change += (f" (the {schedule} schedule depends on the total number of steps: "
                           "the steps already taken would have had other learning rates; runs "
                           f"with {' or '.join(sorted(EXTENDABLE_SCHEDULES))} schedules can be "
                           "extended, or start a new --workdir with --init_from)")
            found.append(change)
    return found


# Schedules whose learning rate at a step does not depend on the run's length: a finished run
# can be extended (or cut) by rerunning with another --train_steps / --epochs.
EXTENDABLE_SCHEDULES = frozenset({"constant", "inverse_time"})
_LENGTH_KEYS = ("train_steps", "epochs")


def check_and_write_config(workdir: str, config: dict[str, Any], chief: bool = True) -> bool:
    """Writes workdir/config.json; True when it already existed (a rerun).

    A rerun must have the same config up to RESUME_SAFE keys, else UserError.
    """
    path = fileio.join(workdir, CONFIG_FILE)
    existed = fileio.exists(path)
    if existed:
        found = conflicts(fileio.read_json(path), _roundtrip(config))
        if found:
            more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
            raise UserError(
                f"{path} was written by a run with a different config: {'; '.join(found[:3])}"
                f"{more}. Rerun with the same flags to resume, or use a new --workdir"
            )
    if chief:
        fileio.makedirs(workdir)
        fileio.write_json_atomic(path, config)
    return existed


def _roundtrip(config: dict[str, Any]) -> dict[str, Any]:
    """Compares as JSON stores it (tuples become lists)."""
    return json.loads(json.dumps(config))


def manager(
    checkpoint: tf.train.Checkpoint, workdir: str, keep: int, chief: bool, task_id: int = 0
) -> tf.train.CheckpointManager:
    """CheckpointManager on workdir/checkpoints; non-chief workers write to a scratch folder
    (MultiWorkerMirroredStrategy needs every worker to take part in saving)."""
    directory = fileio.join(workdir, CHECKPOINT_DIR)
    if not chief:
        directory = fileio.join(workdir, "tmp", f"worker-{task_id}")
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)


def save_options(strategy: tf.distribute.Strategy) -> tf.train.CheckpointOptions:
    """Synchronous saves, for now.

    TF's async checkpointing (CheckpointOptions(experimental_enable_async_checkpoint=True)) would
    let training go on while the files are written, but with Keras 3.15 variables it fails on
    the second save on TF 2.20 and 2.21: `KerasVariable._copy_trackable_to_cpu` creates a new
    tf.Variable on every call, inside AsyncCheckpointHelper's tf.function, which allows variables
    on the first call only (tests/test_train.py pins this). Kept as one switch for when it works.
    """
    del strategy  # async would also be off under MultiWorkerMirroredStrategy (collective saves)
    return tf.train.CheckpointOptions(experimental_enable_async_checkpoint=ASYNC_CHECKPOINTS)


ASYNC_CHECKPOINTS = False


def restore_latest(
    checkpoint: tf.train.Checkpoint, workdir: str, models: LandmarkModels
) -> str | None:
    """Restores workdir's newest checkpoint into `checkpoint`; returns its path (None if none)."""
    path = tf.train.latest_checkpoint(fileio.join(workdir, CHECKPOINT_DIR))
    if path is None:
        return None
    status = checkpoint.restore(path)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise UserError(f"checkpoint {path} does not match this run's model: {e}") from e
    backbones.refresh_normalization(models.backbone)
    return path


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    fileio.write_json_atomic(fileio.join(workdir, SUMMARY_FILE), summary)


def read_summary(workdir: str) -> dict[str, Any]:
    path = fileio.join(workdir, SUMMARY_FILE)
    return fileio.read_json(path) if fileio.exists(path) else {}
