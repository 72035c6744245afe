"""landmark-pseudolabel: confident kNN labels for unlabelled images, as an extra training list.

The seeds' recipe: WeChat (GLR2019) "used the best models to assign pseudo labels and trained
again"; Baidu trained on the index set too. Each unlabelled image gets the landmark whose `k`
nearest labelled neighbours have the largest summed cosine (the GLR2020 recognition vote);
its confidence is that sum divided by k, so it lies in [-1, 1] and reads as "the mean over the
k neighbours of the cosine to a neighbour of this landmark (0 for the others)": 1 only when all
k neighbours are that landmark at cosine 1. Images at or above `threshold` are written.
No solution file is read: the labels come from the embeddings alone.

Reads: a labelled embedding set (.npz with landmark_ids, e.g. train) and an unlabelled one
(index, test, or any CSV of images embedded by landmark-embed). Writes: `output` in train.csv
format plus a confidence column (id,url,landmark_id,confidence; url empty), best first per
landmark id. landmark-tfrecords takes it as --train_csv (with the unlabelled images' folder as
--image_dir); train it as an extra stage with `landmark-train --init_from=<earlier workdir>`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from landmark_tf.curation.clean import csv_text, positions, write_text
from landmark_tf.data import gldv2
from landmark_tf.errors import UserError
from landmark_tf.retrieval import embeddings as embeddings_lib
from landmark_tf.retrieval import knn

HEADER = ["id", "url", "landmark_id", "confidence"]


@dataclasses.dataclass
class PseudoLabelConfig:
    """labelled / unlabelled: .npz embedding sets; output: the CSV to write."""

    labelled: str
    unlabelled: str
    output: str
    threshold: float = 0.5
    k: int = 5
    batch_size: int = knn.DEFAULT_BATCH

    def validate(self) -> PseudoLabelConfig:
        checks = [
            (self.labelled, "--labelled is required"),
            (self.unlabelled, "--unlabelled is required"),
            (self.output, "--output is required"),
            (-1 <= self.threshold <= 1, f"--threshold={self.threshold}: must be in [-1, 1]"),
            (self.k >= 1, f"--k={self.k}: must be >= 1"),
            (self.batch_size >= 1, f"--batch_size={self.batch_size}: must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


def vote(scores: np.ndarray, neighbour_landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised kNN vote: the landmark with the largest summed similarity per query.

    Args:
      scores: float32[Q, k] neighbour cosines (-inf for missing neighbours).
      neighbour_landmarks: int64[Q, k]; -1 (no landmark) never wins.

    Returns:
      (landmark int64[Q], summed similarity float64[Q]); -1 and 0 where no neighbour has a
      landmark. Ties go to the smaller landmark id (as knn.vote_landmarks).
    """
    q, k = scores.shape
    rows = np.repeat(np.arange(q), k)
    lm, s = neighbour_landmarks.ravel(), scores.ravel().astype(np.float64)
    ok = (lm >= 0) & np.isfinite(s)
    rows, lm, s = rows[ok], lm[ok], s[ok]
    landmark, total = np.full(q, -1, np.int64), np.zeros(q)
    if not rows.size:
        return landmark, total
    order = np.lexsort((lm, rows))
    rows, lm, s = rows[order], lm[order], s[order]
    start = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (lm[1:] != lm[:-1])])
    seg_rows, seg_lm, seg_sum = rows[start], lm[start], np.add.reduceat(s, start)
    # Per row, the best segment: sort by (row, -sum, landmark) and take each row's first.
    best = np.lexsort((seg_lm, -seg_sum, seg_rows))
    first = np.r_[True, seg_rows[best][1:] != seg_rows[best][:-1]]
    winners = best[first]
    landmark[seg_rows[winners]] = seg_lm[winners]
    total[seg_rows[winners]] = seg_sum[winners]
    return landmark, total


def pseudolabel(cfg: PseudoLabelConfig) -> dict:
    """Runs landmark-pseudolabel; returns the closing JSON (labelled, threshold, ...)."""
    cfg.validate()
    ref = embeddings_lib.load_embeddings(cfg.labelled)
    if ref.landmark_ids is None:
        raise UserError(f"{cfg.labelled}: has no landmark_ids; the labelled set must be labelled "
                        "(embed train records or a train.csv)")
    todo = embeddings_lib.load_embeddings(cfg.unlabelled)
    knn.check_dims(ref.dim, todo.dim, "labelled and unlabelled sets")
    already = positions(ref.ids, todo.ids) >= 0  # never relabel an image that has a label
    # The output is a train list landmark-tfrecords turns into paths: leave out ids it refuses.
    problems = {i: p for i in todo.ids.tolist() if (p := gldv2.id_problem(i))}
    refused = np.isin(todo.ids, list(problems)) if problems else np.zeros(len(todo), bool)
    already |= refused
    has_label = ref.landmark_ids >= 0
    database, _ = knn.l2_normalize(ref.embeddings[has_label])
    queries, _ = knn.l2_normalize(todo.embeddings[~already])
    scores, nn = knn.Searcher(database, batch_size=cfg.batch_size).search(
        queries, cfg.k, desc="landmark-pseudolabel")
    landmark, total = vote(scores, np.where(nn >= 0, ref.landmark_ids[has_label][nn], -1))
    confidence = total / cfg.k
    chosen = (landmark >= 0) & (confidence >= cfg.threshold)
    ids = todo.ids[~already][chosen]
    lm, conf = landmark[chosen], confidence[chosen]
    order = np.lexsort((ids, -conf, lm))
    rows = [[i, "", int(m), f"{c:.6f}"] for i, m, c in
            zip(ids[order].tolist(), lm[order].tolist(), conf[order].tolist(), strict=True)]
    write_text(cfg.output, csv_text(HEADER, rows))
    return {
        "labelled": len(rows), "threshold": cfg.threshold, "candidates": int((~already).sum()),
        "skipped_already_labelled": int((already & ~refused).sum()),
        "skipped": [{"id": i, "reason": p} for i, p in sorted(problems.items())],
        "classes": len(np.unique(lm)),
        "k": cfg.k, "output": cfg.output,
        "mean_confidence": float(conf.mean()) if len(conf) else None,
    }
