"""The training workdir: its layout, and the way from an export back to the run that made it.

  WORKDIR/config.json     {"model": ModelConfig, "train": TrainConfig, "data": {...}}
  WORKDIR/checkpoints/    ckpt-<step>/ (modeling/checkpoint; earlier versions: ckpt-<step>.npz
                          or tf.train.Checkpoint files)
  WORKDIR/logs/train/     TensorBoard: loss, accuracy, learning_rate, images_per_second
  WORKDIR/logs/val/       TensorBoard: accuracy (top-1, cosine head without margin)
  WORKDIR/logs/retrieval/ TensorBoard: map@100 of the retrieval validation
  WORKDIR/summary.json    the closing JSON of the latest finished run or checkpoint
  EXPORT/metadata.json    beside an export's saved_model.pb; names the checkpoint it came from

Every stage that reads a workdir (train's resume and --init_from, export, embed --workdir)
goes through here, under either Keras backend.
"""

from __future__ import annotations

from typing import Any

from landmark_tf import fileio
from landmark_tf.config import ModelConfig
from landmark_tf.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"
SUMMARY_FILE = "summary.json"
METADATA_FILE = "metadata.json"


def checkpoints_dir(workdir: str) -> str:
    return fileio.join(workdir, CHECKPOINT_DIR)


def read_config(workdir: str) -> dict[str, Any]:
    path = fileio.join(workdir, CONFIG_FILE)
    if not fileio.exists(path):
        raise UserError(f"{path}: not found; is {workdir} a landmark-train workdir?")
    config = fileio.read_json(path)
    if not isinstance(config, dict) or "model" not in config:
        raise UserError(f"{path}: has no \"model\" section")
    return config


def read_model_config(workdir: str) -> ModelConfig:
    """The ModelConfig saved under "model" in workdir/config.json."""
    return ModelConfig.from_dict(read_config(workdir)["model"])


def latest_checkpoint(workdir: str):
    """The newest checkpoint of `workdir` (a modeling.checkpoint.Found); UserError when none."""
    from landmark_tf.modeling import checkpoint

    found = checkpoint.find(checkpoints_dir(workdir))
    if found is None:
        raise UserError(f"no checkpoint in {checkpoints_dir(workdir)}")
    return found


def resolve(path: str, flag: str = "--workdir") -> str:
    """A workdir as given, or the workdir an export of ours was made from (its metadata.json
    names the checkpoint, which lies in WORKDIR/checkpoints/)."""
    if fileio.exists(fileio.join(path, CONFIG_FILE)):
        return path
    meta_path = fileio.join(path, METADATA_FILE)
    if fileio.exists(meta_path):
        checkpoint = fileio.read_json(meta_path).get("checkpoint") or ""
        workdir = checkpoint.rsplit("/" + CHECKPOINT_DIR + "/", 1)[0]
        if checkpoint and fileio.exists(fileio.join(workdir, CONFIG_FILE)):
            return workdir
        raise UserError(f"{flag} {path}: an export whose training workdir ({workdir}) is gone")
    raise UserError(f"{flag} {path}: no {CONFIG_FILE} (not a landmark-train workdir)")


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    fileio.write_json_atomic(fileio.join(workdir, SUMMARY_FILE), summary)


def read_summary(workdir: str) -> dict[str, Any]:
    path = fileio.join(workdir, SUMMARY_FILE)
    return fileio.read_json(path) if fileio.exists(path) else {}
