"""Loads a SavedModel the way Kaggle does: a fresh process with only TensorFlow (no landmark_tf).

  python tests/load_savedmodel.py EXPORT_DIR 37x501,800x600 OUT.npz

Calls serving_default twice on a seeded random image of each size, then the batched signatures
on the same images; writes the descriptors to OUT.npz (key "default") and prints one JSON line.

Only TensorFlow 2.x and numpy, Python 3.8+: it runs in Kaggle's TF 2.2 too (.venv-tf22), where a
signature takes tensors only, not numpy arrays.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tensorflow as tf


def make_images(sizes: str) -> list[np.ndarray]:
    """Seeded random uint8 images for sizes like '37x501,800x600' (the tests rebuild them)."""
    rng = np.random.default_rng(123)
    shapes = [tuple(int(v) for v in s.split("x")) for s in sizes.split(",")]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _padded(images):
    sizes = np.array([im.shape[:2] for im in images], dtype=np.int32)
    batch = np.zeros((len(images), *sizes.max(axis=0), 3), dtype=np.uint8)
    for i, im in enumerate(images):
        batch[i, : im.shape[0], : im.shape[1]] = im
    return batch, sizes


def main(export_dir: str, sizes: str, out: str) -> dict:
    loaded = tf.saved_model.load(export_dir)
    sigs = loaded.signatures
    images = make_images(sizes)
    default, t = sigs["serving_default"], tf.constant
    first = [default(input_image=t(im))["global_descriptor"].numpy() for im in images]
    again = [default(input_image=t(im))["global_descriptor"].numpy() for im in images]
    batch, hw = _padded(images)
    padded = sigs["serving_padded"](input_images=t(batch), image_sizes=t(hw))["global_descriptors"]
    same = sigs["serving_batch"](input_images=t(np.stack([images[0]] * 2)))["global_descriptors"]
    np.savez(out, default=np.stack(first))
    return {
        "signatures": sorted(sigs.keys()),
        "inputs": sorted(sigs["serving_default"].structured_input_signature[1]),
        "outputs": sorted(sigs["serving_default"].structured_outputs),
        "shapes": [list(d.shape) for d in first],
        "dtypes": sorted({str(d.dtype) for d in first}),
        "norms": [float(np.linalg.norm(d)) for d in first],
        "deterministic": all(np.array_equal(a, b) for a, b in zip(first, again)),  # noqa: B905 (Python 3.8)
        "padded_max_diff": float(np.abs(padded.numpy() - np.stack(first)).max()),
        "batch_max_diff": float(np.abs(same.numpy() - first[0]).max()),
        "distinct": bool(np.abs(first[0] - first[-1]).max() > 1e-4),
        "landmark_tf_imported": any(m.startswith("landmark_tf") for m in sys.modules),
        "keras_imported": "keras" in sys.modules,
        "tensorflow": tf.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
