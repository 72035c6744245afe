"""landmark-export's library: a training workdir -> a Kaggle-format SavedModel + metadata.json.

The SavedModel (signatures in `landmark_tf.serving.signatures`) resizes inside with
`resize_for_model`, the function the evaluation pipeline uses, so its descriptor equals the
embedding model's output on the same image. `metadata.json` is written last: its presence
means "complete export of ours".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from absl import logging

from landmark_tf import fileio, workdir
from landmark_tf.data import provenance
from landmark_tf.errors import UserError
from landmark_tf.modeling import model as model_lib
from landmark_tf.modeling import superglobal_pooling
from landmark_tf.serving import kaggle_contract, signatures

FORMAT = "landmark-tf/savedmodel/v1"
METADATA_FILE = workdir.METADATA_FILE
# The backbones' total stride: smaller inputs fail inside EfficientNet, and ConvNeXt's unpadded
# stride-4/2/2/2 convolutions leave an empty map.
MIN_IMAGE_SIZE = 32
# Kaggle's GLR2020 limit could not be confirmed from a primary source here; we warn at 1 GB
# (10^9 bytes), the conservative reading of the limit reported for the competition: the winning
# 4-model ensemble (3x EfficientNet-B7 + B6, ~238M float32 parameters, ~0.95 GB) fitted under it.
KAGGLE_GLR2020_LIMIT_BYTES = 1_000_000_000


@dataclasses.dataclass
class ExportConfig:
    """What landmark-export needs; `image_size=None` means the trained size."""

    workdir: str
    export_dir: str
    scales: Sequence[float] = (1.0,)
    image_size: int | None = None
    overwrite: bool = False
    inference_pooling: str = "trained"  # or "superglobal" (modeling/superglobal_pooling.py)


def parse_float_list(values: Sequence[str], flag: str) -> list[float]:
    """Comma-list flag values -> floats; UserError naming the flag on a bad value."""
    try:
        return [float(v) for v in values]
    except ValueError as e:
        raise UserError(f"{flag}: {e}; expected numbers separated by commas") from e


def scaled_sizes(image_size: int, scales: Sequence[float]) -> list[int]:
    """Input side per scale, round(image_size * scale); UserError below the backbone minimum."""
    if not scales:
        raise UserError("--scales: give at least one scale, e.g. 1 or 0.7071,1,1.4142")
    sizes = []
    for s in scales:
        size = int(round(image_size * s)) if math.isfinite(s) and s > 0 else 0
        if size < MIN_IMAGE_SIZE:
            raise UserError(
                f"--scales: scale {s} of image size {image_size} gives {size} px; "
                f"each scale must give at least {MIN_IMAGE_SIZE} px"
            )
        sizes.append(size)
    return sizes


def scale_combine(inference_pooling: str) -> str:
    """How the scales combine: SuperGlobal's max of normalised descriptors with its pooling,
    else the mean."""
    return "max" if inference_pooling == superglobal_pooling.NAME else "mean"


def check_input_sizes(embedding_model, sizes: Sequence[int]) -> None:
    """UserError when the model takes one fixed size (ViT/DINOv2: position embeddings) and
    `sizes` asks for another."""
    fixed = embedding_model.input_shape[1]
    if fixed is not None and any(size != fixed for size in sizes):
        raise UserError(f"this model takes only {fixed} x {fixed} inputs (its backbone's "
                        f"position embeddings), not {sizes}: use --image_size={fixed} "
                        "--scales=1")


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Exports the latest checkpoint of `cfg.workdir`; returns the closing-JSON facts.

    The SavedModel is traced by TensorFlow: in a process whose Keras runs on JAX (a notebook
    that trained with JAX) the export runs in a TensorFlow-backend subprocess; checkpoints of
    either backend read the same there.
    """
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != "tensorflow":
        return _export_in_tensorflow_process(cfg)
    config_path = fileio.join(cfg.workdir, model_lib.CONFIG_FILE)
    check_target(cfg.export_dir, cfg.overwrite)
    trained_size = model_lib.read_model_config(cfg.workdir).image_size
    image_size = int(cfg.image_size or trained_size)
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    sizes = scaled_sizes(image_size, cfg.scales)  # before the slow part: fail fast
    found = model_lib.latest_checkpoint(cfg.workdir)
    embedding_model, mcfg = model_lib.restore_embedding_model(cfg.workdir, cfg.inference_pooling)
    check_input_sizes(embedding_model, sizes)
    combine = scale_combine(cfg.inference_pooling)
    branch = signatures.KerasBranch(embedding_model, sizes, name="embedding", combine=combine)
    module = signatures.DescriptorModule([branch], [1.0])
    metadata = {
        "format": FORMAT,
        "kind": "single",
        "backbone": mcfg.backbone,
        "pooling": mcfg.pooling,
        "image_size": image_size,
        "trained_image_size": mcfg.image_size,
        "scales": [float(s) for s in cfg.scales],
        "input_sizes": sizes,
        "inference_pooling": cfg.inference_pooling,
        "scale_combine": combine,
        "embedding_dim": mcfg.embedding_dim,
        "config_sha256": hashlib.sha256(fileio.read_bytes(config_path)).hexdigest(),
        "checkpoint": found.path,
        "step": found.step,
        "signatures": list(signatures.SIGNATURES),
        provenance.KEY: provenance.find(cfg.workdir),
    }
    size = write_savedmodel(module, cfg.export_dir, metadata, cfg.overwrite)
    return summary(cfg.export_dir, metadata, size)


def summary(export_dir: str, metadata: dict[str, Any], size: int) -> dict[str, Any]:
    """Closing-JSON facts for an export of `size` bytes; warns above Kaggle's GLR2020 limit and
    when the SavedModel breaks Kaggle's contract (`metadata["kaggle"]`, see kaggle_contract)."""
    too_big = size > KAGGLE_GLR2020_LIMIT_BYTES
    if too_big:
        logging.warning(
            "%s is %.1f MB, above the %.0f MB Kaggle accepted for GLR2020 submissions",
            export_dir, size / 1e6, KAGGLE_GLR2020_LIMIT_BYTES / 1e6,
        )
    contract = metadata["kaggle"]
    for problem in contract["tf_problems"] + contract["signature_problems"]:
        logging.warning("%s is not a valid Kaggle GLR2020 submission: %s", export_dir, problem)
    return {
        "export_dir": export_dir,
        "embedding_dim": metadata["embedding_dim"],
        "size_bytes": size,
        "size_mb": round(size / 1e6, 3),
        "kaggle_limit_bytes": KAGGLE_GLR2020_LIMIT_BYTES,
        "exceeds_kaggle_limit": too_big,
        "kaggle_contract_ok": contract["ok"] and not too_big,
        "loads_in_tf": contract["loads_in_tf"] if not contract["tf_problems"] else None,
    }


def check_target(export_dir: str, overwrite: bool) -> None:
    """Refuses an existing non-empty export_dir unless --overwrite and it looks like an export."""
    if not fileio.exists(export_dir):
        return
    if not tf.io.gfile.isdir(export_dir):
        raise UserError(f"--export_dir {export_dir} exists and is a file")
    entries = {e.rstrip("/") for e in tf.io.gfile.listdir(export_dir)}
    if not entries:
        return
    is_export = bool(entries & {METADATA_FILE, "saved_model.pb"})
    if not overwrite:
        state = "" if METADATA_FILE in entries else " (no metadata.json: an interrupted export?)"
        raise UserError(
            f"--export_dir {export_dir} already exists{state}; pass --overwrite to replace it"
        )
    if not is_export:
        raise UserError(
            f"--export_dir {export_dir} exists and is not a SavedModel export; "
            "refusing to delete it even with --overwrite"
        )


def write_savedmodel(
    module: signatures.DescriptorModule, export_dir: str, metadata: dict[str, Any], overwrite: bool
) -> int:
    """Saves `module` + metadata.json atomically to `export_dir`; returns its size in bytes.

    `metadata["kaggle"]` is set to the Kaggle contract check of the written SavedModel.

    The SavedModel is written to a temporary folder beside `export_dir`, then published: a
    rename on local disks; on object stores (gs://, no atomic rename) a copy of every file with
    metadata.json copied last, so metadata.json present = export complete.
    """
    check_target(export_dir, overwrite)
    head, name = os.path.split(export_dir.rstrip("/"))
    fileio.remove_temporaries(head or ".", of=name)  # left by an export killed midway
    tmp = fileio.tmp_name(export_dir.rstrip("/"))
    try:
        signatures.save(module, tmp)
        metadata["kaggle"] = kaggle_contract.check(tmp)
        fileio.write_json_atomic(fileio.join(tmp, METADATA_FILE), metadata)
        _publish(tmp, export_dir.rstrip("/"))
    finally:
        if fileio.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    return dir_size(export_dir)


def _publish(tmp: str, export_dir: str) -> None:
    if "://" not in export_dir:
        old = fileio.tmp_name(export_dir) if fileio.exists(export_dir) else None
        if old:
            tf.io.gfile.rename(export_dir, old)
        tf.io.gfile.rename(tmp, export_dir)
        if old:
            tf.io.gfile.rmtree(old)
        return
    if fileio.exists(export_dir):
        marker = fileio.join(export_dir, METADATA_FILE)
        if fileio.exists(marker):
            tf.io.gfile.remove(marker)  # first: a half-replaced export must read as incomplete
        tf.io.gfile.rmtree(export_dir)
    files = _relative_files(tmp)
    for rel in sorted(files, key=lambda r: r == METADATA_FILE):
        dst = fileio.join(export_dir, rel)
        fileio.makedirs(dst.rsplit("/", 1)[0])
        tf.io.gfile.copy(fileio.join(tmp, rel), dst, overwrite=True)


def _relative_files(root: str) -> list[str]:
    out = []
    for folder, _, names in tf.io.gfile.walk(root):
        rel = folder[len(root):].strip("/")
        out += [f"{rel}/{n}" if rel else n for n in names]
    return out


def dir_size(root: str) -> int:
    """Total bytes of the files under `root` (local or gs://)."""
    return sum(tf.io.gfile.stat(fileio.join(root, r)).length for r in _relative_files(root))


def read_metadata(export_dir: str, flag: str = "--model") -> dict[str, Any]:
    """metadata.json of a complete landmark-export/landmark-ensemble output, else UserError."""
    path = fileio.join(export_dir, METADATA_FILE)
    if not fileio.exists(export_dir):
        raise UserError(f"{flag} {export_dir}: not found")
    if not fileio.exists(path):
        raise UserError(
            f"{flag} {export_dir}: no {METADATA_FILE}, so not a complete landmark-export or "
            "landmark-ensemble output"
        )
    try:
        metadata = fileio.read_json(path)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise UserError(f"{path}: format is {found!r}, expected {FORMAT!r}: not one of our exports")
    return metadata


def _export_in_tensorflow_process(cfg: ExportConfig) -> dict[str, Any]:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    args = json.dumps({**dataclasses.asdict(cfg), "scales": list(cfg.scales)})
    proc = subprocess.run([sys.executable, "-m", "landmark_tf.serving.export", args], env=env,
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        errors = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise UserError(errors[-1].removeprefix("error: ") if errors else
                        f"export subprocess failed with exit {proc.returncode}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    try:
        print(json.dumps(export_model(ExportConfig(**json.loads(sys.argv[1])))))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
