"""Tiny landmark-tfrecords outputs for the training tests: one solid, noisy colour per class."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from landmark_tf.data import records

PALETTE = np.array(
    [[220, 40, 40], [40, 200, 60], [40, 60, 220], [230, 210, 40],
     [200, 40, 200], [40, 200, 210], [120, 120, 120], [250, 250, 250]],
    dtype=np.float32,
)


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: the class colour, a darker left half, plus noise."""
    image = np.tile(PALETTE[label % len(PALETTE)], (size, size, 1))
    image[:, : size // 2] *= 0.6
    image += rng.normal(0.0, 12.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_split(out_dir, split, counts, shards, size, rng, not_clean_every):
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    names = [records.shard_name(split, i, shards) for i in range(shards)]
    writers = [tf.io.TFRecordWriter(os.path.join(out_dir, n)) for n in names]
    for i, label in enumerate(labels):
        example = records.make_example(
            encoded=_jpeg(class_image(int(label), size, rng)), image_id=f"{split}{i:06x}",
            label=int(label), landmark_id=1000 + int(label), height=size, width=size,
            is_clean=not (not_clean_every and i % not_clean_every == 0),
        )
        writers[i % shards].write(example)
    for w in writers:
        w.close()
    not_clean = np.zeros(len(counts), np.int64)
    if not_clean_every:
        np.add.at(not_clean, labels[::not_clean_every], 1)
    return {"examples": int(len(labels)), "shards": names, "class_counts": [int(c) for c in counts],
            "not_clean_class_counts": [int(c) for c in not_clean]}


def make_dataset(
    out_dir: str, train_counts=(12, 12, 12, 12), val_counts=(4, 4, 4, 4), *, size: int = 32,
    shards: int = 2, seed: int = 0, not_clean_every: int = 0,
) -> dict:
    """Writes train (and val unless val_counts is None) shards, dataset_info.json, label_map.csv."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": _write_split(out_dir, "train", train_counts, shards, size, rng,
                                    not_clean_every)}
    if val_counts is not None:
        splits["val"] = _write_split(out_dir, "val", val_counts, 1, size, rng, 0)
    info = {
        "format_version": 1, "num_classes": len(train_counts),
        "class_counts": [int(c) for c in train_counts], "splits": splits,
        "num_skipped": 0, "skipped": [], "source": {"generator": "tests/tiny_dataset.py"},
    }
    with open(os.path.join(out_dir, records.DATASET_INFO), "w") as f:
        json.dump(info, f)
    with open(os.path.join(out_dir, records.LABEL_MAP), "w") as f:
        f.write("label,landmark_id,count\n")
        f.writelines(f"{i},{1000 + i},{c}\n" for i, c in enumerate(train_counts))
    return info
