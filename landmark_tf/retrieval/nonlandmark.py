"""Non-landmark handling for recognition (GAP): lower the confidence of queries that look like
images of no landmark, so that their (necessarily wrong) predictions rank below the right ones.

Two levers, used alone or together, on top of the kNN vote confidence c of each query:
  distractor penalty (as the GLR2020 recognition winner penalised similarity to out-of-domain
    images, Henkel & Pfeiffer, arXiv:2010.01650): m = mean cosine similarity of the query to its
    n nearest images of a non-landmark set;  c' = c - lambda * m.
  landmark classifier (as the Cookpad 2019 team multiplied a landmark/non-landmark classifier's
    probability into the confidence): p = P(landmark | embedding) from an L2-regularised logistic
    regression trained on labelled landmark embeddings vs. the non-landmark set;  c' = p^g * c.
  both:  c' = p^g * c - lambda * m.
lambda, n and g are chosen on a validation split made from the train and non-landmark sets
(held-out train images as landmark queries, half of the non-landmark set as non-landmark
queries), never on the test solution; g = 0 or lambda = 0 switch a lever off where it does not
help on validation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn, metrics
from landmark_tf.retrieval.knn import Searcher

METHODS = ("none", "penalty", "classifier", "both")
LAMBDAS = (0.0,) + tuple(2.0**e for e in range(-3, 7))  # 0, 1/8 .. 64
NEIGHBOURS = (1, 3, 10)
EXPONENTS = (0.0, 0.5, 1.0, 2.0)  # g: how strongly the classifier's probability scales c
_MAX_CLASSIFIER_ROWS = 100_000  # per class: Newton steps cost rows x D^2


def nonlandmark_similarity(queries: np.ndarray, bank: Searcher, n: int) -> np.ndarray:
    """float32[Q]: mean similarity of each query to its n nearest non-landmark images."""
    scores, _ = bank.search(queries, n, desc="non-landmark search")
    scores = np.where(np.isfinite(scores), scores, 0.0)
    return scores.mean(axis=1).astype(np.float32)


def adjusted_confidence(confidence, probability=None, similarity=None, weight=0.0, exponent=1.0):
    """p^g * c - lambda * m (p = 1 without a classifier, m = 0 without a penalty); float32[Q]."""
    out = np.asarray(confidence, np.float64)
    if probability is not None:
        out = out * np.asarray(probability, np.float64) ** exponent
    if similarity is not None:
        out = out - weight * np.asarray(similarity, np.float64)
    return out.astype(np.float32)


class LandmarkClassifier:
    """Logistic regression P(landmark | x) = sigmoid(w.x + b) on unit embeddings, fitted by
    Newton's method with an L2 penalty and balanced class weights (no extra dependency)."""

    def __init__(self, l2: float = 1e-2, iterations: int = 25):
        self.l2, self.iterations = l2, iterations
        self.w: np.ndarray | None = None
        self.b = 0.0

    def fit(self, landmark: np.ndarray, nonlandmark: np.ndarray, seed: int = 0):
        """landmark: float32[P, D]; nonlandmark: float32[M, D]. Subsamples each to 100k rows."""
        rng = np.random.default_rng(seed)
        pos, neg = _sample(landmark, rng), _sample(nonlandmark, rng)
        # float32 rows (at most 2 x 100k x D), float64 only for the (D+1)^2 system.
        ones = np.ones((len(pos) + len(neg), 1), np.float32)
        x = np.hstack([np.concatenate([pos, neg]).astype(np.float32, copy=False), ones])
        y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        sw = np.where(y == 1, 0.5 / len(pos), 0.5 / len(neg))  # balanced, sums to 1
        reg = np.full(x.shape[1], self.l2)
        reg[-1] = 0.0  # the bias is not penalised
        theta = np.zeros(x.shape[1])
        for _ in range(self.iterations):
            p = _sigmoid((x @ theta.astype(np.float32)).astype(np.float64))
            grad = (x.T @ (sw * (p - y)).astype(np.float32)).astype(np.float64) + reg * theta
            h = (sw * p * (1 - p)).astype(np.float32)
            hess = (x.T @ (x * h[:, None])).astype(np.float64) + np.diag(reg + 1e-9)
            step = np.linalg.solve(hess, grad)
            theta -= step
            if np.max(np.abs(step)) < 1e-6:
                break
        self.w, self.b = theta[:-1].astype(np.float32), float(theta[-1])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32[N] landmark probabilities for float32[N, D] rows."""
        if self.w is None:
            raise RuntimeError("fit the classifier first")
        return _sigmoid(x @ self.w + self.b).astype(np.float32)


def _sample(x: np.ndarray, rng) -> np.ndarray:
    if len(x) <= _MAX_CLASSIFIER_ROWS:
        return x
    return x[np.sort(rng.choice(len(x), _MAX_CLASSIFIER_ROWS, replace=False))]


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


@dataclasses.dataclass(frozen=True)
class ValidationSplit:
    """Validation queries: `held_out` train rows (landmark queries, each searched against train
    without itself), non-landmark rows split into `bank` (searched, and used for training) and
    `queries` (non-landmark validation queries)."""

    held_out: np.ndarray
    bank: np.ndarray
    queries: np.ndarray


def validation_split(
    train_landmarks: np.ndarray, num_nonlandmark: int, *, max_queries=5000, seed=0
) -> ValidationSplit:
    """As many train images of landmarks with 2+ images (so that another image of theirs stays
    in train) as non-landmark images: half the non-landmark set, at most `max_queries` each,
    and never every train image (the classifier trains on the train images not held out)."""
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(train_landmarks, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero((counts[inverse] >= 2) & (train_landmarks >= 0))
    perm = rng.permutation(num_nonlandmark)
    half = num_nonlandmark // 2
    n = min(len(eligible), half, max_queries, len(train_landmarks) - 1)
    if n == 0:
        raise UserError("non-landmark validation needs 2+ non-landmark images and a train "
                        "landmark with 2+ images")
    held = np.sort(rng.choice(eligible, n, replace=False))
    return ValidationSplit(held, np.sort(perm[half:]), np.sort(perm[:n]))


def gap_of(landmarks, confidence, truth) -> float:
    """GAP of one prediction per query (landmark -1: none) against int64[Q] truth (-1: none)."""
    pairs = enumerate(zip(landmarks.tolist(), confidence.tolist(), strict=True))
    preds = {i: (lm, c) for i, (lm, c) in pairs if lm >= 0}
    sol = {i: frozenset([int(t)]) if t >= 0 else frozenset() for i, t in enumerate(truth)}
    return metrics.global_average_precision(preds, sol)


def tune(
    landmarks, confidence, truth, similarity_by_n: dict[int, np.ndarray] | None,
    probability=None, weights=None,
) -> tuple[float, int, float, float]:  # fmt: skip
    """Grid search of (lambda, n, g) maximising validation GAP; returns (lambda, n, g, gap).

    Args:
      landmarks, confidence: the validation queries' kNN predictions; truth: their true
        landmarks (-1 for the non-landmark queries).
      similarity_by_n: n -> float32[Q] mean similarity to the n nearest bank images; None
        tunes nothing (classifier only).
      probability: float32[Q] classifier probabilities, or None.
      weights: the lambdas to try (default LAMBDAS).
    """
    best = (-1.0, 0.0, 0, 1.0)
    exponents = EXPONENTS if probability is not None else (1.0,)
    for n, sim in sorted((similarity_by_n or {0: None}).items()):
        for lam in (weights or LAMBDAS) if sim is not None else (0.0,):
            for ex in exponents:
                c = adjusted_confidence(confidence, probability, sim, lam, ex)
                g = gap_of(landmarks, c, truth)
                if g > best[0] + 1e-12:
                    best = (g, lam, n, ex)
    return best[1], best[2], best[3], best[0]


def check_set(name: str, path: str, dim: int, expected_dim: int, count: int) -> None:
    """UserError unless the set is non-empty and has the queries' dimension."""
    if count == 0:
        raise UserError(f"--{name} {path}: empty embedding set")
    if dim != expected_dim:
        raise UserError(
            f"--{name} {path} has {dim}-d embeddings but the queries have {expected_dim}-d; "
            "embed it with the same model"
        )


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What `calibrate` chose, and the validation GAP before and after it."""

    method: str
    weight: float
    neighbours: int
    exponent: float
    validation_queries: int
    validation_gap_before: float
    validation_gap: float


def _loo_vote(train: Searcher, train_landmarks, rows, k):
    """kNN vote of train rows against train without themselves (leave-one-out)."""
    scores, ids = train.search(train.database[rows], k + 1, desc="validation search")
    self_hit = ids == rows[:, None]
    self_hit[~self_hit.any(axis=1), -1] = True  # not found: drop the farthest instead
    drop = np.argmax(self_hit, axis=1)
    keep = np.ones_like(ids, bool)
    keep[np.arange(len(ids)), drop] = False
    scores, ids = scores[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)
    lm = np.where(ids >= 0, train_landmarks[np.maximum(ids, 0)], -1)
    return knn.vote_landmarks(scores, lm)


def calibrate(
    method: str, train: Searcher, train_landmarks: np.ndarray, nonlandmark: np.ndarray, *,
    k: int, weight: float | None = None, neighbours: int | None = None, seed: int = 0,
) -> Calibration:  # fmt: skip
    """Chooses lambda and n for `method` on a validation split (see `validation_split`).

    Args:
      method: one of METHODS.
      train: searcher over the labelled train set; train_landmarks: int64[len(train)].
      nonlandmark: float32[M, D] unit rows of the non-landmark set.
      k: neighbours in the recognition vote.
      weight, neighbours: fix lambda / n instead of searching LAMBDAS / NEIGHBOURS.
    """
    split = validation_split(train_landmarks, len(nonlandmark), seed=seed)
    lm_t, conf_t = _loo_vote(train, train_landmarks, split.held_out, k)
    nl_queries = nonlandmark[split.queries]
    lm_n, conf_n = knn.vote_landmarks(*_vote_inputs(train, train_landmarks, nl_queries, k))
    landmarks, confidence = np.concatenate([lm_t, lm_n]), np.concatenate([conf_t, conf_n])
    truth = np.concatenate([train_landmarks[split.held_out], np.full(len(nl_queries), -1)])
    before = gap_of(landmarks, confidence, truth)
    val_vecs = np.concatenate([train.database[split.held_out], nl_queries])
    probability = None
    if method in ("classifier", "both"):
        clf = fit_classifier(train.database, nonlandmark[split.bank], exclude=split.held_out,
                             seed=seed)  # fmt: skip
        probability = clf.predict(val_vecs)
    sims = None
    if method in ("penalty", "both"):
        bank = Searcher(nonlandmark[split.bank], batch_size=train.batch_size)
        ns = (neighbours,) if neighbours else NEIGHBOURS
        sims = {n: nonlandmark_similarity(val_vecs, bank, n) for n in ns}
    lam, n, ex, after = tune(landmarks, confidence, truth, sims, probability,
                             weights=None if weight is None else (weight,))  # fmt: skip
    return Calibration(method, lam, n, ex, len(truth), round(before, 6), round(after, 6))


def _vote_inputs(train: Searcher, train_landmarks, queries, k):
    scores, ids = train.search(queries, k)
    return scores, np.where(ids >= 0, train_landmarks[np.maximum(ids, 0)], -1)


def fit_classifier(landmark: np.ndarray, nonlandmark: np.ndarray, *, exclude=None, seed=0):
    """A LandmarkClassifier on at most 100k sampled landmark rows (not `exclude`) vs. the
    non-landmark rows; copies only the sample."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(landmark))
    if exclude is not None and len(exclude):
        rows = np.setdiff1d(rows, exclude)
    if len(rows) > _MAX_CLASSIFIER_ROWS:
        rows = np.sort(rng.choice(rows, _MAX_CLASSIFIER_ROWS, replace=False))
    return LandmarkClassifier().fit(landmark[rows], nonlandmark, seed=seed)


def apply(
    calibration: Calibration, queries: np.ndarray, confidence: np.ndarray,
    train: Searcher, nonlandmark: np.ndarray, *, seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """The calibrated adjustment on the test queries, with the whole non-landmark set as bank
    and a classifier refitted on all of it; float32[Q] new confidences."""
    probability = similarity = None
    if calibration.method in ("classifier", "both") and calibration.exponent > 0:
        probability = fit_classifier(train.database, nonlandmark, seed=seed).predict(queries)
    if calibration.method in ("penalty", "both") and calibration.weight > 0:
        bank = Searcher(nonlandmark, batch_size=train.batch_size)
        similarity = nonlandmark_similarity(queries, bank, calibration.neighbours)
    return adjusted_confidence(
        confidence, probability, similarity, calibration.weight, calibration.exponent
    )
