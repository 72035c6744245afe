"""Training checkpoints: one format for both Keras backends, in Keras's own weights files.

  WORKDIR/checkpoints/ckpt-<step>/
    backbone.weights.h5  neck.weights.h5  head.weights.h5   each part's variables
    optimizer.weights.h5                                     optimizer.variables
    state.json                                               format, step, backend, data
                                                             position, dropout seed states

The weights files are Keras 3's `.weights.h5` (keras saving_lib, what `Model.save_weights`
writes): a variable is keyed by its layer's structural path (`layers/batch_normalization_3/
vars/0`: class names and order within the parent, not the process-global name counters), and
loading a file into a different model fails on the first count or shape mismatch instead of
filling weights in the wrong places. They are written and read the same way under TensorFlow
and JAX, so a workdir trained on one backend resumes, exports and embeds on the other. The
optimizer's variables follow the order of the trainable variables, which the model files pin.
Keras does not save SeedGenerator states; they are in state.json (count-checked).

Atomic: a checkpoint is built in a sibling `ckpt-<step>.partial-*` folder and renamed (local
disks); on object stores (gs://, no atomic rename) the weights are copied first and state.json
last, so "state.json exists" means complete either way. Only the chief (process 0) writes:
every value is replicated, so the other hosts have nothing of their own to add.

Workdirs from earlier versions hold `ckpt-<step>.index/.data-*` (tf.train.Checkpoint) or
`ckpt-<step>.npz` files; `find` and `restore_parts` still read both (see legacy_checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from landmark_tf import fileio
from landmark_tf.errors import UserError

FORMAT = "landmark-tf/keras-weights-checkpoint/v1"
PARTS = ("backbone", "neck", "head")
STATE_FILE = "state.json"
OPTIMIZER = "optimizer"
_DIR_NAME = re.compile(r"^ckpt-(\d+)$")
KINDS = ("keras", "npz", "tensorflow")  # this format, then the two legacy ones


@dataclasses.dataclass(frozen=True)
class Found:
    """A checkpoint in a checkpoints/ folder: its path, format kind (KINDS) and step."""

    path: str
    kind: str
    step: int


def weights_file(path: str, part: str) -> str:
    return fileio.join(path, f"{part}.weights.h5")


def list_complete(directory: str) -> list[Found]:
    """This format's complete checkpoints in `directory`, oldest first."""
    if not fileio.exists(directory):
        return []
    import tensorflow as tf

    found = []
    for name in tf.io.gfile.listdir(directory):
        match = _DIR_NAME.match(name.rstrip("/"))
        path = fileio.join(directory, name.rstrip("/"))
        if match and fileio.exists(fileio.join(path, STATE_FILE)):
            found.append(Found(path, "keras", int(match.group(1))))
    return sorted(found, key=lambda f: f.step)


def find(directory: str) -> Found | None:
    """The newest checkpoint in `directory` in any format this package wrote, or None."""
    from landmark_tf.modeling import legacy_checkpoints

    candidates = list_complete(directory)[-1:] + legacy_checkpoints.find(directory)
    return max(candidates, key=lambda f: (f.step, f.kind == "keras"), default=None)


def seed_states(net) -> list:
    """The state variables of the Keras SeedGenerators (dropout, stochastic depth) in `net`,
    in layer order: Keras's weights files leave them out, so resumed runs would draw other
    masks."""
    return [g.state for layer in net._flatten_layers() for g in getattr(
        layer, "_seed_generators", [])]


def save(directory: str, step: int, parts: dict[str, Any], optimizer, seeds: Sequence[Any],
         meta: dict[str, Any], chief: bool = True) -> str:
    """Writes ckpt-<step> under `directory`; returns its path.

    parts: {"backbone": keras.Model, "neck": layer, "head": layer (optional)}; the variables
    must hold the state to save (the JAX trainer writes its jit state back first). meta goes
    into state.json (JSON-serialisable: backend, data position, ...).
    """
    path = fileio.join(directory, f"ckpt-{int(step)}")
    if not chief:
        return path
    from keras.src.saving import saving_lib

    state = {"format": FORMAT, "step": int(step), **meta, "parts": sorted(parts),
             "seed_states": [np.asarray(_host(s)).tolist() for s in seeds]}
    local = "://" not in directory
    fileio.makedirs(directory)
    staging = (f"{path}.partial-{uuid.uuid4().hex[:8]}" if local
               else tempfile.mkdtemp(prefix="landmark_tf_ckpt_"))
    try:
        os.makedirs(staging, exist_ok=True)
        objects = {**parts, OPTIMIZER: optimizer} if optimizer is not None else dict(parts)
        for name, obj in objects.items():
            saving_lib.save_weights_only(obj, os.path.join(staging, f"{name}.weights.h5"))
        with open(os.path.join(staging, STATE_FILE), "w") as f:
            json.dump(state, f)
        if local:
            if os.path.exists(path):  # a rerun of the same step: replace it whole
                shutil.rmtree(path)
            os.rename(staging, path)
        else:
            _publish(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _publish(staging: str, path: str) -> None:
    """Copies a staged checkpoint to an object store, state.json last (the commit mark)."""
    import tensorflow as tf

    fileio.makedirs(path)
    names = sorted(os.listdir(staging), key=lambda n: n == STATE_FILE)
    for name in names:
        tf.io.gfile.copy(os.path.join(staging, name), fileio.join(path, name), overwrite=True)


def _host(value):
    value = getattr(value, "value", value)
    shards = getattr(value, "addressable_shards", None)
    if shards is not None and getattr(value, "is_fully_replicated", False):
        value = shards[0].data  # a multi-host replicated array is not fully addressable
    return value


def prune(directory: str, keep: int, chief: bool = True) -> None:
    """Deletes all but the newest `keep` complete checkpoints and stale partial folders."""
    if not chief or not fileio.exists(directory):
        return
    import tensorflow as tf

    for old in list_complete(directory)[:-keep]:
        tf.io.gfile.rmtree(old.path)
    for name in tf.io.gfile.listdir(directory):
        if ".partial-" in name:
            tf.io.gfile.rmtree(fileio.join(directory, name.rstrip("/")))


def read_state(path: str) -> dict[str, Any]:
    state = fileio.read_json(fileio.join(path, STATE_FILE))
    if state.get("format") != FORMAT:
        raise UserError(f"{path}: format {state.get('format')!r}, expected {FORMAT!r}")
    return state


def load_part(path: str, part: str, obj) -> None:
    """Loads one part (or the optimizer) of the checkpoint at `path` into `obj`."""
    from keras.src.saving import saving_lib

    file = weights_file(path, part)
    if not fileio.exists(file):
        raise UserError(f"checkpoint {path} has no {part}")
    try:
        saving_lib.load_weights_only(obj, file)
    except ValueError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"checkpoint {path}: its {part} does not fit this run's model (a "
                        f"different model config): {' '.join(first[:3])[:400]}") from None


def restore_seeds(path: str, state: dict[str, Any], seeds: Sequence[Any]) -> None:
    saved = state.get("seed_states", [])
    if len(saved) != len(seeds):
        raise UserError(f"checkpoint {path}: {len(saved)} dropout seed states, this model has "
                        f"{len(seeds)}: a different model config")
    for value, var in zip(saved, seeds, strict=True):
        var.assign(np.asarray(value, dtype=var.dtype))


def fingerprint(found: Found) -> str:
    """sha256 over the checkpoint's small identifying file (state.json, the TF index, or the
    npz file's size and step): what changes when the weights change."""
    digest = hashlib.sha256(f"{found.kind}:{found.step}:".encode())
    if found.kind == "keras":
        digest.update(fileio.read_bytes(fileio.join(found.path, STATE_FILE)))
        for part in (*PARTS, OPTIMIZER):
            file = weights_file(found.path, part)
            if fileio.exists(file):
                import tensorflow as tf

                digest.update(f"{part}:{tf.io.gfile.stat(file).length}".encode())
    elif found.kind == "tensorflow":
        digest.update(fileio.read_bytes(found.path + ".index"))
    else:
        import tensorflow as tf

        digest.update(str(tf.io.gfile.stat(found.path).length).encode())
    return digest.hexdigest()
