"""GLDv2 CSVs: read and validate rows (ids, landmark ids, duplicates), one line per bad input.

`planning.py` turns the rows into a conversion plan.

CSV formats, told apart by the header:
  train.csv        id,url,landmark_id           one row per image
  train_clean.csv  landmark_id,images           one row per landmark, ids space-separated
  index.csv/test.csv  id[,url]                  unlabelled: landmark_id -1
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.errors import UserError

UNLABELLED = -1
_ID_RE = re.compile(r"^[0-9A-Za-z_-]{3,}$")


class Row(NamedTuple):
    """One image of a CSV: its id, landmark id (-1 unlabelled), and source line for messages."""

    image_id: str
    landmark_id: int
    line: int


class Example(NamedTuple):
    """One planned output example. `label` is contiguous 0..C-1, or -1 when unlabelled."""

    image_id: str
    label: int
    landmark_id: int
    is_clean: bool
    # Tag ids as little-endian int32 bytes (data/tags.py); None when the conversion has no
    # attribution CSV, b"" for an image without tags. Bytes, not a tuple: ~4x less memory.
    tags: bytes | None = None


def id_problem(image_id: str) -> str | None:
    """Why `image_id` cannot name an image file, or None when it can.

    The one check every stage applies before an id becomes a path: GLDv2 ids (hex) and the
    revisitop names (all_souls_000013) are 3+ characters from [0-9A-Za-z_-], so no accepted id
    holds a "/", "." or "\\" and the path stays inside its root folder.
    """
    if _ID_RE.match(image_id):
        return None
    return (f"id {image_id!r} refused: not 3+ characters from [0-9A-Za-z_-], so it names no "
            "file inside the image folder")


def image_path(image_dir: str, image_id: str) -> str:
    """`image_dir/a/b/c/abc….jpg`, the GLDv2 layout. ValueError for an id `id_problem` refuses:
    callers skip those first, so this only stops a caller that forgot from escaping the root."""
    name = image_name(image_id)  # first: it refuses ids too short for a/b/c
    return fileio.join(image_dir, image_id[0], image_id[1], image_id[2], name)


def image_name(image_id: str) -> str:
    """`<id>.jpg` (revisitop's layout: the file name, no subfolders); ValueError as above."""
    problem = id_problem(image_id)
    if problem:
        raise ValueError(problem)
    return f"{image_id}.jpg"


def read_csv(path: str) -> tuple[str, list[Row]]:
    """Reads any of the three formats; returns (kind, rows), kind in train|clean|unlabelled.

    Raises UserError naming the file and line for a missing file, an unknown header, a row with
    the wrong number of fields, a bad id or landmark id, a duplicate id, or no rows at all.
    """
    fileio.require_file(path)
    with fileio.reading(path), tf.io.gfile.GFile(path, "r") as f:
        reader = csv.reader(f)
        header = [h.strip().lstrip("\ufeff").lower() for h in next(reader, [])]
        kind = _kind(path, header)
        parse = _ROW_PARSERS[kind]
        rows = _unique(path, parse(path, header, _numbered(reader, len(header), path)))
    if not rows:
        raise UserError(f"{path}: no images listed (only a header)")
    return kind, rows


def _kind(path: str, header: list[str]) -> str:
    if "landmark_id" in header and "images" in header:
        return "clean"
    if "id" in header and "landmark_id" in header:
        return "train"
    if "id" in header:
        return "unlabelled"
    raise UserError(
        f"{path}:1: header {','.join(header) or '(empty)'} has none of the GLDv2 column sets "
        "id,url,landmark_id (train.csv), landmark_id,images (train_clean.csv), id[,url] "
        "(index.csv/test.csv)"
    )


def _numbered(reader, width: int, path: str) -> Iterator[tuple[int, list[str]]]:
    try:
        for fields in reader:
            if not fields:  # blank line
                continue
            if len(fields) != width:
                raise UserError(
                    f"{path}:{reader.line_num}: expected {width} fields, got {len(fields)}"
                )
            yield reader.line_num, fields
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV row ({e})") from None


def _parse_id(path: str, line: int, value: str) -> str:
    value = value.strip()
    if id_problem(value):
        raise UserError(
            f"{path}:{line}: bad image id {value!r} (want 3+ characters from [0-9A-Za-z_-])"
        )
    return value


def _parse_landmark(path: str, line: int, value: str) -> int:
    try:
        landmark = int(value.strip())
    except ValueError:
        raise UserError(f"{path}:{line}: landmark_id {value!r} is not an integer") from None
    if landmark < 0:
        raise UserError(f"{path}:{line}: landmark_id {landmark} is negative")
    return landmark


def _train_rows(path, header, numbered) -> Iterator[Row]:
    i_id, i_lm = header.index("id"), header.index("landmark_id")
    for line, f in numbered:
        yield Row(_parse_id(path, line, f[i_id]), _parse_landmark(path, line, f[i_lm]), line)


def _clean_rows(path, header, numbered) -> Iterator[Row]:
    i_lm, i_images = header.index("landmark_id"), header.index("images")
    for line, f in numbered:
        landmark = _parse_landmark(path, line, f[i_lm])
        for image_id in f[i_images].split():
            yield Row(_parse_id(path, line, image_id), landmark, line)


def _unlabelled_rows(path, header, numbered) -> Iterator[Row]:
    i_id = header.index("id")
    for line, f in numbered:
        yield Row(_parse_id(path, line, f[i_id]), UNLABELLED, line)


_ROW_PARSERS = {"train": _train_rows, "clean": _clean_rows, "unlabelled": _unlabelled_rows}


def _unique(path: str, rows: Iterable[Row]) -> list[Row]:
    first_line: dict[str, int] = {}
    out = []
    for row in rows:
        if row.image_id in first_line:
            seen = first_line[row.image_id]
            raise UserError(f"{path}:{row.line}: duplicate image id {row.image_id} (line {seen})")
        first_line[row.image_id] = row.line
        out.append(row)
    return out
