"""Reading the checkpoints of earlier versions, so their workdirs still resume and export.

  ckpt-<step>.index / .data-*   tf.train.Checkpoint(backbone=, neck=, head=, optimizer=, step=,
                                rng=[seed states]) of the TensorFlow trainer; readable under the
                                TensorFlow backend (under JAX: parts only, converted to npz in a
                                TensorFlow-backend subprocess, since Keras's backend is fixed
                                per process)
  ckpt-<step>.npz               every variable by position (modeling/npz_checkpoint), the JAX
                                trainer's; readable under both backends

New checkpoints are written in modeling/checkpoint's format only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import keras

from landmark_tf.errors import UserError
from landmark_tf.modeling import backbones, npz_checkpoint
from landmark_tf.modeling.checkpoint import Found


def find(directory: str) -> list[Found]:
    """The newest legacy checkpoint of each kind in `directory` (0, 1 or 2 entries)."""
    import tensorflow as tf

    out = []
    npz = npz_checkpoint.list_checkpoints(directory)
    if npz:
        out.append(Found(npz[-1][1], "npz", npz[-1][0]))
    prefix = tf.train.latest_checkpoint(directory) if _exists(directory) else None
    if prefix:
        out.append(Found(prefix, "tensorflow", _tf_step(prefix)))
    return out


def _exists(directory: str) -> bool:
    from landmark_tf import fileio

    return fileio.exists(directory)


def _tf_step(prefix: str) -> int:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    key = "step/.ATTRIBUTES/VARIABLE_VALUE"
    if reader.has_tensor(key):
        return int(reader.get_tensor(key))
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def restore_parts(models, found: Found, parts: list[str], config) -> None:
    """Restores `parts` of a legacy checkpoint into `models` (built from `config`)."""
    if found.kind == "tensorflow" and keras.backend.backend() != "tensorflow":
        with tempfile.TemporaryDirectory(prefix="landmark_tf_convert_") as tmp:
            converted = os.path.join(tmp, "ckpt.npz")
            convert_to_npz(found.path, converted, config, with_head="head" in parts)
            restore_parts(models, Found(converted, "npz", found.step), parts, config)
        return
    if found.kind == "npz":
        with npz_checkpoint.Reader(found.path) as reader:
            for part in parts:
                reader.restore(part, getattr(models, part).variables)
    else:
        import tensorflow as tf

        ckpt = tf.train.Checkpoint(**{p: getattr(models, p) for p in parts})
        _assert_matched(ckpt.restore(found.path).expect_partial(), found.path)
    backbones.refresh_normalization(models.backbone)


def restore_train_state(found: Found, models, optimizer, seeds: list) -> int:
    """Resumes from a legacy checkpoint: every part, the optimizer and the seed states; returns
    the step. A legacy TensorFlow checkpoint resumes under the TensorFlow backend only."""
    parts = ["backbone", "neck", "head"]
    if found.kind == "npz":
        with npz_checkpoint.Reader(found.path) as reader:
            for part in parts:
                reader.restore(part, getattr(models, part).variables)
            reader.restore("optimizer", optimizer.variables)
            step = reader.step
    else:
        if keras.backend.backend() != "tensorflow":
            raise UserError(f"{found.path} is a TensorFlow checkpoint of an earlier version: "
                            "resume it with --backend=tensorflow (its next checkpoint is in the "
                            "format both backends read), or start from it with --init_from")
        import tensorflow as tf

        step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        ckpt = tf.train.Checkpoint(**{p: getattr(models, p) for p in parts},
                                   optimizer=optimizer, step=step_var, rng=seeds)
        _assert_matched(ckpt.restore(found.path), found.path)
        step = int(step_var.numpy())
    backbones.refresh_normalization(models.backbone)
    return step


def _assert_matched(status, path: str) -> None:
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise UserError(f"checkpoint {path} does not match the model config: {e}") from e


def convert_to_npz(checkpoint: str, output: str, cfg, with_head: bool) -> None:
    """Rewrites a legacy TF checkpoint of `cfg`'s model as npz, in a TensorFlow-backend
    subprocess (a JAX process cannot build TF variables)."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "landmark_tf.modeling.legacy_checkpoints", checkpoint,
               output, json.dumps(cfg.to_dict()), "1" if with_head else "0"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise UserError(f"cannot read TensorFlow checkpoint {checkpoint} for the JAX backend: "
                        f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")


def _convert_main(argv: list[str]) -> None:
    """`python -m landmark_tf.modeling.legacy_checkpoints CKPT OUTPUT CONFIG_JSON WITH_HEAD`."""
    from landmark_tf.config import ModelConfig
    from landmark_tf.modeling import model

    checkpoint, output, config_json, with_head = argv
    cfg = ModelConfig.from_dict(json.loads(config_json))
    models = model.build_models(cfg, with_head=with_head == "1")
    parts = ["backbone", "neck"] + (["head"] if with_head == "1" else [])
    restore_parts(models, Found(checkpoint, "tensorflow", 0), parts, cfg)
    npz_checkpoint.save(output, {p: getattr(models, p).variables for p in parts},
                        {"step": 0, "backend": "tensorflow", "converted_from": checkpoint})


def main() -> Any:
    try:
        _convert_main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
