"""Kaggle's Google Landmark metrics, computed exactly as the GLR2019/2020 scorers did.

The reference is the organisers' Python port (tensorflow/models, research/delf/.../
google_landmarks_dataset/metrics.py); each function notes where it follows that code's choices.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

MAX_PREDICTIONS = 100


def average_precision(
    prediction: Sequence[str], relevant: Collection[str], max_predictions: int = MAX_PREDICTIONS
) -> float:
    """AP@max_predictions of one ranked list.

    Sum of precision at each rank i (1-based) that holds a relevant image, over the first
    `max_predictions` entries, divided by min(len(relevant), max_predictions). A repeated image
    scores only at its first rank but still occupies its later ranks (as Kaggle's scorer did).

    Raises:
      ValueError: `relevant` is empty (such queries are excluded from the mean instead).
    """
    if not relevant:
        raise ValueError("average precision is undefined without relevant images")
    seen: set[str] = set()
    hits = 0
    total = 0.0
    for rank, image in enumerate(prediction[:max_predictions], start=1):
        if image in seen:
            continue
        seen.add(image)
        if image in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), max_predictions)


def mean_average_precision(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Collection[str]],
    max_predictions: int = MAX_PREDICTIONS,
) -> float:
    """Kaggle retrieval mAP@100.

    Args:
      predictions: query id -> ranked index image ids. Queries absent here score 0; ids absent
        from `solution` are not scored (Kaggle rejected them; the CLI counts them instead).
      solution: query id -> relevant index image ids. Queries with none are left out of the mean.

    Returns:
      The mean AP over the solution's queries that have relevant images.

    Raises:
      ValueError: no query in `solution` has a relevant image.
    """
    scored = {q: rel for q, rel in solution.items() if rel}
    if not scored:
        raise ValueError("no query in the solution has a relevant image")
    total = sum(
        average_precision(predictions[q], rel, max_predictions)
        for q, rel in scored.items()
        if q in predictions
    )
    return total / len(scored)


def global_average_precision(
    predictions: Mapping[str, tuple[int, float]], solution: Mapping[str, Collection[int]]
) -> float:
    """Kaggle recognition GAP (micro-AP over all queries).

    All predictions are ranked by confidence, descending; ties are broken by query id, then by
    landmark id, ascending (Kaggle's convention, as in the organisers' code). GAP is the sum of
    precision at each correct prediction divided by the number of solution queries that have a
    landmark; queries without one only add wrong predictions.

    Args:
      predictions: query id -> (landmark id, confidence); one prediction per query, queries with
        no prediction left out. Ids absent from `solution` are not scored.
      solution: query id -> landmark ids that count as correct (empty: non-landmark query).

    Raises:
      ValueError: no query in `solution` has a landmark.
    """
    num_positives = sum(1 for landmarks in solution.values() if landmarks)
    if num_positives == 0:
        raise ValueError("no query in the solution has a landmark")
    scored = [(q, p) for q, p in predictions.items() if q in solution]
    scored.sort(key=lambda item: (item[0], item[1][0]))
    scored.sort(key=lambda item: item[1][1], reverse=True)  # stable: keeps the tie order above
    correct = 0
    total = 0.0
    for rank, (query, (landmark, _)) in enumerate(scored, start=1):
        if landmark in solution[query]:
            correct += 1
            total += correct / rank
    return total / num_positives
