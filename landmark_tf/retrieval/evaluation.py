"""landmark-evaluate's pipeline: load embedding sets -> kNN (faiss) -> optional re-ranking ->
Kaggle mAP@100 / GAP, revisited Oxford/Paris mAP, and Kaggle submission files.

`evaluate(EvalConfig)` returns the closing-JSON dict; a human-readable summary goes to stderr.
Memory: the index / train descriptors are streamed from the file into faiss in chunks and live
only there (see knn.Searcher); only the queries are held as a NumPy array. Recognition is in
recognition_eval, the report and scoring helpers in eval_report.

Re-ranking happens in two places, each a plug point: `rerank.rerank_vectors` changes the query
and database vectors before the search (aqe, dba), `_rerank_results` re-orders each query's
retrieved list after it (a method that re-scores shortlists adds its branch there);
`graph_rerank.rerank` (diffusion, egt) re-orders the search's deeper lists over the index's
k-NN graph right after the search.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

from landmark_tf.data import provenance
from landmark_tf.errors import UserError
from landmark_tf.retrieval import (
    discriminative,
    graph_rerank,
    knn,
    metrics,
    nonlandmark,
    rerank,
    revisitop,
    solutions,
    superglobal,
)
from landmark_tf.retrieval.embeddings import EmbeddingFile, load_embeddings, open_embeddings
from landmark_tf.retrieval.eval_report import Report, check_coverage, score
from landmark_tf.retrieval.recognition_eval import recognize

# alpha-QE / DBA, each optionally followed by SuperGlobal re-ranking of the shortlist and/or
# two-stage discriminative re-ranking (needs --train); or a graph re-ranker (diffusion, egt).
RERANK_METHODS = tuple(
    "+".join(post + ((m,) if m != "none" else ())) or "none"
    for post in ((), (discriminative.NAME,), (superglobal.NAME,),
                 (discriminative.NAME, superglobal.NAME))
    for m in rerank.METHODS
) + graph_rerank.METHODS


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
    spherical_kmeans: bool = True
    rerank_threshold: float = 0.0
    nonlandmark: str | None = None
    nonlandmark_method: str = "both"
    penalty_weight: float = -1.0
    penalty_neighbours: int = 0
    graph_cache: str | None = None
    diffusion_k: int = 50
    diffusion_kq: int = 10
    diffusion_truncation: int = 1000
    diffusion_gamma: float = 3.0
    diffusion_alpha: float = 0.99
    diffusion_iterations: int = 20
    egt_k: int = 100
    egt_threshold: float = float("inf")
    superglobal_shortlist: int = superglobal.SHORTLIST
    superglobal_neighbours: int = superglobal.NEIGHBOURS
    superglobal_beta: float = superglobal.BETA
    training_data: str | None = None

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
        for name in ("k", "batch_size", "nprobe", "recognition_k", "superglobal_shortlist",
                     "superglobal_neighbours"):
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
        graph_rerank.check(self)


def evaluate(cfg: EvalConfig) -> dict:
    """Runs every evaluation `cfg` asks for; returns the closing-JSON dict."""
    cfg.check()
    for flag in ("submission", "recognition_submission"):  # before minutes of search
        if getattr(cfg, flag):
            _check_output_file(getattr(cfg, flag), f"--{flag}")
    report = Report(_read_ground_truth(cfg))
    with open_embeddings(cfg.queries) as queries:
        q_vecs = queries.read_all()
    _warn_renormalised(queries, "queries", report)
    report.add("queries", len(queries), "queries")
    if cfg.index:
        _retrieval(cfg, queries, q_vecs, report)
    if cfg.train:
        _recognition(cfg, queries, q_vecs, report)
    report.print_table()
    return report.result


def _read_ground_truth(cfg: EvalConfig) -> dict:
    out = {}
    if cfg.solution and cfg.index:
        out["solution"] = solutions.read_solution(cfg.solution, "retrieval")
    if cfg.recognition_solution and cfg.train:
        out["recognition_solution"] = solutions.read_solution(cfg.recognition_solution,
                                                              "recognition")
    if cfg.revisitop_gnd and cfg.index:
        out["revisitop_gnd"] = revisitop.load_gnd(cfg.revisitop_gnd)
    if cfg.training_data:  # before the search: a bad path fails in seconds
        out["training_data"] = provenance.find(cfg.training_data)
    return out


def _check_output_file(path: str, flag: str) -> None:
    """UserError when a local file cannot be written at `path` (a folder there, or a file where
    a parent folder should be); gs:// has no folders to collide with. os.path, not tf.io.gfile:
    evaluating local files never imports TensorFlow."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder, expected a file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, expected a folder")


def _warn_renormalised(es: EmbeddingFile, name: str, report: Report) -> None:
    report.warn(f"{name}_renormalised", es.renormalised,
                f"{name} vectors in {es.path} were not unit length")


def _load_database(cfg: EvalConfig, path: str, queries, report: Report, name: str):
    """(EmbeddingFile with ids/labels, closed; Searcher holding its unit vectors)."""
    with open_embeddings(path) as es:
        knn.check_dims(es.dim, queries.dim, f"--{name} ({path}) and --queries")
        _warn_renormalised(es, name, report)
        report.add(name, len(es), f"{name} images")
        t0 = time.perf_counter()
        searcher = knn.Searcher.from_chunks(
            es.chunks, len(es), es.dim, cfg.index_type, nlist=cfg.nlist, nprobe=cfg.nprobe,
            batch_size=cfg.batch_size, seed=cfg.seed, spherical=cfg.spherical_kmeans,
        )  # fmt: skip
    if searcher.ivf is not None:
        report.add(f"{name}_ivf_nlist", int(searcher.ivf.nlist), f"{name} IVF lists")
        report.add(f"{name}_ivf_nprobe", int(searcher.ivf.nprobe), f"{name} IVF nprobe")
        report.add(f"{name}_ivf_spherical", cfg.spherical_kmeans)
    report.add(f"{name}_build_seconds", round(time.perf_counter() - t0, 3))
    return es, searcher


def _retrieval(cfg: EvalConfig, queries, q_vecs, report: Report) -> None:
    index, searcher = _load_database(cfg, cfg.index, queries, report, "index")
    t0 = time.perf_counter()
    graph, rest = graph_rerank.split_method(cfg.rerank)
    vector_method, uses_superglobal = superglobal.split_method(
        discriminative.split_method(rest)[0])
    q_final, searcher = rerank.rerank_vectors(
        q_vecs, searcher, vector_method, cfg.qe_k, cfg.aqe_alpha, in_place=True
    )
    t1 = time.perf_counter()
    if cfg.k > searcher.size:
        report.add("k_clamped_to", searcher.size, f"k (--k={cfg.k} > index size)")
        print(f"landmark-evaluate: note: --k={cfg.k} > the index's {searcher.size} images: "
              f"{searcher.size} neighbours per query", file=sys.stderr)
    if uses_superglobal:
        ids, plain_ids = superglobal.search(searcher, q_final, cfg.k, **_superglobal_args(cfg))
    else:
        scores, ids = searcher.search(q_final, graph_rerank.search_depth(cfg), desc="search")
        plain_ids = ids[:, : cfg.k]
    t2 = time.perf_counter()
    if searcher.ivf is not None:
        _ivf_recall(cfg, searcher, q_final, plain_ids, report)
    if graph:
        ids = graph_rerank.rerank(cfg, searcher, scores, ids, report)
    ids = _rerank_results(cfg, queries, q_vecs, ids, report)
    report.add("rerank", cfg.rerank, "re-ranking")
    report.add("rerank_seconds", round(t1 - t0, 3))
    report.add("search_queries_per_second", round(len(q_final) / max(t2 - t1, 1e-9), 1), "q/s")
    if uses_superglobal:
        report.add("superglobal_shortlist", cfg.superglobal_shortlist, "SuperGlobal shortlist")
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
        _revisitop(cfg, queries, index, q_final, searcher, report)


def _superglobal_args(cfg: EvalConfig) -> dict:
    return dict(shortlist=cfg.superglobal_shortlist, neighbours=cfg.superglobal_neighbours,
                beta=cfg.superglobal_beta)


def _rerank_results(cfg: EvalConfig, queries, q_vecs: np.ndarray, ids: np.ndarray,
                    report: Report) -> np.ndarray:
    """Post-search re-ranking of each query's list (ids int64[Q, k], -1 = none).

    Two-stage discriminative re-ranking (retrieval/discriminative.py): the label step votes a
    landmark for every query (`q_vecs`, before alpha-QE) and every index image (streamed again
    from --index, so before DBA, as the released code labels plain descriptors) over --train;
    then sort + insert.
    """
    if not discriminative.split_method(cfg.rerank)[1]:
        return ids
    t0 = time.perf_counter()
    train, train_searcher = _labelled_train(cfg, queries, report)
    with open_embeddings(cfg.index) as index_file:
        ids, q_labels = discriminative.discriminative_rerank(
            ids, q_vecs, index_file.chunks(), train_searcher, train.landmark_ids,
            threshold=cfg.rerank_threshold,
        )  # fmt: skip
    report.add("discriminative_seconds", round(time.perf_counter() - t0, 3))
    report.add("discriminative_labelled_queries", int(np.sum(q_labels.landmarks >= 0)))
    return ids


def _labelled_train(cfg: EvalConfig, queries, report: Report):
    """(train EmbeddingFile, closed, with its landmark_ids; Searcher over its vectors)."""
    train, searcher = _load_database(cfg, cfg.train, queries, report, "train")
    if train.landmark_ids is None:
        raise UserError(f"--train {cfg.train}: has no landmark_ids; recognition needs labels")
    return train, searcher


def _ivf_recall(cfg, searcher: knn.Searcher, q_final, ids, report: Report) -> None:
    """Recall@k of the IVF results against exact search on a random sample of queries."""
    n = min(cfg.recall_sample, len(q_final))
    if n == 0:
        return
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(q_final), n, replace=False))
    _, exact_ids = searcher.exact_search(q_final[rows], ids.shape[1])
    recall = knn.recall_at_k(ids[rows], exact_ids)
    report.add(f"ivf_recall@{ids.shape[1]}", round(recall, 4), f"IVF recall@{ids.shape[1]}")
    report.add("ivf_recall_sample", n)


def _retrieval_scores(cfg, queries, index, predictions, report: Report) -> None:
    if cfg.solution:
        sol = report.ground_truth["solution"]
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
    check_coverage(scored, predictions, source, report, "retrieval")
    known = set(index.ids.tolist())
    unknown = {img for rel in scored.values() for img in rel if img not in known}
    report.warn(
        "solution_images_unknown", len(unknown), f"index ids in {source} are not in --index"
    )
    report.add("solution_queries_without_relevant", sum(1 for r in scored.values() if not r))
    if cfg.k < metrics.MAX_PREDICTIONS:
        print(f"landmark-evaluate: note: --k={cfg.k} < 100 predictions per query", file=sys.stderr)
    score(sol, metrics.mean_average_precision, predictions, "map@100", "mAP@100", report)
    if "map@100" not in report.result:
        raise UserError(f"{source}: no scored query has a relevant image")


def _recognition(cfg: EvalConfig, queries, q_vecs, report: Report) -> None:
    train, searcher = _labelled_train(cfg, queries, report)
    adjust = None
    if cfg.nonlandmark:
        def adjust(confidence):
            return _nonlandmark(cfg, queries, q_vecs, confidence, searcher, train, report)
    recognize(cfg, queries, q_vecs, searcher, train.landmark_ids, report,
              adjust_confidence=adjust)


def _nonlandmark(cfg, queries, q_vecs, confidence, searcher, train, report: Report):
    """Calibrates the non-landmark handling on a validation split, applies it to the queries."""
    es = load_embeddings(cfg.nonlandmark)
    nonlandmark.check_set("nonlandmark", cfg.nonlandmark, es.dim, queries.dim, len(es))
    nl_vecs, changed = knn.l2_normalize(np.asarray(es.embeddings, dtype=np.float32))
    report.warn("nonlandmark_renormalised", changed,
                f"nonlandmark vectors in {cfg.nonlandmark} were not unit length")
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


def _revisitop(cfg, queries, index, q_final, searcher: knn.Searcher, report: Report) -> None:
    gnd = report.ground_truth["revisitop_gnd"]
    db_rows, q_rows, distractors, extra_q = revisitop.align(gnd, index.ids, queries.ids)
    report.add("revisitop_distractors", distractors, "revisitop distractors")
    report.warn("revisitop_queries_ignored", extra_q, "--queries ids are not in qimlist")
    _report_query_crop(queries, q_rows, report)
    ranks = revisitop.ranking_from_chunks(searcher.chunks(), searcher.size, q_final[q_rows],
                                          db_rows)
    if superglobal.split_method(cfg.rerank)[1]:
        ranks = superglobal.rerank_ranking(ranks, q_final[q_rows], searcher, db_rows,
                                           **_superglobal_args(cfg))
    results = revisitop.evaluate(ranks, gnd["gnd"])
    report.add("revisitop", results)
    record = _training_list(report, queries, index)
    note = provenance.describe(record)
    report.add("revisitop_training_list", note)
    report.add("revisitop_training_record", record)
    for name, r in results.items():
        if r["queries"] == 0:
            continue  # no query has positives under this protocol
        report.add(f"revisitop_map_{name}", round(r["map"], 6), f"revisitop mAP {name}", note)


def _training_list(report: Report, queries, index) -> dict | None:
    """Which training list built the model (GLDv2 and ROxf/RPar share landmarks): from
    --training_data, else carried by the embedding sets (landmark-embed writes it)."""
    if "training_data" in report.ground_truth:
        return report.ground_truth["training_data"]
    return index.training_list or queries.training_list


def _report_query_crop(queries, q_rows: np.ndarray, report: Report) -> None:
    """The published protocol describes each query from its bbx crop (landmark-embed
    --revisitop_gnd does it and marks the rows); full-image queries are not comparable."""
    cropped = getattr(queries, "cropped", None)
    n = int(cropped[q_rows].sum()) if cropped is not None else 0
    report.add("revisitop_queries_cropped", n, "revisitop queries cropped to bbx")
    report.warn("revisitop_queries_uncropped", len(q_rows) - n,
                "revisitop queries were described from the full image, not the bbx crop of the "
                "published protocol: scores are not comparable to papers")
