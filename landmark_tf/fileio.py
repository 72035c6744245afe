"""File helpers over `tf.io.gfile`, so every path may be local or gs://.

Writes are atomic: the bytes go to a temporary name beside the target, then are renamed.
On GCS a rename is copy + delete, so readers must treat "final name exists" as "complete";
the temporary name never matches a final name's pattern; a failed write removes it.

Reads raise `errors.BadFile` naming the path when the path is not what it should be (a folder,
binary bytes where text belongs, not JSON), so every CLI prints one line instead of a traceback.
A missing file still raises `tf.errors.NotFoundError`: callers that skip missing images rely on
it, and most check `exists` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from landmark_tf.errors import BadFile, bad_input_errors, reason


def join(*parts: str) -> str:
    """Joins path parts; works for local paths and gs:// URLs."""
    return os.path.join(*parts)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def makedirs(path: str) -> None:
    tf.io.gfile.makedirs(path)


def check_output_file(path: str, flag: str) -> None:
    """BadFile when no file can be written at `path` (a folder is there, or a parent is a
    file): checked before the work whose result goes there."""
    if tf.io.gfile.isdir(path):
        raise BadFile(f"{flag} {path}", "is a folder, expected a file")
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent) and not tf.io.gfile.exists(parent):
        parent = os.path.dirname(parent)
    if parent and tf.io.gfile.exists(parent) and not tf.io.gfile.isdir(parent):
        raise BadFile(f"{flag} {path}", f"{parent} is a file, expected a folder")


def tmp_name(path: str) -> str:
    """A unique temporary name in the same folder, so the final rename stays on one filesystem."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Turns the errors that mean "this path is not what it should be" into `BadFile(path)`.

    NotFoundError passes through unchanged (see the module docstring)."""
    try:
        yield
    except tf.errors.NotFoundError:
        raise
    except bad_input_errors() as e:
        raise BadFile(path, reason(e)) from e


@contextlib.contextmanager
def removed_on_failure(tmp: str) -> Iterator[str]:
    """Yields `tmp`; deletes it if the block fails, whatever the failure (the rename onto a
    folder, a full disk, Ctrl-C), so no `.tmp-*` file is left beside the target."""
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(tf.errors.OpError, OSError):
            if tf.io.gfile.exists(tmp) and not tf.io.gfile.isdir(tmp):
                tf.io.gfile.remove(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    with removed_on_failure(tmp_name(path)) as tmp, writing(path):
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(data)
        tf.io.gfile.rename(tmp, path, overwrite=True)


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """As `reading`, for a target path: a folder where the file should go, a file where a
    folder should be. NotFoundError (a parent that does not exist) is bad input here too."""
    try:
        yield
    except bad_input_errors() as e:
        raise BadFile(path, reason(e)) from e


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def require_file(path: str) -> None:
    """BadFile unless `path` is a file. Needed before streaming reads: iterating over a
    GFile opened on a folder yields no lines instead of failing."""
    if not tf.io.gfile.exists(path):
        raise BadFile(path, "not found")
    if tf.io.gfile.isdir(path):
        raise BadFile(path, "is a folder, expected a file")


def read_text(path: str) -> str:
    """The file as UTF-8 text; BadFile for a folder or bytes that are not UTF-8."""
    with reading(path), tf.io.gfile.GFile(path, "rb") as f:
        return f.read().decode("utf-8")


def read_bytes(path: str) -> bytes:
    with reading(path), tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def read_json(path: str) -> Any:
    """BadFile when the file is not UTF-8 JSON."""
    text = read_text(path)
    with reading(path):
        return json.loads(text)


def remove_temporaries(folder: str, of: str | None = None) -> int:
    """Deletes leftovers of interrupted atomic writes in `folder` (files, and folders such as a
    half-written SavedModel); `of`: only those of that target name. Returns how many.

    A process killed with SIGKILL cannot clean up after itself: the rerun calls this."""
    if not tf.io.gfile.isdir(folder):
        return 0
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(folder)]
    # `.tmp-<hex or pid>-NAME` exactly: another target's temporaries are not this one's.
    mine = re.compile(r"\.tmp-[0-9a-f]+-" + re.escape(of) + "$") if of else None
    stale = [n for n in names if n.startswith(".tmp-") and (mine is None or mine.match(n))]
    for name in stale:
        path = os.path.join(folder, name)
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)
    return len(stale)
