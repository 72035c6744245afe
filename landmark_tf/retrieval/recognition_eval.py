"""landmark-evaluate's recognition half (GLR2020): kNN over a labelled train set -> one landmark
and confidence per query by similarity voting -> GAP, and the Kaggle recognition submission."""

from __future__ import annotations

import numpy as np

from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn, metrics, solutions
from landmark_tf.retrieval.eval_report import Report, check_coverage, score


def recognize(cfg, queries, q_vecs: np.ndarray, searcher: knn.Searcher,
              train_landmark_ids: np.ndarray, report: Report, adjust_confidence=None) -> None:
    """Votes a landmark per query from its `cfg.recognition_k` train neighbours; scores it.

    Args:
      cfg: an evaluation.EvalConfig.
      queries: ids / landmark_ids of the queries (EmbeddingFile or EmbeddingSet).
      q_vecs: float32[Q, D] unit query vectors.
      searcher: over the train vectors; train_landmark_ids: int64[N] its labels.
      adjust_confidence: float32[Q] -> float32[Q], e.g. the non-landmark handling.
    """
    scores, ids = searcher.search(q_vecs, cfg.recognition_k, desc="recognition search")
    neighbour_landmarks = np.where(ids >= 0, train_landmark_ids[np.maximum(ids, 0)], -1)
    landmarks, confidence = knn.vote_landmarks(scores, neighbour_landmarks)
    if adjust_confidence is not None:
        confidence = adjust_confidence(confidence)
    qids = queries.ids.tolist()
    predictions = {
        q: (int(lm), float(c))
        for q, lm, c in zip(qids, landmarks, confidence, strict=True)
        if lm >= 0
    }
    _recognition_scores(cfg, queries, predictions, report)
    if cfg.recognition_submission:
        text = solutions.format_recognition_submission(qids, landmarks, confidence)
        solutions.write_text(cfg.recognition_submission, text)
        report.add("recognition_submission", cfg.recognition_submission, "recognition submission")


def _recognition_scores(cfg, queries, predictions, report: Report) -> None:
    if cfg.recognition_solution:
        sol = report.ground_truth["recognition_solution"]
        source = cfg.recognition_solution
    elif queries.landmark_ids is not None:
        sol = solutions.solution_from_labels(queries.ids, queries.landmark_ids)
        source = "landmark_ids"
    else:
        return
    report.add("recognition_solution", source)
    scored = sol.subset()
    all_queries = dict.fromkeys(queries.ids.tolist())
    check_coverage(scored, all_queries, source, report, "recognition")
    score(sol, metrics.global_average_precision, predictions, "gap", "GAP", report)
    if "gap" not in report.result:
        raise UserError(f"{source}: no scored query has a landmark")
