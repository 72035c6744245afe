"""What the report reads: metrics JSON, submissions, embeddings, train labels, thumbnails."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
from PIL import Image

from landmark_tf import fileio
from landmark_tf.data import gldv2
from landmark_tf.errors import UserError

THUMB = 128  # pixels, longest side of an image in the grids


def read_closing_json(path: str) -> dict[str, Any]:
    """The last line of a file written from a CLI's stdout (or a plain JSON file)."""
    if not fileio.exists(path):
        raise UserError(f"{path}: not found")
    lines = fileio.read_text(path).strip().splitlines()
    try:
        value = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise UserError(f"{path}: its last line is not JSON") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: its last line is not a JSON object")
    return value


def _rows(path: str, columns: tuple[str, ...]) -> list[list[str]]:
    if not fileio.exists(path):
        raise UserError(f"{path}: not found")
    reader = csv.reader(io.StringIO(fileio.read_text(path)))
    header = next(reader, None) or []
    if any(c not in header for c in columns):
        raise UserError(f"{path}: expected columns {','.join(columns)}; got {header}")
    at = [header.index(c) for c in columns]
    return [[row[i] if i < len(row) else "" for i in at] for row in reader if row]


def read_retrieval_submission(path: str) -> dict[str, list[str]]:
    """Kaggle retrieval CSV (id,images) -> {query id: ranked index ids}."""
    return {q: images.split() for q, images in _rows(path, ("id", "images"))}


def read_recognition_submission(path: str) -> dict[str, tuple[int, float]]:
    """Kaggle recognition CSV (id,landmarks "LID SCORE") -> {query id: (landmark, score)};
    queries without a prediction are left out."""
    out = {}
    for q, value in _rows(path, ("id", "landmarks")):
        parts = value.split()
        if len(parts) == 2:
            try:
                out[q] = (int(parts[0]), float(parts[1]))
            except ValueError:
                raise UserError(f"{path}: bad prediction {value!r} for {q}") from None
    return out


def first_train_image(train_csv: str) -> dict[int, str]:
    """{landmark id: the first of its train images in train.csv} (one pass, no copies)."""
    out: dict[int, str] = {}
    for image_id, landmark in _rows(train_csv, ("id", "landmark_id")):
        out.setdefault(int(landmark), image_id)
    return out


def top_k_from_embeddings(folder: str, query_ids: list[str], k: int) -> dict[str, list[str]]:
    """Top-k index ids by cosine for the given queries, from FOLDER/index.npz and test.npz."""
    from landmark_tf.retrieval import embeddings, knn

    index = embeddings.load_embeddings(fileio.join(folder, "index.npz"))
    test = embeddings.load_embeddings(fileio.join(folder, "test.npz"))
    row = {q: i for i, q in enumerate(test.ids.tolist())}
    wanted = [q for q in query_ids if q in row]
    if not wanted:
        return {}
    q_vecs, _ = knn.l2_normalize(test.embeddings[[row[q] for q in wanted]])
    db, _ = knn.l2_normalize(index.embeddings)
    _, ids = knn.Searcher(db).search(q_vecs, k)
    return {q: [str(index.ids[j]) for j in r if j >= 0] for q, r in zip(wanted, ids, strict=True)}


def thumbnail(image_dir: str, image_id: str, skipped: dict[str, str] | None = None) -> np.ndarray:
    """uint8 [h, w, 3], longest side THUMB, of ROOT/a/b/c/<id>.jpg; grey with an X if missing.

    An id that names no file inside ROOT (gldv2.id_problem: a submission is user input) is
    never read: it gets the grey X and goes into `skipped` {id: reason}."""
    problem = gldv2.id_problem(image_id)
    if problem:
        if skipped is not None:
            skipped[image_id] = problem
        return _blank()
    try:
        data = fileio.read_bytes(gldv2.image_path(image_dir, image_id))
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:  # noqa: BLE001 - a missing or broken image must not stop the report
        return _blank()
    image.thumbnail((THUMB, THUMB))
    return np.asarray(image)


def _blank() -> np.ndarray:
    blank = np.full((THUMB, THUMB, 3), 200, np.uint8)
    idx = np.arange(THUMB)
    blank[idx, idx] = blank[idx, THUMB - 1 - idx] = 90
    return blank
