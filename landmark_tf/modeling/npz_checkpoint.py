"""The backend-neutral checkpoint: every variable as a NumPy array in one `.npz` per step.

The JAX trainer writes it; every reader (resume, `--init_from`, export, embed) reads it under
either Keras backend, so a model trained with JAX exports from a TensorFlow process.

  WORKDIR/checkpoints/ckpt-<step>.npz
    backbone/0000 .. backbone/NNNN   the backbone's `variables` in Keras order (weights,
                                     BatchNorm statistics, dropout seed states)
    neck/0000 ..., head/0000 ...     the same for the neck and the head
    optimizer/0000 ...               `optimizer.variables` (iterations, learning rate, momenta)
    meta                             JSON: format, step, backend, data position, variable paths

Keys are positions, not Keras paths: paths carry global name counters ("seed_generator_3") that
differ between processes, while the order of `layer.variables` is fixed by the model code. The
paths are stored for error messages; shapes are checked on restore. Data position: the input
order is a function of (seed, step) (see training/input_pipeline.py), so the step is the data
position; it is stored again under meta["data_position"].

Writes are atomic: the file is written under a temporary name and renamed (on gs:// a copy,
whose object appears only when complete); "ckpt-<step>.npz exists" means complete. Variables are
float32 under every mixed-precision policy, so no bfloat16 arrays reach the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from landmark_tf.errors import UserError

FORMAT = "landmark-tf/npz-checkpoint/v1"
PARTS = ("backbone", "neck", "head")
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{int(step)}.npz")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the complete npz checkpoints in `directory`, oldest first."""
    from landmark_tf import fileio

    if not fileio.exists(directory):
        return []
    import tensorflow as tf

    found = []
    for name in tf.io.gfile.listdir(directory):
        match = _NAME.match(name.rstrip("/"))
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name.rstrip("/"))))
    return sorted(found)


def latest(directory: str) -> str | None:
    """The newest complete npz checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def values(variables: Sequence[Any]) -> list[np.ndarray]:
    """Host copies of Keras variables (or backend arrays), replicated arrays read once."""
    out = []
    for v in variables:
        value = getattr(v, "value", v)
        shards = getattr(value, "addressable_shards", None)
        if shards is not None and getattr(value, "is_fully_replicated", False):
            value = shards[0].data  # one replica; a multi-host array is not fully addressable
        out.append(np.asarray(value))
    return out


def save(path: str, parts: dict[str, Sequence[Any]], meta: dict[str, Any]) -> None:
    """Writes `parts` ({"backbone": variables, ..., "optimizer": variables}) and meta atomically.

    Parts hold Keras variables or arrays; meta must be JSON-serialisable.
    """
    from landmark_tf import fileio

    arrays: dict[str, np.ndarray] = {}
    paths: dict[str, list[str]] = {}
    for part, variables in parts.items():
        for i, value in enumerate(values(variables)):
            arrays[f"{part}/{i:04d}"] = value
        paths[part] = [getattr(v, "path", str(i)) for i, v in enumerate(variables)]
    meta = {"format": FORMAT, **meta, "paths": paths}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    folder = os.path.dirname(path)
    fileio.makedirs(folder)
    if "://" not in path:
        with fileio.removed_on_failure(fileio.tmp_name(path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        return
    import tensorflow as tf

    local_dir = tempfile.mkdtemp(prefix="landmark_tf_ckpt_")
    try:
        local = os.path.join(local_dir, "ckpt.npz")
        with open(local, "wb") as f:
            np.savez(f, **arrays)
        with fileio.removed_on_failure(fileio.tmp_name(path)) as tmp:
            tf.io.gfile.copy(local, tmp, overwrite=True)
            tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


class Reader:
    """An opened npz checkpoint (local or gs://, copied to a local temporary file first)."""

    def __init__(self, path: str):
        self.path = path
        self._tmpdir = None
        local = path
        if "://" in path:
            import tensorflow as tf

            self._tmpdir = tempfile.mkdtemp(prefix="landmark_tf_ckpt_")
            local = os.path.join(self._tmpdir, "ckpt.npz")
            tf.io.gfile.copy(path, local, overwrite=True)
        try:
            self._npz = np.load(local, allow_pickle=False)
            self.meta = json.loads(bytes(self._npz["meta"]).decode("utf-8"))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: not a readable landmark-tf npz checkpoint: {e}") from e
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        self._npz.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def has(self, part: str) -> bool:
        return part in self.meta["paths"]

    def arrays(self, part: str) -> list[np.ndarray]:
        n = len(self.meta["paths"].get(part, []))
        return [self._npz[f"{part}/{i:04d}"] for i in range(n)]

    def restore(self, part: str, variables: Sequence[Any]) -> None:
        """Assigns the saved `part` to `variables` (same model code: same order and shapes)."""
        saved, paths = self.arrays(part), self.meta["paths"].get(part, [])
        if len(saved) != len(variables):
            raise UserError(f"checkpoint {self.path}: {part} has {len(saved)} variables, this "
                            f"model's {part} has {len(variables)}: a different model config")
        for value, var, path in zip(saved, variables, paths, strict=True):
            if tuple(value.shape) != tuple(var.shape):
                raise UserError(f"checkpoint {self.path}: {part} variable {path} has shape "
                                f"{tuple(value.shape)}, the model's {var.path} "
                                f"{tuple(var.shape)}: a different model config")
            var.assign(value.astype(var.dtype) if value.dtype != var.dtype else value)
