"""Kaggle GLDv2 solution files (ground truth) and submission files.

retrieval_solution_v2.1.csv    id,images,Usage     images: space-separated index ids, or "None"
recognition_solution_v2.1.csv  id,landmarks,Usage  landmarks: space-separated ids, or empty/"None"
Usage is Public, Private or Ignored (Ignored rows are never scored). A non-landmark query has no
relevant images/landmarks: retrieval leaves it out of the mean, recognition counts its
predictions as wrong.

Submissions: retrieval `id,images` (up to 100 space-separated index ids, best first);
recognition `id,landmarks` with "landmark_id confidence" or an empty field.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence

import numpy as np

from landmark_tf.errors import UserError

USAGES = ("Public", "Private", "Ignored")
LABELS_USAGE = "Labels"  # solutions derived from landmark_ids in the .npz files
_EMPTY = ("", "None")


@dataclasses.dataclass(frozen=True)
class Solution:
    """Ground truth per query id: `truth` (relevant image ids or landmark ids) and `usage`."""

    truth: dict[str, frozenset]
    usage: dict[str, str]

    def subset(self, usage: str | None = None) -> dict[str, frozenset]:
        """Scored queries (not Ignored), optionally only those with the given Usage."""
        return {
            q: t
            for q, t in self.truth.items()
            if self.usage[q] != "Ignored" and (usage is None or self.usage[q] == usage)
        }

    def scored_subsets(self) -> list[tuple[str, str, dict[str, frozenset]]]:
        """(key suffix, name, queries): all scored queries, then Public and Private if present."""
        present = set(self.usage.values())
        out = [("", "all", self.subset())]
        out += [(f"_{u.lower()}", u, self.subset(u)) for u in ("Public", "Private") if u in present]
        return out


def parse_solution(text: str, kind: str, source: str) -> Solution:
    """Parses a solution CSV. kind: "retrieval" (images column) or "recognition" (landmarks)."""
    column = {"retrieval": "images", "recognition": "landmarks"}[kind]
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or any(c not in header for c in ("id", column, "Usage")):
        raise UserError(f"{source}: expected a header with id,{column},Usage; got {header}")
    cols = [header.index(c) for c in ("id", column, "Usage")]
    truth: dict[str, frozenset] = {}
    usage: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < len(header):
            raise UserError(f"{source}:{line}: expected {len(header)} fields, got {row}")
        qid, value, use = (row[c].strip() for c in cols)
        if use not in USAGES:
            raise UserError(f"{source}:{line}: Usage must be one of {USAGES}, got {use!r}")
        if qid in truth:
            raise UserError(f"{source}:{line}: query id {qid!r} appears twice")
        truth[qid] = _parse_truth(value, kind, f"{source}:{line}")
        usage[qid] = use
    if not truth:
        raise UserError(f"{source}: no rows after the header")
    return Solution(truth, usage)


def _parse_truth(value: str, kind: str, where: str) -> frozenset:
    if value in _EMPTY:
        return frozenset()
    parts = value.split()
    if kind == "retrieval":
        return frozenset(parts)
    try:
        return frozenset(int(p) for p in parts)
    except ValueError:
        raise UserError(f"{where}: landmark ids must be integers, got {value!r}") from None


def read_solution(path: str, kind: str) -> Solution:
    from landmark_tf import fileio

    if not fileio.exists(path):
        raise UserError(f"{path}: solution file not found")
    return parse_solution(fileio.read_text(path), kind, path)


def solution_from_labels(
    query_ids: np.ndarray,
    query_landmarks: np.ndarray,
    index_ids: np.ndarray | None = None,
    index_landmarks: np.ndarray | None = None,
) -> Solution:
    """Ground truth from landmark_ids: retrieval (index images sharing the query's landmark)
    when index arrays are given, else recognition (the query's own landmark); -1 = none."""
    by_landmark: dict[int, list[str]] = {}
    if index_ids is not None:
        for image, lm in zip(index_ids.tolist(), index_landmarks.tolist(), strict=True):
            if lm >= 0:
                by_landmark.setdefault(lm, []).append(image)
    truth = {}
    for qid, lm in zip(query_ids.tolist(), query_landmarks.tolist(), strict=True):
        if index_ids is not None:
            truth[qid] = frozenset(by_landmark.get(lm, ())) if lm >= 0 else frozenset()
        else:
            truth[qid] = frozenset([lm]) if lm >= 0 else frozenset()
    return Solution(truth, dict.fromkeys(truth, LABELS_USAGE))


def format_retrieval_submission(query_ids: Sequence[str], ranked: Sequence[Sequence[str]]) -> str:
    lines = ["id,images"]
    lines += [f"{q},{' '.join(r)}" for q, r in zip(query_ids, ranked, strict=True)]
    return "\n".join(lines) + "\n"


def format_recognition_submission(
    query_ids: Sequence[str], landmarks: np.ndarray, confidences: np.ndarray
) -> str:
    """Landmark -1 (no prediction) writes an empty landmarks field."""
    lines = ["id,landmarks"]
    for q, lm, c in zip(query_ids, landmarks.tolist(), confidences.tolist(), strict=True):
        lines.append(f"{q},{lm} {c:.6f}" if lm >= 0 else f"{q},")
    return "\n".join(lines) + "\n"


def write_text(path: str, text: str) -> None:
    """Atomic write through tf.io.gfile (local or gs://), creating the folder."""
    import os

    from landmark_tf import fileio

    if os.path.dirname(path):
        fileio.makedirs(os.path.dirname(path))
    fileio.write_text_atomic(path, text)
