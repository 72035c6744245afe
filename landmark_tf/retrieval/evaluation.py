"""landmark-evaluate's pipeline: load embedding sets -> kNN (faiss) -> optional re-ranking ->
Kaggle mAP@100 / GAP, revisited Oxford/Paris mAP, and Kaggle submission files.

`evaluate(EvalConfig)` returns the closing-JSON dict; a human-readable summary goes to stderr.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from landmark_tf.errors import UserError
from landmark_tf.retrieval import (
    discriminative,
    knn,
    metrics,
    nonlandmark,
    rerank,
    revisitop,
    solutions,
)
from landmark_tf.retrieval.embeddings import EmbeddingSet, load_embeddings

# alpha-QE / DBA, each optionally followed by two-stage discriminative re-ranking (needs --train).
RERANK_METHODS = rerank.METHODS + tuple(
    discriminative.NAME if m == "none" else f"{discriminative.NAME}+{m}" for m in rerank.METHODS
)


@dataclasses.dataclass
class EvalConfig:
    """What to evaluate; paths may be local or gs://. See landmark_tf/cli/evaluate.py flags."""

    queries: str | None
    index: str | None = None
    train: str | None = None
    k: int = metrics.MAX_PREDICTIONS
    batch_size: int = knn.DEFAULT_BATCH
    index_type: str = "flat"
    nlist: int = 0
    nprobe: int = 16
    recall_sample: int = 1000
    rerank: str = "none"
    qe_k: int = 10
    aqe_alpha: float = 3.0
    solution: str | None = None
    submission: str | None = None
    recognition_k: int = 10
    recognition_solution: str | None = None
    recognition_submission: str | None = None
    revisitop_gnd: str | None = None
    seed: int = 0
    rerank_threshold: float = 0.0
    nonlandmark: str | None = None
    nonlandmark_method: str = "both"
    penalty_weight: float = -1.0
    penalty_neighbours: int = 0

    def check(self) -> None:
        if not self.queries:
            raise UserError("--queries is required: the query embedding set (.npz)")
        if not (self.index or self.train):
            raise UserError("nothing to do: give --index (retrieval) and/or --train (recognition)")
        needs_index = (self.solution, self.submission, self.revisitop_gnd)
        if not self.index and any(needs_index):
            raise UserError("--solution, --submission and --revisitop_gnd need --index")
        needs_train = (self.recognition_solution, self.recognition_submission)
        if not self.train and any(needs_train):
            raise UserError("--recognition_solution/--recognition_submission need --train")
        for name in ("k", "batch_size", "nprobe", "recognition_k"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.rerank not in RERANK_METHODS:
            raise UserError(f"--rerank must be one of {RERANK_METHODS}, got {self.rerank!r}")
        if discriminative.split_method(self.rerank)[1] and not (self.train and self.index):
            raise UserError(f"--rerank={self.rerank} needs --train (labelled) and --index")
        if self.nonlandmark and not self.train:
            raise UserError("--nonlandmark adjusts recognition confidences: it needs --train")
        if self.nonlandmark_method not in nonlandmark.METHODS:
            raise UserError(f"--nonlandmark_method must be one of {nonlandmark.METHODS}")
        if self.qe_k < 0 or self.aqe_alpha < 0 or self.recall_sample < 0 or self.nlist < 0:
            raise UserError("--qe_k, --aqe_alpha, --recall_sample and --nlist must be >= 0")


class _Report:
    """Collects the JSON results and the human-readable lines and warnings (to stderr)."""

    def __init__(self):
        self.result: dict = {}
        self.rows: list[tuple[str, str]] = []

    def add(self, key: str, value, label: str | None = None) -> None:
        self.result[key] = value
        if label is not None:
            self.rows.append((label, str(value)))

    def warn(self, key: str, count: int, message: str) -> None:
        self.result[key] = count
        if count:
            print(f"landmark-evaluate: warning: {count} {message}", file=sys.stderr)

    def print_table(self) -> None:
        width = max((len(label) for label, _ in self.rows), default=0)
        for label, shown in self.rows:
            print(f"  {label:<{width}}  {shown}", file=sys.stderr)


def evaluate(cfg: EvalConfig) -> dict:
    """Runs every evaluation `cfg` asks for; returns the closing-JSON dict."""
    cfg.check()
    report = _Report()
    queries = load_embeddings(cfg.queries)
    q_vecs = _unit(queries, cfg.queries, report, "queries")
    report.add("queries", len(queries), "queries")
    if cfg.index:
        _retrieval(cfg, queries, q_vecs, report)
    if cfg.train:
        _recognition(cfg, queries, q_vecs, report)
    report.print_table()
    return report.result


def _unit(es: EmbeddingSet, path: str, report: _Report, name: str) -> np.ndarray:
    vecs, changed = knn.l2_normalize(es.embeddings)
    report.warn(f"{name}_renormalised", changed, f"{name} vectors in {path} were not unit length")
    return vecs


def _load_database(path: str, queries: EmbeddingSet, report: _Report, name: str):
    es = load_embeddings(path)
    knn.check_dims(es.dim, queries.dim, f"--{name} ({path}) and --queries")
    return es, _unit(es, path, report, name)


def _retrieval(cfg: EvalConfig, queries: EmbeddingSet, q_vecs, report: _Report) -> None:
    index, x_vecs = _load_database(cfg.index, queries, report, "index")
    report.add("index", len(index), "index images")
    searcher = _searcher(cfg, x_vecs, report, "index")
    t0 = time.perf_counter()
    vector_method, discriminative_rerank = discriminative.split_method(cfg.rerank)
    q_final, searcher = rerank.rerank_vectors(
        q_vecs, searcher, vector_method, cfg.qe_k, cfg.aqe_alpha
    )
    t1 = time.perf_counter()
    scores, ids = searcher.search(q_final, cfg.k, desc="search")
    t2 = time.perf_counter()
    if discriminative_rerank:
        ids = _discriminative(cfg, queries, q_vecs, x_vecs, ids, report)
    report.add("rerank", cfg.rerank, "re-ranking")
    report.add("rerank_seconds", round(t1 - t0, 3))
    report.add("search_queries_per_second", round(len(q_final) / max(t2 - t1, 1e-9), 1), "q/s")
    if searcher.ivf is not None:
        _ivf_recall(cfg, searcher, q_final, ids, report)
    index_ids = index.ids.tolist()  # rows below share these str objects: no copy per hit
    ranked = [[index_ids[j] for j in row if j >= 0] for row in ids.tolist()]
    predictions = dict(zip(queries.ids.tolist(), ranked, strict=True))
    _retrieval_scores(cfg, queries, index, predictions, report)
    if cfg.submission:
        text = solutions.format_retrieval_submission(
            queries.ids.tolist(), [r[: metrics.MAX_PREDICTIONS] for r in ranked]
        )
        solutions.write_text(cfg.submission, text)
        report.add("submission", cfg.submission, "submission")
    if cfg.revisitop_gnd:
        _revisitop(cfg, queries, index, q_final, searcher.database, report)


def _discriminative(cfg, queries, q_vecs, x_vecs, ids, report: _Report) -> np.ndarray:
    """Label step against --train, then sort + insert (retrieval/discriminative.py)."""
    t0 = time.perf_counter()
    train, t_vecs = _labelled_train(cfg, queries, report)
    searcher = _searcher(cfg, t_vecs, report, "train")
    ids, q_labels = discriminative.discriminative_rerank(
        ids, q_vecs, x_vecs, searcher, train.landmark_ids, threshold=cfg.rerank_threshold
    )
    report.add("discriminative_seconds", round(time.perf_counter() - t0, 3))
    report.add("discriminative_labelled_queries", int(np.sum(q_labels.landmarks >= 0)))
    return ids


def _labelled_train(cfg: EvalConfig, queries: EmbeddingSet, report: _Report):
    train, t_vecs = _load_database(cfg.train, queries, report, "train")
    if train.landmark_ids is None:
        raise UserError(f"--train {cfg.train}: has no landmark_ids; recognition needs labels")
    return train, t_vecs


def _searcher(cfg: EvalConfig, vecs: np.ndarray, report: _Report, name: str) -> knn.Searcher:
    t0 = time.perf_counter()
    searcher = knn.Searcher(
        vecs,
        cfg.index_type,
        nlist=cfg.nlist,
        nprobe=cfg.nprobe,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    if searcher.ivf is not None:
        report.add(f"{name}_ivf_nlist", int(searcher.ivf.nlist), f"{name} IVF lists")
        report.add(f"{name}_ivf_nprobe", int(searcher.ivf.nprobe), f"{name} IVF nprobe")
        report.add(f"{name}_build_seconds", round(time.perf_counter() - t0, 3))
    return searcher


def _ivf_recall(cfg, searcher: knn.Searcher, q_final, ids, report: _Report) -> None:
    """Recall@k of the IVF results against exact search on a random sample of queries."""
    n = min(cfg.recall_sample, len(q_final))
    if n == 0:
        return
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(q_final), n, replace=False))
    exact = knn.Searcher(searcher.database, "flat", batch_size=cfg.batch_size)
    _, exact_ids = exact.search(q_final[rows], ids.shape[1])
    recall = knn.recall_at_k(ids[rows], exact_ids)
    report.add(f"ivf_recall@{ids.shape[1]}", round(recall, 4), f"IVF recall@{ids.shape[1]}")
    report.add("ivf_recall_sample", n)


def _retrieval_scores(cfg, queries, index, predictions, report: _Report) -> None:
    if cfg.solution:
        sol = solutions.read_solution(cfg.solution, "retrieval")
        source = cfg.solution
    elif queries.landmark_ids is not None and index.landmark_ids is not None:
        sol = solutions.solution_from_labels(
            queries.ids, queries.landmark_ids, index.ids, index.landmark_ids
        )
        source = "landmark_ids"
    else:
        return
    report.add("retrieval_solution", source)
    scored = sol.subset()
    _check_coverage(scored, predictions, source, report, "retrieval")
    known = set(index.ids.tolist())
    unknown = {img for rel in scored.values() for img in rel if img not in known}
    report.warn(
        "solution_images_unknown", len(unknown), f"index ids in {source} are not in --index"
    )
    report.add("solution_queries_without_relevant", sum(1 for r in scored.values() if not r))
    if cfg.k < metrics.MAX_PREDICTIONS:
        print(f"landmark-evaluate: note: --k={cfg.k} < 100 predictions per query", file=sys.stderr)
    _score(sol, metrics.mean_average_precision, predictions, "map@100", "mAP@100", report)
    if "map@100" not in report.result:
        raise UserError(f"{source}: no scored query has a relevant image")


def _score(sol: solutions.Solution, metric, predictions, key: str, label: str, report) -> None:
    """Reports `metric` over all scored queries (`key`), then per Usage (`key`_public, ...)."""
    for suffix, usage, subset in sol.scored_subsets():
        if any(subset.values()):
            report.add(f"{key}{suffix}", round(metric(predictions, subset), 6), f"{label} {usage}")


def _check_coverage(scored: dict, predictions: dict, source: str, report, task: str) -> None:
    missing = sum(1 for q in scored if q not in predictions)
    if scored and missing == len(scored):
        raise UserError(f"{source}: none of its {len(scored)} scored query ids are in --queries")
    report.warn(
        f"{task}_solution_queries_missing",
        missing,
        f"scored query ids in {source} are not in --queries (they score 0)",
    )
    extra = sum(1 for q in predictions if q not in scored)
    report.add(f"{task}_queries_not_scored", extra)


def _recognition(cfg: EvalConfig, queries: EmbeddingSet, q_vecs, report: _Report) -> None:
    train, t_vecs = _labelled_train(cfg, queries, report)
    report.add("train", len(train), "train images")
    searcher = _searcher(cfg, t_vecs, report, "train")
    scores, ids = searcher.search(q_vecs, cfg.recognition_k, desc="recognition search")
    neighbour_landmarks = np.where(ids >= 0, train.landmark_ids[np.maximum(ids, 0)], -1)
    landmarks, confidence = knn.vote_landmarks(scores, neighbour_landmarks)
    if cfg.nonlandmark:
        confidence = _nonlandmark(cfg, queries, q_vecs, confidence, searcher, train, report)
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


def _nonlandmark(cfg, queries, q_vecs, confidence, searcher, train, report: _Report):
    """Calibrates the non-landmark handling on a validation split, applies it to the queries."""
    es = load_embeddings(cfg.nonlandmark)
    nonlandmark.check_set("nonlandmark", cfg.nonlandmark, es.dim, queries.dim, len(es))
    nl_vecs = _unit(es, cfg.nonlandmark, report, "nonlandmark")
    del es
    fixed_weight = cfg.penalty_weight if cfg.penalty_weight >= 0 else None
    cal = nonlandmark.calibrate(
        cfg.nonlandmark_method, searcher, train.landmark_ids, nl_vecs, k=cfg.recognition_k,
        weight=fixed_weight, neighbours=cfg.penalty_neighbours or None, seed=cfg.seed,
    )  # fmt: skip
    report.add("nonlandmark_images", len(nl_vecs), "non-landmark images")
    report.add("nonlandmark_method", cal.method, "non-landmark handling")
    report.add("nonlandmark_penalty_weight", cal.weight, "penalty weight (lambda)")
    report.add("nonlandmark_penalty_neighbours", cal.neighbours, "penalty neighbours (n)")
    report.add("nonlandmark_classifier_exponent", cal.exponent, "classifier exponent (g)")
    report.add("nonlandmark_validation_queries", cal.validation_queries)
    before, after = cal.validation_gap_before, cal.validation_gap
    report.add("nonlandmark_validation_gap_before", before, "validation GAP before")
    report.add("nonlandmark_validation_gap", after, "validation GAP after")
    return nonlandmark.apply(cal, q_vecs, confidence, searcher, nl_vecs, seed=cfg.seed)


def _recognition_scores(cfg, queries, predictions, report: _Report) -> None:
    if cfg.recognition_solution:
        sol = solutions.read_solution(cfg.recognition_solution, "recognition")
        source = cfg.recognition_solution
    elif queries.landmark_ids is not None:
        sol = solutions.solution_from_labels(queries.ids, queries.landmark_ids)
        source = "landmark_ids"
    else:
        return
    report.add("recognition_solution", source)
    scored = sol.subset()
    all_queries = dict.fromkeys(queries.ids.tolist())
    _check_coverage(scored, all_queries, source, report, "recognition")
    _score(sol, metrics.global_average_precision, predictions, "gap", "GAP", report)
    if "gap" not in report.result:
        raise UserError(f"{source}: no scored query has a landmark")


def _revisitop(cfg, queries, index, q_final, x_final, report: _Report) -> None:
    gnd = revisitop.load_gnd(cfg.revisitop_gnd)
    db_rows, q_rows, distractors, extra_q = revisitop.align(gnd, index.ids, queries.ids)
    report.add("revisitop_distractors", distractors, "revisitop distractors")
    report.warn("revisitop_queries_ignored", extra_q, "--queries ids are not in qimlist")
    ranks = revisitop.full_ranking(x_final[db_rows], q_final[q_rows])
    results = revisitop.evaluate(ranks, gnd["gnd"])
    report.add("revisitop", results)
    for name, r in results.items():
        if r["queries"] == 0:
            continue  # no query has positives under this protocol
        report.add(f"revisitop_map_{name}", round(r["map"], 6), f"revisitop mAP {name}")
