"""The graph re-rankers in landmark-evaluate: diffusion (diffusion.py) and EGT (egt.py), both
over the index's k-NN graph (knn_graph.py, built once and cached with --graph_cache).

They plug in after the search: the search returns `search_depth` rows per query (diffusion's
truncation, EGT's k, or --k), and `rerank` turns them into the final --k rows. Methods:
  diffusion     Iscen et al. 2017 on the plain descriptors (their code adds no query expansion)
  egt           Chang et al. 2019 on the plain descriptors
  egt+dba+aqe   EGT on DBA'd index / alpha-QE'd queries: the released egt.py's Do_QE option
                expands both before building the graph (there by unweighted sums over
                QE_topN = 2 neighbours: --aqe_alpha=0 --qe_k=2 comes closest)
The vector part (dba, aqe) runs first, so the graph is that of the vectors searched (its cache
key is their content: a DBA'd index gets its own graph).
"""

from __future__ import annotations

import contextlib
import tempfile
import time

import numpy as np

from landmark_tf.errors import UserError
from landmark_tf.retrieval import diffusion, egt, knn_graph

METHODS = (diffusion.NAME, egt.NAME, f"{egt.NAME}+dba+aqe")


def split_method(method: str) -> tuple[str | None, str]:
    """'egt+dba+aqe' -> ('egt', 'dba+aqe'); 'diffusion' -> ('diffusion', 'none');
    'dba+aqe' -> (None, 'dba+aqe')."""
    parts = method.split("+")
    if parts[0] in (diffusion.NAME, egt.NAME):
        return parts[0], "+".join(parts[1:]) or "none"
    return None, method


def check(cfg) -> None:
    """UserError for out-of-range graph settings (only those the chosen method uses)."""
    name, _ = split_method(cfg.rerank)
    if name and cfg.revisitop_gnd:
        raise UserError(f"--rerank={cfg.rerank} re-orders the top lists only, --revisitop_gnd "
                        "scores full rankings: not supported together")
    if name == diffusion.NAME:
        diffusion.check_params(cfg.diffusion_k, cfg.diffusion_kq, cfg.diffusion_truncation,
                               cfg.diffusion_gamma, cfg.diffusion_alpha,
                               cfg.diffusion_iterations)  # fmt: skip
    elif name == egt.NAME:
        egt.check_params(cfg.egt_k, cfg.k)
        if np.isnan(cfg.egt_threshold):
            raise UserError("--egt_threshold must be a number or inf, got nan")


def search_depth(cfg) -> int:
    """Rows per query the search must return for cfg.rerank."""
    name, _ = split_method(cfg.rerank)
    if name == diffusion.NAME:
        return max(cfg.k, cfg.diffusion_truncation)
    if name == egt.NAME:
        return max(cfg.k, cfg.egt_k)
    return cfg.k


def rerank(cfg, searcher, scores: np.ndarray, ids: np.ndarray, report) -> np.ndarray:
    """int64[Q, --k] re-ranked rows from the search's (scores, ids) float32/int64[Q, depth]."""
    name, _ = split_method(cfg.rerank)
    if name is None:
        return ids[:, : cfg.k]
    k = cfg.diffusion_k if name == diffusion.NAME else cfg.egt_k
    with _cache_folder(cfg.graph_cache) as folder:
        t0 = time.perf_counter()
        graph = knn_graph.knn_graph(searcher, k, folder)
        if name == diffusion.NAME:
            mutual = knn_graph.mutual_graph(graph)
            report.add("diffusion_mutual_edges", int(mutual.indptr[-1]), "mutual k-NN edges")
        t1 = time.perf_counter()
        if name == diffusion.NAME:
            n = cfg.diffusion_truncation
            out = diffusion.diffuse(
                mutual, ids[:, :n], scores[:, :n], kq=cfg.diffusion_kq,
                gamma=cfg.diffusion_gamma, alpha=cfg.diffusion_alpha,
                iterations=cfg.diffusion_iterations,
            )  # fmt: skip
            # --k beyond the truncation: the search's own order after the diffused rows.
            out = np.concatenate([out, ids[:, n:]], axis=1)[:, : cfg.k]
        else:
            out = egt.traverse(
                ids[:, : cfg.egt_k],
                scores[:, : cfg.egt_k],
                graph.ids,
                graph.sims,
                min(cfg.k, searcher.size),
                cfg.egt_threshold,
            )
    report.add("graph_k", graph.k, "graph neighbours (k)")
    report.add("graph_cached", graph.reused, "graph read from --graph_cache")
    report.add("graph_seconds", round(t1 - t0, 3))
    report.add(f"{name}_seconds", round(time.perf_counter() - t1, 3))
    return out


@contextlib.contextmanager
def _cache_folder(path: str | None):
    """--graph_cache, or a temporary folder removed afterwards (the graph is still on disk,
    memory-mapped, not in the heap)."""
    if path:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="landmark-graph-") as tmp:
        yield tmp
