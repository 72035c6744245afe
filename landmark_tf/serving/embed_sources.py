"""Where landmark-embed's images come from: TFRecord shards or a CSV + GLDv2 image tree.

Both give `Item`s in a fixed order (shards sorted by name, records in file order; CSV rows in file
order), which is what makes chunked, resumable embedding reproducible.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.data import gldv2, images, records
from landmark_tf.errors import BadFile, UserError


@dataclasses.dataclass(frozen=True)
class Item:
    """One image: `data` holds the encoded bytes (records), else they are read from `path`.

    crop: (x1, y1, x2, y2) pixel box the image is cut to after decoding (revisitop queries).
    canonical: a file is first made canonical as landmark-tfrecords does (GLDv2 sets); False
      for Revisited Oxford/Paris, whose protocol describes the original images and whose bbx
      are in the original's pixels.
    """

    id: str
    landmark_id: int
    path: str
    data: bytes | None = None
    crop: tuple[float, float, float, float] | None = None
    canonical: bool = True
    refused: str | None = None  # why the id names no file (gldv2.id_problem): skipped, never read


@dataclasses.dataclass
class Source:
    """items: in order; total: count when known; labelled: None = decide from landmark ids."""

    items: Iterable[Item]
    total: int | None
    labelled: bool | None
    digest: str


def open_source(records_glob: str | None, csv_path: str | None, image_dir: str | None,
                revisitop_gnd: str | None = None, revisitop_set: str = "queries") -> Source:
    """Exactly one of `records_glob`, `csv_path` (+ `image_dir`) or `revisitop_gnd` (+
    `image_dir`); UserError otherwise."""
    if revisitop_gnd:
        if records_glob or csv_path or not image_dir:
            raise UserError("--revisitop_gnd goes with --image_dir only (no --records or --csv)")
        return revisitop_source(revisitop_gnd, image_dir, revisitop_set)
    if bool(records_glob) == bool(csv_path):
        raise UserError("give either --records or --csv (with --image_dir), not both or neither")
    if records_glob:
        if image_dir:
            raise UserError("--image_dir goes with --csv, not with --records")
        return records_source(records_glob)
    if not image_dir:
        raise UserError("--csv needs --image_dir (images at IMAGE_DIR/a/b/c/<id>.jpg)")
    return csv_source(csv_path, image_dir)


def _file_item(image_id: str, landmark: int, path_of, **kwargs) -> Item:
    """An Item read from `path_of(image_id)`, or a refused one (no path) for an id that would
    name a file outside the image folder or none at all."""
    problem = gldv2.id_problem(image_id)
    if problem:
        return Item(image_id, landmark, "", refused=problem, **kwargs)
    return Item(image_id, landmark, path_of(image_id), **kwargs)


def csv_source(csv_path: str, image_dir: str) -> Source:
    """Rows of a CSV with an `id` column and an optional `landmark_id` column (labels)."""
    if not fileio.exists(csv_path):
        raise UserError(f"--csv {csv_path}: not found")
    text = fileio.read_text(csv_path)
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if "id" not in fields:
        raise UserError(f"{csv_path}:1: no 'id' column in header {fields}")
    labelled = "landmark_id" in fields
    items, seen = [], {}
    for row in reader:
        line = reader.line_num
        image_id = (row.get("id") or "").strip()
        if not image_id:
            raise UserError(f"{csv_path}:{line}: empty id")
        if image_id in seen:
            raise UserError(f"{csv_path}:{line}: id {image_id} already on line {seen[image_id]}")
        seen[image_id] = line
        landmark = _landmark_id(row.get("landmark_id"), csv_path, line) if labelled else -1
        items.append(_file_item(image_id, landmark, lambda i: gldv2.image_path(image_dir, i)))
    digest = hashlib.sha256(text.encode("utf-8") + image_dir.encode("utf-8")).hexdigest()
    return Source(items, len(items), labelled, digest)


def _landmark_id(value: str | None, path: str, line: int) -> int:
    value = (value or "").strip()
    if not value:
        return -1
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"{path}:{line}: landmark_id {value!r} is not an integer") from e


def records_source(pattern: str) -> Source:
    """All records of the shards matching `pattern` (sorted), with ids and landmark ids."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise UserError(f"--records {pattern}: no file matches")
    sizes = "".join(f"{f}:{tf.io.gfile.stat(f).length}\n" for f in files)
    digest = hashlib.sha256(sizes.encode("utf-8")).hexdigest()
    return Source(_record_items(files), _records_total(files), None, digest)


def _record_items(files: list[str]) -> Iterator[Item]:
    for path in files:
        ds = tf.data.TFRecordDataset(path).map(records.parse_example).prefetch(64)
        try:
            for ex in ds.as_numpy_iterator():
                yield Item(
                    ex["image/id"].decode("utf-8", "replace"),
                    int(ex["image/class/landmark_id"]),
                    path,
                    ex["image/encoded"],
                )
        except tf.errors.OpError as e:
            raise UserError(f"{path}: unreadable TFRecord file ({_first_line(e)})") from e


def _records_total(files: list[str]) -> int | None:
    """Example count from dataset_info.json when the files are whole splits listed there."""
    info_path = fileio.join(os.path.dirname(files[0]), records.DATASET_INFO)
    if not fileio.exists(info_path):
        return None
    try:
        splits = fileio.read_json(info_path).get("splits", {})
    except (UserError, AttributeError):  # not ours: the count is only a progress-bar nicety
        return None
    names = {os.path.basename(f) for f in files}
    used = [s for s in splits.values() if names & set(s.get("shards", []))]
    if not used or set().union(*(set(s["shards"]) for s in used)) != names:
        return None
    return sum(int(s.get("examples", 0)) for s in used)


def revisitop_source(gnd_path: str, image_dir: str, which: str) -> Source:
    """Revisited Oxford/Paris images as the published protocol describes them.

    which="queries": the qimlist images, each cropped to its ground-truth `bbx` before it is
    described (revisitop's example_process_images.py: `pil_loader(...).crop(gnd[i]['bbx'])`);
    "database": the imlist images, whole. Images are IMAGE_DIR/<name>.jpg; ids are the names.
    """
    from landmark_tf.retrieval import revisitop

    if which not in ("queries", "database"):
        raise UserError(f"--revisitop_set must be queries or database, got {which!r}")
    gnd = revisitop.load_gnd(gnd_path)
    names = gnd["qimlist"] if which == "queries" else gnd["imlist"]
    items = []
    for i, name in enumerate(names):
        box = None
        if which == "queries":
            box = gnd["gnd"][i].get("bbx")
            if box is None or len(box) != 4:
                raise UserError(f"{gnd_path}: gnd[{i}] ({name}) has no bbx [x1, y1, x2, y2]")
            box = tuple(float(v) for v in box)
        items.append(_file_item(str(name), -1,
                                lambda n: fileio.join(image_dir, gldv2.image_name(n)),
                                crop=box, canonical=False))
    text = f"{gnd_path}\n{image_dir}\n{which}\n" + "".join(f"{n}\n" for n in names)
    digest = hashlib.sha256(fileio.read_bytes(gnd_path) + text.encode("utf-8")).hexdigest()
    return Source(items, len(items), False, digest)


def crop_to_box(image: np.ndarray, box) -> np.ndarray | str:
    """image[y1:y2, x1:x2] with the box rounded as PIL's Image.crop rounds it, clipped to the
    image; a reason string when nothing is left."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    h, w = image.shape[:2]
    x1, x2, y1, y2 = max(x1, 0), min(x2, w), max(y1, 0), min(y2, h)
    if x2 <= x1 or y2 <= y1:
        return f"bbx {list(box)} leaves nothing of a {w}x{h} image"
    return image[y1:y2, x1:x2]


def load_image(item: Item) -> np.ndarray | str:
    """uint8 [H, W, 3], decoded as the input pipeline does; or why it cannot be used.

    A record's bytes are already canonical (landmark-tfrecords wrote them); an original file
    (--csv) is first made canonical as the converter does (`images.canonical_jpeg`: EXIF
    orientation, at most 800 px, JPEG), so both sources give the model the same pixels.
    """
    if item.refused:
        return item.refused
    try:
        data = item.data
        if data is None:
            data = fileio.read_bytes(item.path)
            if item.canonical:
                data = images.canonical_jpeg(data)
        image = records.decode_image(data).numpy()
    except tf.errors.NotFoundError:
        return "file not found"
    except BadFile as e:
        return e.reason
    except images.SkipImage as e:
        return f"cannot decode: {e.reason}"
    except (tf.errors.OpError, ValueError) as e:
        return f"cannot decode: {_first_line(e)}"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return f"empty image {list(image.shape)}"
    return image if item.crop is None else crop_to_box(image, item.crop)


def _first_line(e: Exception) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0][:200]
