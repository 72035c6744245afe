"""landmark-clean: keep each landmark's largest coherent group of train images (or every
group of at least `min_group` images, for landmarks filed with several unrelated facets).

The seeds' recipe: Cookpad (GLR2019 recognition, 5th) dropped rare classes and, for each class,
kept only the images of its largest cluster of pretrained-model embeddings; GLR2020's 3rd place
re-formed classes by clustering. Here the cluster is a connected component of the class's
similarity graph: an edge joins two images of one class when one is among the other's `k` most
similar images of that class and their cosine is at least the threshold (single-linkage
clustering, i.e. DBSCAN with min_samples=1 and eps = 1 - threshold in cosine distance, on a
kNN-sparsified graph). The default threshold is relative: the `auto_quantile` of cosine
similarity between images of *different* classes, so "an edge" means "more alike than 99% of
pairs of different landmarks" for whatever model made the embeddings.

`min_group` > 0 (not the seeds' rule): every group of at least that many images is kept, the
largest always. GLDv2's classes are Wikimedia Commons categories, where a church's exterior,
nave and altar are unrelated-looking groups of one landmark; the largest-group rule drops all
but one of them as if they were noise, while the noise (photos of no landmark, or of another
landmark each) mostly stays in groups of one. Measured on landmark-synth's multi-facet set:
bench/README.md "levers".

Reads: train embeddings (.npz, ids[, landmark_ids]) and train.csv (id,url,landmark_id; the
labels come from it). Writes: `output` in train_clean.csv format (landmark_id,images, rows by
landmark id, ids sorted) and `report` (CSV, one row per class: landmark_id, images, embedded,
kept, dropped, groups, status). A class is dropped when it has fewer than `min_images`
embedded images or its largest group has fewer than `min_images`.
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np

from landmark_tf import fileio
from landmark_tf.curation import graph
from landmark_tf.data import gldv2
from landmark_tf.errors import UserError
from landmark_tf.retrieval import embeddings as embeddings_lib

REPORT_HEADER = ["landmark_id", "images", "embedded", "kept", "dropped", "groups", "status"]


@dataclasses.dataclass
class CleanConfig:
    """Inputs, outputs and the grouping settings of landmark-clean.

    threshold: cosine of an edge; None = `auto_quantile` of cross-class similarity.
    """

    embeddings: str
    train_csv: str
    output: str
    report: str = ""
    k: int = 16
    threshold: float | None = None
    auto_quantile: float = 0.99
    min_images: int = 3
    min_group: int = 0  # 0: keep only each class's largest group (Cookpad)
    seed: int = 0

    def validate(self) -> CleanConfig:
        checks = [
            (self.embeddings, "--embeddings is required"),
            (self.train_csv, "--train_csv is required"),
            (self.output, "--output is required"),
            (self.k >= 1, f"--k={self.k}: must be >= 1"),
            (self.threshold is None or -1 <= self.threshold <= 1,
             f"--threshold={self.threshold}: must be a cosine in [-1, 1] or auto"),
            (0 < self.auto_quantile < 1, f"--auto_quantile={self.auto_quantile}: must be in "
             "(0, 1)"),
            (self.min_images >= 1, f"--min_images={self.min_images}: must be >= 1"),
            (self.min_group >= 0, f"--min_group={self.min_group}: must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


@dataclasses.dataclass
class CleanResult:
    """Per-row decision over the embedded train rows, sorted by landmark id.

    landmarks int64[N], ids str[N], keep bool[N], component int64[N]; threshold used.
    """

    landmarks: np.ndarray
    ids: np.ndarray
    keep: np.ndarray
    component: np.ndarray
    threshold: float


def group_largest(
    x: np.ndarray, landmarks: np.ndarray, ids: np.ndarray, cfg: CleanConfig
) -> CleanResult:
    """Decides, per class, which rows to keep. x float32[N, D] unit rows; landmarks int64[N]."""
    order = np.lexsort((ids, landmarks))
    if np.any(order != np.arange(len(order))):  # callers that sort first pay no copy
        x, landmarks, ids = x[order], landmarks[order], ids[order]
    _, starts, sizes = graph.class_segments(landmarks)
    threshold = cfg.threshold
    if threshold is None:
        threshold = graph.cross_class_quantile(x, landmarks, cfg.auto_quantile, seed=cfg.seed)
    src, dst = graph.within_class_edges(x, starts, sizes, cfg.k, threshold)
    component = graph.connected_components(len(x), src, dst)
    keep = graph.largest_component_mask(landmarks, component)
    if cfg.min_group:
        keep |= np.bincount(component, minlength=len(component))[component] >= cfg.min_group
    kept_per_class = np.add.reduceat(keep.astype(np.int64), starts) if len(x) else keep
    too_small = np.repeat((sizes < cfg.min_images) | (kept_per_class < cfg.min_images), sizes)
    return CleanResult(landmarks, ids, keep & ~too_small, component, float(threshold))


def clean(cfg: CleanConfig) -> dict:
    """Runs landmark-clean; returns the closing JSON (classes, kept, dropped, ...)."""
    cfg.validate()
    kind, rows = gldv2.read_csv(cfg.train_csv)
    if kind != "train":
        raise UserError(f"{cfg.train_csv}: needs the train.csv columns id,landmark_id "
                        f"(got a {kind} list)")
    es = embeddings_lib.load_embeddings(cfg.embeddings)
    csv_ids = np.array([r.image_id for r in rows])
    csv_landmarks = np.array([r.landmark_id for r in rows], np.int64)
    pos = positions(es.ids, csv_ids)
    found = pos >= 0
    if not found.any():
        raise UserError(f"{cfg.embeddings}: none of the {len(rows)} ids of {cfg.train_csv} "
                        "has an embedding; was it made from this train set?")
    _check_labels(es, pos, csv_landmarks, cfg)
    # One gather, already in (landmark, id) order, normalised in place: at GLDv2 size the
    # embeddings are tens of GB and every copy counts.
    extra = len(es) - int(found.sum())  # embedded images that train.csv does not list
    lm, ids = csv_landmarks[found], csv_ids[found]
    order = np.lexsort((ids, lm))
    x = es.embeddings[pos[found][order]]
    del es
    renormalised = _normalise_in_place(x)
    result = group_largest(x, lm[order], ids[order], cfg)
    all_counts = _class_counts(csv_landmarks)
    report = _report_rows(result, all_counts, cfg.min_images)
    write_text(cfg.output, _clean_csv(result))
    if cfg.report:
        write_text(cfg.report, csv_text(REPORT_HEADER, report))
    kept = int(result.keep.sum())
    kept_classes = sum(1 for r in report if r[-1] == "kept")
    return {
        "classes": kept_classes, "kept": kept, "dropped": len(rows) - kept,
        "input_classes": len(all_counts), "input_images": len(rows),
        "dropped_classes": len(all_counts) - kept_classes,
        "not_embedded": int((~found).sum()), "embeddings_not_in_csv": extra,
        "renormalised": renormalised,
        "threshold": result.threshold, "output": cfg.output, "report": cfg.report or None,
    }


def positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index into `ids` of each wanted id, -1 where absent (sorted search, no Python dict)."""
    order = np.argsort(ids, kind="stable")
    at = np.searchsorted(ids[order], wanted)
    at = np.minimum(at, len(ids) - 1)
    hit = ids[order][at] == wanted
    return np.where(hit, order[at], -1)


def _normalise_in_place(x: np.ndarray) -> int:
    """L2-normalises float32 rows in place (in blocks); returns how many were not unit length."""
    changed = 0
    for s in range(0, len(x), 65536):
        block = x[s:s + 65536]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        changed += int(np.sum(np.abs(norms - 1.0) > 1e-3))
        block /= norms
    return changed


def _check_labels(es, pos, csv_landmarks, cfg) -> None:
    if es.landmark_ids is None:
        return
    found = pos >= 0
    bad = np.flatnonzero(es.landmark_ids[pos[found]] != csv_landmarks[found])
    if bad.size:
        raise UserError(f"{cfg.embeddings}: {bad.size} images have another landmark_id than in "
                        f"{cfg.train_csv}; were they made from the same train set?")


def _class_counts(landmarks: np.ndarray) -> dict[int, int]:
    uniq, counts = np.unique(landmarks, return_counts=True)
    return dict(zip(uniq.tolist(), counts.tolist(), strict=True))


def _report_rows(result: CleanResult, all_counts: dict[int, int], min_images: int) -> list:
    uniq, starts, sizes = graph.class_segments(result.landmarks)
    kept = np.add.reduceat(result.keep.astype(np.int64), starts) if len(starts) else starts
    groups = _groups_per_class(result, starts)
    rows, embedded = [], dict(zip(uniq.tolist(), sizes.tolist(), strict=True))
    at = {lid: g for g, lid in enumerate(uniq.tolist())}
    for lid, n in sorted(all_counts.items()):
        g = at.get(lid)
        m = embedded.get(lid, 0)
        k = int(kept[g]) if g is not None else 0
        status = "kept" if k else ("too_few_images" if m < min_images else "no_large_group")
        rows.append([lid, n, m, k, n - k, int(groups[g]) if g is not None else 0, status])
    return rows


def _groups_per_class(result: CleanResult, starts: np.ndarray) -> np.ndarray:
    if not len(starts):
        return starts
    # A component's label is its smallest member's row: count rows that are their own label.
    is_root = result.component == np.arange(len(result.component))
    return np.add.reduceat(is_root.astype(np.int64), starts)


def _clean_csv(result: CleanResult) -> str:
    lm, ids = result.landmarks[result.keep], result.ids[result.keep]
    uniq, starts = np.unique(lm, return_index=True)
    bounds = [*starts.tolist(), len(lm)]
    rows = [[lid, " ".join(ids[bounds[g]:bounds[g + 1]].tolist())]
            for g, lid in enumerate(uniq.tolist())]
    return csv_text(["landmark_id", "images"], rows)


def write_text(path: str, text: str) -> None:
    """Writes atomically, creating the folder (local or gs://)."""
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    if folder:
        fileio.makedirs(folder)
    fileio.write_text_atomic(path, text)


def csv_text(header: list[str], rows: list) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
