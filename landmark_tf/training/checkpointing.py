"""A run's bookkeeping in its workdir (layout: landmark_tf/workdir.py): config.json and the
conflict check on reruns, the label-map check of `--init_from`, and the checkpoint manager.

Checkpoints (modeling/checkpoint) are written synchronously: a kill -9 mid-save leaves the
previous checkpoint as the latest one. TF's async checkpointing is not used: it needs
tf.train.Checkpoint, and with Keras 3 variables it failed on the second save anyway.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from typing import Any

from absl import logging

from landmark_tf import fileio, workdir
from landmark_tf.config import RESUME_SAFE, ModelConfig, TrainConfig
from landmark_tf.data import provenance, records
from landmark_tf.errors import UserError
from landmark_tf.modeling import checkpoint
from landmark_tf.workdir import CONFIG_FILE


def workdir_config(model_cfg: ModelConfig, cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The config.json of a run; data.label_map_sha256 names what each class number means."""
    data = {"data_dir": cfg.data_dir, "num_classes": num_classes,
            "image_size": model_cfg.image_size,
            LABEL_MAP_KEY: label_map_digest(cfg.data_dir),
            provenance.KEY: provenance.of_data_dir(cfg.data_dir)}
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
        a = {**_roundtrip({k: v for k, v in defaults.get(section, {}).items() if k in b}), **a}
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RESUME_SAFE:
                continue
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


class CheckpointManager:
    """Saves (chief only), prunes and finds a run's checkpoints, for either backend.

    trainer: the BackendTrainer (its `sync` runs before each save); models / optimizer / seeds:
    what a checkpoint holds; meta: facts for state.json (backend, seed).
    """

    def __init__(self, run_workdir: str, keep: int, trainer, models, optimizer, seeds: list,
                 meta: dict[str, Any]):
        self.directory = workdir.checkpoints_dir(run_workdir)
        self.keep, self.trainer = keep, trainer
        self.models, self.optimizer, self.seeds, self.meta = models, optimizer, seeds, meta
        self.latest = checkpoint.find(self.directory)

    def save(self, step: int) -> str:
        """Writes ckpt-<step>; returns its path."""
        self.trainer.sync()
        parts = {p: getattr(self.models, p) for p in checkpoint.PARTS}
        # The data order is a function of (seed, step): the step is the data position.
        meta = {**self.meta, "data_position": {"step": int(step), "seed": self.meta.get("seed")}}
        with _no_distribution():
            path = checkpoint.save(self.directory, step, parts, self.optimizer, self.seeds,
                                   meta, self.trainer.chief)
        checkpoint.prune(self.directory, self.keep, self.trainer.chief)
        self.latest = checkpoint.Found(path, "keras", int(step))
        return path


@contextlib.contextmanager
def _no_distribution():
    """Keras's weights writer builds throwaway variables (saving_lib's attribute skip sets):
    under a multi-process JAX distribution each would be a collective that only the writing
    process enters, and it would wait for the others forever. Without one they stay local."""
    import keras

    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)
