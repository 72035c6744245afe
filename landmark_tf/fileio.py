"""File helpers over `tf.io.gfile`, so every path may be local or gs://.

Writes are atomic: the bytes go to a temporary name beside the target, then are renamed.
On GCS a rename is copy + delete, so readers must treat "final name exists" as "complete";
the temporary name never matches a final name's pattern.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import tensorflow as tf


def join(*parts: str) -> str:
    """Joins path parts; works for local paths and gs:// URLs."""
    return os.path.join(*parts)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def makedirs(path: str) -> None:
    tf.io.gfile.makedirs(path)


def tmp_name(path: str) -> str:
    """A unique temporary name in the same folder, so the final rename stays on one filesystem."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


def write_bytes_atomic(path: str, data: bytes) -> None:
    tmp = tmp_name(path)
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def remove_temporaries(folder: str) -> int:
    """Deletes leftovers of interrupted atomic writes in `folder`; returns how many."""
    if not tf.io.gfile.isdir(folder):
        return 0
    stale = [n for n in tf.io.gfile.listdir(folder) if n.startswith(".tmp-")]
    for name in stale:
        tf.io.gfile.remove(os.path.join(folder, name))
    return len(stale)
