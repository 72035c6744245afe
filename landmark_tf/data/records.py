"""The TFRecord contract every stage keeps: example schema, shard naming, dataset_info.json.

Schema (tf.train.Example):
  image/encoded           bytes   JPEG, 3 channels
  image/id                bytes   GLDv2 image id (utf-8)
  image/class/label       int64   contiguous label 0..C-1, -1 when unlabelled
  image/class/landmark_id int64   original GLDv2 landmark id, -1 when unlabelled
  image/height, image/width int64 size of the encoded JPEG
  image/is_clean          int64   1 when in the clean subset (or no clean list was given), else 0
  image/tags              int64[] title keyword ids (tag_vocab.csv), variable length; only in
                                  conversions given an attribution CSV (empty: no tags)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.errors import UserError

DATASET_INFO = "dataset_info.json"
TAGS_FEATURE = "image/tags"
LABEL_MAP = "label_map.csv"
SHARD_SUFFIX = ".tfrec"
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrec$")

FEATURE_SPEC = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/class/landmark_id": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/is_clean": tf.io.FixedLenFeature([], tf.int64, default_value=1),
}


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`{split}-{i:05d}-of-{n:05d}.tfrec`, e.g. `train-00003-of-00128.tfrec`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """Inverse of `shard_name`: (split, index, num_shards), or None for other files."""
    m = _SHARD_RE.match(name)
    return (m["split"], int(m["i"]), int(m["n"])) if m else None


def _bytes(v: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int(v: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))


def make_example(
    *,
    encoded: bytes,
    image_id: str,
    label: int,
    landmark_id: int,
    height: int,
    width: int,
    is_clean: bool,
    tags: Sequence[int] | None = None,
) -> bytes:
    """Serialises one tf.train.Example in the schema above; the same fields give the same bytes."""
    feature = {
        "image/encoded": _bytes(encoded),
        "image/id": _bytes(image_id.encode("utf-8")),
        "image/class/label": _int(label),
        "image/class/landmark_id": _int(landmark_id),
        "image/height": _int(height),
        "image/width": _int(width),
        "image/is_clean": _int(1 if is_clean else 0),
    }
    if tags is not None:
        feature[TAGS_FEATURE] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[int(t) for t in tags]))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # The feature map's wire order otherwise varies between processes (protobuf map iteration
    # is hash-seeded): deterministic=True sorts it, so shards are byte-identical across workers.
    return example.SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses a scalar string tensor into the FEATURE_SPEC dict (graph-safe, for tf.data)."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """A stored image (`image/encoded` bytes, JPEG by the schema) -> uint8 [H, W, 3]; the one
    decoder of record images for training, validation and embedding (graph-safe)."""
    return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)


def load_dataset_info(data_dir: str) -> dict[str, Any]:
    """Reads `data_dir/dataset_info.json`; UserError when not a landmark-tfrecords output."""
    path = fileio.join(data_dir, DATASET_INFO)
    if not fileio.exists(path):
        raise UserError(
            f"{path} not found: --data_dir must be a folder written by landmark-tfrecords"
        )
    info = fileio.read_json(path)
    if not isinstance(info, dict):
        raise UserError(f"{path}: not a JSON object, so not a landmark-tfrecords dataset_info.json")
    for key in ("num_classes", "splits"):
        if key not in info:
            raise UserError(f"{path} has no '{key}': not a landmark-tfrecords dataset_info.json")
    return info


def split_files(data_dir: str, info: dict[str, Any], split: str) -> list[str]:
    """Full paths of a split's shards, as listed in dataset_info.json; error if any is missing."""
    splits = info["splits"]
    if split not in splits:
        raise UserError(
            f"split '{split}' not in {fileio.join(data_dir, DATASET_INFO)} "
            f"(has: {', '.join(sorted(splits))})"
        )
    files = [fileio.join(data_dir, name) for name in splits[split]["shards"]]
    missing = [f for f in files if not fileio.exists(f)]
    if missing:
        raise UserError(
            f"{len(missing)} shard(s) listed in dataset_info.json are missing, e.g. {missing[0]}"
        )
    return files
