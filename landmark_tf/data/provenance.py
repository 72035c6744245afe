"""Which training list built a model: the landmark exclusion list of landmark-tfrecords, carried
from dataset_info.json to the workdir's config.json, the export's metadata.json, the embedding
sets, and printed by landmark-evaluate beside every Revisited Oxford/Paris number.

Why: 36 of 70 ROxford and 38 of 70 RParis query landmarks are in GLDv2-clean (RGLDv2-clean,
Song et al., CVPR 2024; dealicious-inc/RGLDv2-clean), so a model trained on GLDv2 without an
exclusion list has seen half of the test landmarks.

The exclusion list (`--exclude_landmarks=PATH`) is read as given, never downloaded:
  - a text file with one landmark id per line (blank lines and `#` comments ignored), or
  - a CSV whose header has a `landmark_id` column (other columns, e.g. names, are ignored).
Its record (`training_list` in dataset_info.json):
  {"train_csv": path, "clean_csv": path or "", "exclude_landmarks": null or
   {"path", "sha256", "landmarks_listed", "landmarks_excluded", "images_excluded"}}
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from typing import Any

from landmark_tf.errors import UserError

KEY = "training_list"
UNKNOWN = "unknown training list"
_DATASET_INFO = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class ExclusionList:
    path: str
    sha256: str
    landmark_ids: frozenset[int]


def read_exclusion_list(path: str) -> ExclusionList:
    """Reads a list of landmark ids (see the module docstring); UserError naming file:line."""
    from landmark_tf import fileio  # here: evaluation imports this module without TensorFlow

    fileio.require_file(path)
    data = fileio.read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--exclude_landmarks {path}: not a text file ({e})") from e
    rows = list(csv.reader(io.StringIO(text)))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    column, first = (header.index("landmark_id"), 1) if "landmark_id" in header else (0, 0)
    ids = set()
    for number, row in enumerate(rows[first:], start=first + 1):
        cell = row[column].strip() if len(row) > column else ""
        if not cell or cell.startswith("#"):
            continue
        try:
            ids.add(int(cell))
        except ValueError:
            raise UserError(f"{path}:{number}: {cell!r} is not a landmark id (expected one "
                            "integer per line, or a CSV with a landmark_id column)") from None
    if not ids:
        raise UserError(f"--exclude_landmarks {path}: lists no landmark id")
    return ExclusionList(path, hashlib.sha256(data).hexdigest(), frozenset(ids))


def record(train_csv: str, clean_csv: str, exclusion: ExclusionList | None,
           landmarks_excluded: int, images_excluded: int) -> dict[str, Any]:
    """The `training_list` entry of dataset_info.json."""
    excluded = None
    if exclusion is not None:
        excluded = {"path": exclusion.path, "sha256": exclusion.sha256,
                    "landmarks_listed": len(exclusion.landmark_ids),
                    "landmarks_excluded": landmarks_excluded, "images_excluded": images_excluded}
    return {"train_csv": train_csv, "clean_csv": clean_csv, "exclude_landmarks": excluded}


def of_dataset_info(info: dict) -> dict[str, Any] | None:
    """The record of a dataset_info.json; conversions made before the flag existed had no
    exclusion list, so their record says so (from the CSVs in `source`)."""
    if isinstance(info.get(KEY), dict):
        return info[KEY]
    source = info.get("source") or {}
    if not source.get("train_csv"):
        return None  # an unlabelled split (index/test): not a training list
    return record(source["train_csv"], source.get("clean_csv", ""), None, 0, 0)


def find(path: str) -> dict[str, Any] | None:
    """The record behind `path`: a landmark-tfrecords folder or its dataset_info.json, a
    landmark-train workdir, or a landmark-export/ensemble folder. None when it cannot be known."""
    from landmark_tf import fileio

    if path.endswith(".json"):
        return _from_json(fileio.read_json(path))
    for name in ("metadata.json", "config.json", _DATASET_INFO):
        candidate = fileio.join(path, name)
        if fileio.exists(candidate):
            return _from_json(fileio.read_json(candidate))
    raise UserError(f"--training_data {path}: not a landmark-tfrecords output, training workdir "
                    "or export (no dataset_info.json, config.json or metadata.json)")


def _from_json(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    if KEY in obj:  # an export's metadata.json, or dataset_info.json
        return obj[KEY] if isinstance(obj[KEY], dict) else None
    data = obj.get("data")
    if isinstance(data, dict):  # a workdir's config.json
        if isinstance(data.get(KEY), dict):
            return data[KEY]
        return of_data_dir(data.get("data_dir") or "")
    if "splits" in obj:
        return of_dataset_info(obj)
    return None


def of_data_dir(data_dir: str) -> dict[str, Any] | None:
    """The record of a landmark-tfrecords folder; None when it is not readable (e.g. gone)."""
    from landmark_tf import fileio

    path = fileio.join(data_dir, _DATASET_INFO) if data_dir else ""
    if not path or not fileio.exists(path):
        return None
    try:
        info = fileio.read_json(path)
    except (UserError, ValueError):
        return None
    return of_dataset_info(info) if isinstance(info, dict) else None


def combine(records: list) -> dict[str, Any] | None:
    """An ensemble's record: its members' common one, or {"members": [...]} when they differ."""
    if all(r == records[0] for r in records):
        return records[0]
    return {"members": records}


def describe(rec: dict[str, Any] | None) -> str:
    """One phrase for the tables: which list trained the model, or UNKNOWN."""
    if not rec:
        return UNKNOWN
    if "members" in rec:
        return "; ".join(f"member {i}: {describe(r)}" for i, r in enumerate(rec["members"]))
    excluded = rec.get("exclude_landmarks")
    train = rec.get("train_csv") or "?"
    if not excluded:
        return f"trained on {train}, no landmark exclusion list (may overlap ROxf/RPar)"
    return (f"trained on {train} without the {excluded['landmarks_listed']} landmarks of "
            f"{excluded['path']} (sha256 {excluded['sha256'][:12]}, "
            f"{excluded['images_excluded']} images excluded)")


def to_text(rec: dict[str, Any] | None) -> str:
    """JSON text of a record for an embedding set's `training_list` member ("" = unknown)."""
    return json.dumps(rec, sort_keys=True) if rec else ""


def from_text(text: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(text) if text else None
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None
