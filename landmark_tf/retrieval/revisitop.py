"""Revisited Oxford/Paris evaluation (Radenovic et al., CVPR 2018): Easy/Medium/Hard mAP and
mP@k, computed as revisitop's python/evaluate.py does.

Ground truth comes in revisitop's pickle layout (gnd_roxford5k.pkl, gnd_rparis6k.pkl):
  {"imlist": [db image names], "qimlist": [query names],
   "gnd": [{"easy": [db indices], "hard": [...], "junk": [...], "bbx": [x1, y1, x2, y2]}, ...]}
Protocols: Easy counts easy images as positives and ignores junk+hard; Medium counts easy+hard and
ignores junk; Hard counts hard and ignores junk+easy. Ignored images are removed from the
ranking before AP is computed; AP is the trapezoidal area under the precision-recall curve.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from landmark_tf.errors import UserError

PROTOCOLS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
KAPPAS = (1, 5, 10)
# Everything a revisitop ground-truth pickle may need; anything else (code) is refused.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def parse_gnd(data: bytes, source: str) -> dict:
    """Unpickles and checks a ground-truth file; returns {"imlist", "qimlist", "gnd"}."""
    try:
        cfg = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # any unpickling failure is bad input
        raise UserError(f"{source}: not a revisitop ground-truth pickle ({e})") from e
    if not isinstance(cfg, dict) or any(k not in cfg for k in ("imlist", "qimlist", "gnd")):
        raise UserError(f"{source}: expected a dict with imlist, qimlist and gnd")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise UserError(
            f"{source}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries"
        )
    n = len(cfg["imlist"])
    for i, g in enumerate(cfg["gnd"]):
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(g.get(key, []), dtype=np.int64).ravel()
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise UserError(f"{source}: gnd[{i}]['{key}'] indexes outside imlist (size {n})")
    return cfg


def load_gnd(path: str) -> dict:
    from landmark_tf import fileio

    if not fileio.exists(path):
        raise UserError(f"{path}: ground-truth file not found")
    return parse_gnd(fileio.read_bytes(path), path)


def full_ranking(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """int64[N, Q]: column q lists all database rows, most similar to query q first."""
    return np.argsort(-(database @ queries.T), axis=0, kind="stable")


def ranking_from_chunks(chunks, n: int, queries: np.ndarray, db_rows: np.ndarray) -> np.ndarray:
    """`full_ranking` of database rows `db_rows` (gnd order), with the database streamed.

    Args:
      chunks: (first row, float32[m, D]) over all n database rows.
      queries: float32[Q, D]; db_rows: int64[N'] rows of the database, in ranking order.

    Returns:
      int64[N', Q] as `full_ranking` on database[db_rows] gives; only N x Q scores in memory.
    """
    sims = np.empty((n, len(queries)), np.float32)
    for s, c in chunks:
        sims[s : s + len(c)] = c @ queries.T
    return np.argsort(-sims[db_rows], axis=0, kind="stable")


def average_precision(positions: np.ndarray, num_positives: int) -> float:
    """Trapezoidal AP from the sorted 0-based ranks of the retrieved positives."""
    j = np.arange(len(positions), dtype=np.float64)
    r = positions.astype(np.float64)
    precision_before = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    precision_after = (j + 1) / (r + 1)
    return float(np.sum(precision_before + precision_after) / (2.0 * num_positives))


def _query_scores(column: np.ndarray, ok: np.ndarray, junk: np.ndarray, kappas) -> tuple:
    pos = np.flatnonzero(np.isin(column, ok))
    junk_pos = np.flatnonzero(np.isin(column, junk))
    # Ignored images do not count as ranks: shift each positive up by the junk ranked before it.
    pos = pos - np.searchsorted(junk_pos, pos, side="left")
    ap = average_precision(pos, len(ok))
    pos1 = pos + 1
    precisions = []
    for kappa in kappas:
        kq = min(int(pos1.max()), kappa) if pos1.size else kappa
        precisions.append(float(np.sum(pos1 <= kq)) / kq)
    return ap, precisions


def compute_map(ranks: np.ndarray, positives: list, junk: list, kappas=KAPPAS) -> dict:
    """mAP and mean precision@kappa over queries with at least one positive.

    Args:
      ranks: int[N, Q] full rankings (see `full_ranking`).
      positives, junk: per query, int arrays of database indices.

    Returns:
      {"map": float, "mp@k": float for each kappa, "queries": number scored}; "map" is None
      when no query has a positive.
    """
    aps, prs = [], []
    for q in range(ranks.shape[1]):
        if len(positives[q]) == 0:
            continue  # revisitop leaves such queries out of the mean
        ap, pr = _query_scores(ranks[:, q], positives[q], junk[q], kappas)
        aps.append(ap)
        prs.append(pr)
    if not aps:
        return {"map": None, "queries": 0}
    result = {"map": float(np.mean(aps)), "queries": len(aps)}
    result.update({f"mp@{k}": float(v) for k, v in zip(kappas, np.mean(prs, axis=0), strict=True)})
    return result


def evaluate(ranks: np.ndarray, gnd: list, kappas=KAPPAS) -> dict:
    """{"easy"|"medium"|"hard": compute_map(...)} for a revisitop `gnd` list."""
    out = {}
    for name, (ok_keys, junk_keys) in PROTOCOLS.items():
        ok = [_gather(g, ok_keys) for g in gnd]
        junk = [_gather(g, junk_keys) for g in gnd]
        out[name] = compute_map(ranks, ok, junk, kappas)
    return out


def _gather(g: dict, keys) -> np.ndarray:
    parts = [np.asarray(g.get(k, []), dtype=np.int64).ravel() for k in keys]
    return np.concatenate(parts)


def align(cfg: dict, index_ids: np.ndarray, query_ids: np.ndarray) -> tuple:
    """Row orders that put the embedding sets in the ground truth's order.

    Returns:
      (db_rows int64[N'], query_rows int64[Q], extra_db, extra_queries): db_rows lists imlist's
      rows first (so gnd indices stay valid) then every other index row as a distractor.

    Raises:
      UserError: an imlist or qimlist name is missing from the embeddings.
    """
    index_pos = {s: i for i, s in enumerate(index_ids.tolist())}
    query_pos = {s: i for i, s in enumerate(query_ids.tolist())}
    db_rows = _rows(cfg["imlist"], index_pos, "imlist", "--index")
    q_rows = _rows(cfg["qimlist"], query_pos, "qimlist", "--queries")
    extra = np.setdiff1d(np.arange(len(index_ids)), db_rows)
    db_rows = np.concatenate([db_rows, extra])
    return db_rows, q_rows, len(extra), len(query_ids) - len(q_rows)


def _rows(names, positions: dict, what: str, flag: str) -> np.ndarray:
    missing = [n for n in names if n not in positions]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(names)} {what} names are not ids in {flag}, "
            f"e.g. {missing[:3]}; ids must equal the names (no folder, no extension)"
        )
    return np.asarray([positions[n] for n in names], dtype=np.int64)
