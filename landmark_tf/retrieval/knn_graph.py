"""The index's k-nearest-neighbour graph, the offline part of the graph re-rankers (diffusion,
EGT): built once with faiss in chunks of rows, cached on local disk, memory-mapped on reuse.

A graph is a folder holding
  ids.npy   int32[N, k]   each index row's k nearest index rows, best first (itself included,
                          as the released diffusion and EGT code search the index against itself;
                          -1 where IVF found fewer)
  sims.npy  float32[N, k] their inner products (cosine of unit rows)
  graph.json              N, k, the searcher settings and the content hash it was built for
and, made on first use by diffusion, the reciprocal (mutual) k-NN graph as CSR:
  mutual/indptr.npy int64[N+1], mutual/indices.npy int32[nnz], mutual/sims.npy float32[nnz]
  (edge i -> j kept when j is in i's list and i in j's; the diagonal dropped).

Caching: the folder name is a hash of the index vectors' bytes, k and the search settings (flat
or IVF with nlist/nprobe), so another index, another k or another search never reuses it. It is
written under a temporary name and renamed, so a killed build leaves no half graph that a later
run would trust (the next build of the same graph deletes a dead builder's leftovers). Local
disk only: the arrays are memory-mapped (gs:// cannot be).

Cost at GLDv2 size (N = 762k, k = 1000): the self-search is N queries over N rows (flat: about
N^2 D multiply-adds, hours on 2 cores; use --index_type=ivf), disk 8 N k bytes (6 GB) plus the
mutual CSR (8 bytes per kept edge); memory one chunk of rows and its [rows, k] results, with the
graph files memory-mapped (the page cache, not the process heap, holds them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from landmark_tf.errors import UserError
from landmark_tf.retrieval.knn import Searcher

FORMAT = 1  # bump when the files change meaning: older caches then no longer match
_SEARCH_ROWS = 8192  # index rows searched per step
_ROW_BUDGET = 1 << 23  # neighbour entries ([rows, k]) handled at once by the mutual pass


@dataclasses.dataclass(frozen=True)
class KnnGraph:
    """ids int32[N, k], sims float32[N, k] (memory-mapped); `folder` holds the files."""

    folder: str
    ids: np.ndarray
    sims: np.ndarray
    reused: bool = False  # read from the cache rather than built by this call

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


@dataclasses.dataclass(frozen=True)
class MutualGraph:
    """The reciprocal k-NN graph in CSR form: row i's neighbours are
    indices[indptr[i]:indptr[i+1]] with similarities sims[...] (float32, raw cosine)."""

    indptr: np.ndarray
    indices: np.ndarray
    sims: np.ndarray

    @property
    def size(self) -> int:
        return len(self.indptr) - 1


def cache_key(searcher: Searcher, k: int) -> str:
    """Hex digest of the stored vectors' bytes (streamed), k and the search settings (IVF: its
    lists, probes and coarse centroids)."""
    h = hashlib.blake2b(digest_size=16)
    settings = {"format": FORMAT, "k": int(k), "n": searcher.size, "d": searcher.dim,
                "index_type": searcher.index_type}  # fmt: skip
    if searcher.ivf is not None:
        settings.update(nlist=int(searcher.ivf.nlist), nprobe=int(searcher.ivf.nprobe))
    h.update(json.dumps(settings, sort_keys=True).encode())
    if searcher.ivf is not None:  # another k-means (seed, spherical) gives another graph
        h.update(searcher.ivf.quantizer.reconstruct_n(0, searcher.ivf.nlist).tobytes())
    for _, rows in searcher.chunks():
        h.update(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return h.hexdigest()


def knn_graph(searcher: Searcher, k: int, cache_dir: str) -> KnnGraph:
    """The k-NN graph of `searcher`'s rows: read from `cache_dir` when built before for the same
    vectors, k and settings, otherwise built there (atomically) first."""
    if k < 1:
        raise UserError(f"graph neighbours must be >= 1, got {k}")
    if "://" in cache_dir:
        raise UserError(f"graph cache {cache_dir}: must be a local folder (memory-mapped)")
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UserError(f"graph cache {cache_dir}: is a file, expected a folder")
    k = min(int(k), searcher.size)
    folder = os.path.join(cache_dir, f"knn-k{k}-{cache_key(searcher, k)}")
    reused = os.path.exists(os.path.join(folder, "graph.json"))
    if not reused:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = _tmp_folder(cache_dir, os.path.basename(folder))
        try:
            _build(searcher, k, tmp)
            _publish(tmp, folder, "graph.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_graph(folder, reused)


def open_graph(folder: str, reused: bool = True) -> KnnGraph:
    ids = np.load(os.path.join(folder, "ids.npy"), mmap_mode="r")
    sims = np.load(os.path.join(folder, "sims.npy"), mmap_mode="r")
    return KnnGraph(folder, ids, sims, reused)


def _tmp_folder(parent: str, name: str) -> str:
    """`.tmp-<pid>-<name>` in `parent`; first removes those of the same name left by builders
    that no longer run (a killed build leaves gigabytes behind at GLDv2 size)."""
    for entry in os.listdir(parent):
        m = re.fullmatch(r"\.tmp-(\d+)-" + re.escape(name), entry)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    return os.path.join(parent, f".tmp-{os.getpid()}-{name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: str, folder: str, sentinel: str) -> None:
    """Renames the finished folder into place; a concurrent builder that won (its folder holds
    `sentinel`, written last) keeps its copy."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not os.path.exists(os.path.join(folder, sentinel)):
            raise


def _build(searcher: Searcher, k: int, folder: str) -> None:
    os.makedirs(folder)
    n = searcher.size
    ids = np.lib.format.open_memmap(os.path.join(folder, "ids.npy"), "w+", np.int32, (n, k))
    sims = np.lib.format.open_memmap(os.path.join(folder, "sims.npy"), "w+", np.float32, (n, k))
    for s, rows in searcher.chunks(_SEARCH_ROWS):
        sc, nb = searcher.search(rows, k)
        ids[s : s + len(rows)] = nb
        sims[s : s + len(rows)] = np.where(nb >= 0, sc, -np.inf)
    ids.flush()
    sims.flush()
    del ids, sims
    meta = {"format": FORMAT, "n": n, "k": k, "index_type": searcher.index_type}
    with open(os.path.join(folder, "graph.json"), "w") as f:
        json.dump(meta, f)


def mutual_graph(graph: KnnGraph) -> MutualGraph:
    """The reciprocal graph of `graph` (built into graph.folder/mutual on first use)."""
    folder = os.path.join(graph.folder, "mutual")
    if not os.path.exists(os.path.join(folder, "done")):
        tmp = _tmp_folder(graph.folder, "mutual")
        try:
            _build_mutual(graph, tmp)
            _publish(tmp, folder, "done")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    load = lambda name: np.load(os.path.join(folder, name), mmap_mode="r")  # noqa: E731
    return MutualGraph(load("indptr.npy"), load("indices.npy"), load("sims.npy"))


def _build_mutual(graph: KnnGraph, folder: str) -> None:
    """Row chunks of the k-NN lists; j in i's list is kept when i is in j's list, found by a
    vectorised binary search in j's list sorted by id (a sorted copy on disk, memory-mapped)."""
    os.makedirs(folder)
    n, k = graph.ids.shape
    step = max(1, _ROW_BUDGET // k)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        sorted_ids = np.lib.format.open_memmap(os.path.join(scratch, "sorted.npy"), "w+",
                                               np.int32, (n, k))  # fmt: skip
        for s in range(0, n, step):
            sorted_ids[s : s + step] = np.sort(graph.ids[s : s + step], axis=1)
        indptr = np.zeros(n + 1, np.int64)
        with open(os.path.join(scratch, "indices.bin"), "wb") as fi, \
             open(os.path.join(scratch, "sims.bin"), "wb") as fs:  # fmt: skip
            for s in range(0, n, step):
                nb, sc = np.asarray(graph.ids[s : s + step]), np.asarray(graph.sims[s : s + step])
                rows = np.arange(s, s + len(nb))[:, None]
                keep = (nb >= 0) & (nb != rows)
                keep[keep] = _contains(sorted_ids, nb[keep], np.broadcast_to(rows, nb.shape)[keep])
                indptr[s + 1 : s + 1 + len(nb)] = keep.sum(axis=1)
                fi.write(nb[keep].astype(np.int32).tobytes())
                fs.write(sc[keep].astype(np.float32).tobytes())
        np.cumsum(indptr, out=indptr)
        del sorted_ids
        np.save(os.path.join(folder, "indptr.npy"), indptr)
        for name, dtype in (("indices", np.int32), ("sims", np.float32)):
            _bin_to_npy(os.path.join(scratch, f"{name}.bin"), os.path.join(folder, f"{name}.npy"),
                        dtype, int(indptr[-1]))  # fmt: skip
    open(os.path.join(folder, "done"), "w").close()


def _bin_to_npy(src: str, dst: str, dtype, count: int) -> None:
    """Raw bytes -> .npy in chunks (the header first), never the whole array in memory."""
    out = np.lib.format.open_memmap(dst, "w+", dtype, (count,))
    with open(src, "rb") as f:
        for s in range(0, count, _ROW_BUDGET):
            part = np.fromfile(f, dtype, _ROW_BUDGET)
            out[s : s + len(part)] = part
    out.flush()


def _contains(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """bool[m]: values[i] in sorted_rows[rows[i]] (each row ascending), by a binary search run
    for all m pairs at once: log2(k) gathers of m entries."""
    k = sorted_rows.shape[1]
    lo = np.zeros(len(rows), np.int64)
    hi = np.full(len(rows), k, np.int64)
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        below = np.zeros(len(rows), bool)
        below[active] = sorted_rows[rows[active], mid[active]] < values[active]
        lo = np.where(active & below, mid + 1, lo)
        hi = np.where(active & ~below, mid, hi)
    found = lo < k
    found[found] = sorted_rows[rows[found], lo[found]] == values[found]
    return found
