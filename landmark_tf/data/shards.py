"""Write planned examples into one TFRecord shard.

`write_shard` is the unit a Beam pipeline can reuse: it takes the shard's planned examples in
order, writes them under a temporary name, optionally writes a JSON report, and only then renames
the shard to its final name, so "final name exists" means "shard complete" (GCS has no atomic
rename). Its bytes depend only on the examples and the image options, never on the process.
"""

from __future__ import annotations

import collections
import os
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.data import gldv2, images, records
from landmark_tf.errors import BadFile

TAIL_BYTES = 1 << 16
_RECORD_FRAMING = 16  # TFRecord: 8-byte length + 4-byte length CRC + 4-byte data CRC


class ImageOptions(NamedTuple):
    """How source images become stored JPEGs (see images.convert)."""

    max_side: int
    quality: int


class ShardTask(NamedTuple):
    """One shard to write: final path, report path ('' for none) and its examples in order."""

    path: str
    report_path: str
    examples: list[gldv2.Example]
    image_dir: str
    options: ImageOptions


def read_image(path: str) -> bytes:
    """The file's bytes; a missing or unreadable file raises SkipImage. Other I/O errors (e.g. a
    GCS outage) propagate: they say nothing about the image and the run should stop and resume."""
    try:
        return fileio.read_bytes(path)
    except tf.errors.NotFoundError:
        raise images.SkipImage("missing", "no such file") from None
    except BadFile as e:  # a folder, no read permission: fileio.reading names these
        raise images.SkipImage("unreadable", e.reason) from None


def serialize(example: gldv2.Example, image_dir: str, options: ImageOptions) -> bytes:
    """The serialized tf.train.Example for one planned example; raises SkipImage."""
    raw = read_image(gldv2.image_path(image_dir, example.image_id))
    encoded, height, width = images.convert(raw, options.max_side, options.quality)
    return records.make_example(
        encoded=encoded,
        image_id=example.image_id,
        label=example.label,
        landmark_id=example.landmark_id,
        height=height,
        width=width,
        is_clean=example.is_clean,
        tags=None if example.tags is None else np.frombuffer(example.tags, "<i4").tolist(),
    )


def record_size(example: gldv2.Example, image_dir: str, options: ImageOptions) -> int:
    """Bytes this example takes in a shard, or 0 when it would be skipped (for size estimates)."""
    try:
        return len(serialize(example, image_dir, options)) + _RECORD_FRAMING
    except images.SkipImage:
        return 0


def tail_crc32(path: str, size: int) -> int:
    """CRC32 of a file's last TAIL_BYTES bytes: the last record and its TFRecord CRC, read in
    one small request, so a resume can check every kept shard even on GCS."""
    with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        return zlib.crc32(f.read())


def check_shard(path: str, report: dict[str, Any]) -> str | None:
    """Why the shard at `path` is not the one its report describes, or None when it matches."""
    size = tf.io.gfile.stat(path).length
    if size != report.get("bytes"):
        return f"{size} bytes on disk, {report.get('bytes')} when written"
    want = report.get("tail_crc32")  # absent in reports written before it was recorded
    if want is not None and tail_crc32(path, size) != want:
        return "its last bytes changed since it was written (CRC32 mismatch)"
    return None


def write_shard(task: ShardTask, on_image: Callable[[], None] | None = None) -> dict[str, Any]:
    """Writes one shard (temporary name, report, rename) and returns its report.

    Report: {"shard": file name, "planned": int, "examples": int written, "bytes": int,
             "label_counts": {str(label): int}, "not_clean_label_counts": {str(label): int}
             (examples with is_clean 0; labels without any left out),
             "skipped": [{"id", "path", "reason"}]}
    """
    with fileio.removed_on_failure(fileio.tmp_name(task.path)) as tmp:
        return _write_shard_as(task, tmp, on_image)


def _write_shard_as(task: ShardTask, tmp: str, on_image: Callable[[], None] | None) -> dict:
    counts: collections.Counter = collections.Counter()
    not_clean: collections.Counter = collections.Counter()
    skipped, size, untagged, max_tags = [], 0, 0, 0
    with tf.io.TFRecordWriter(tmp) as writer:
        for ex in task.examples:
            try:
                record = serialize(ex, task.image_dir, task.options)
            except images.SkipImage as e:
                path = gldv2.image_path(task.image_dir, ex.image_id)
                skipped.append({"id": ex.image_id, "path": path, "reason": e.reason})
            else:
                writer.write(record)
                counts[ex.label] += 1
                not_clean[ex.label] += 0 if ex.is_clean else 1
                size += len(record) + _RECORD_FRAMING
                if ex.tags is not None:
                    untagged += not ex.tags
                    max_tags = max(max_tags, len(ex.tags) // 4)
            if on_image is not None:
                on_image()
    report = {
        "shard": os.path.basename(task.path),
        "planned": len(task.examples),
        "examples": sum(counts.values()),
        "bytes": size,
        "label_counts": {str(k): v for k, v in sorted(counts.items())},
        "not_clean_label_counts": {str(k): v for k, v in sorted(not_clean.items()) if v},
        "skipped": skipped,
        "tail_crc32": tail_crc32(tmp, size),
    }
    if any(ex.tags is not None for ex in task.examples):
        report.update(untagged=untagged, max_tags=max_tags)
    if task.report_path:
        fileio.write_json_atomic(task.report_path, report)
    tf.io.gfile.rename(tmp, task.path, overwrite=True)
    return report
