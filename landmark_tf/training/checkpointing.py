"""The training workdir: its layout, the config conflict check, checkpoints and the run summary.

  WORKDIR/config.json       {"model": ModelConfig, "train": TrainConfig, "data": {...}}
  WORKDIR/checkpoints/      tf.train.CheckpointManager over model.make_checkpoint(
                            models, optimizer=..., step=...): ckpt-<step>.index/.data-*, checkpoint
  WORKDIR/logs/train/       TensorBoard: loss, accuracy, learning_rate, images_per_second
  WORKDIR/logs/val/         TensorBoard: accuracy (top-1, cosine head without margin)
  WORKDIR/summary.json      the closing JSON of the latest finished run or checkpoint

CheckpointManager writes the checkpoint files first and the `checkpoint` index file last, so a
kill -9 mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
from typing import Any

import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.config import RESUME_SAFE, ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones
from landmark_tf.modeling.model import CHECKPOINT_DIR, CONFIG_FILE, LandmarkModels

LOGS_DIR = "logs"
SUMMARY_FILE = "summary.json"


def workdir_config(model_cfg: ModelConfig, cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The config.json of a run."""
    data = {"data_dir": cfg.data_dir, "num_classes": num_classes,
            "image_size": model_cfg.image_size}
    return {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "data": data}


def conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'section.key: old -> new' for every difference that resuming cannot honour.

    A key that the old config.json lacks (a field added to the package since) counts as its
    default, which new fields keep equal to the earlier behaviour.
    """
    found = []
    defaults = {"model": ModelConfig().to_dict(), "train": TrainConfig().to_dict()}
    for section in ("model", "data", "train"):
        a, b = old.get(section) or {}, new.get(section) or {}
        a = {**_roundtrip({k: v for k, v in defaults.get(section, {}).items() if k in b}), **a}
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RESUME_SAFE:
                continue
            if a.get(key) != b.get(key):
                found.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return found


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
