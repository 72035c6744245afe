"""k-nearest-neighbour search over L2-normalised descriptors with faiss (no TensorFlow here).

Similarity is the inner product of unit vectors (cosine), which orders neighbours exactly as
euclidean distance does: |q - x|^2 = 2 - 2 q.x. Searches run in large query batches because
faiss' BLAS path is an order of magnitude faster per query with 1000+ queries per call.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator

import faiss
import numpy as np
from tqdm import tqdm

from landmark_tf.errors import UserError

DEFAULT_BATCH = 8192
# Rows handed to faiss' add() at once: the only NumPy copy beside faiss' own (128 MiB at D=512).
ADD_CHUNK = 65536
# Database rows per GEMM in exact search: 4096 queries x 8192 rows of float32 = 128 MiB scratch.
_BLAS_DATABASE_BLOCK = 8192
# A row whose norm is off by more than this is counted as "renormalised" rather than rounding.
_NORM_TOLERANCE = 1e-3


def l2_normalize(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Returns (float32[N, D] unit rows, number of rows that were not unit length already).

    A float32 C-contiguous input is normalised in place (no copy); others are converted once.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise UserError(f"{int(np.sum(norms == 0))} all-zero vectors cannot be L2-normalised")
    changed = int(np.sum(np.abs(norms - 1.0) > _NORM_TOLERANCE))
    if not x.flags.writeable:
        return x / norms, changed
    x /= norms
    return x, changed


def array_chunks(x: np.ndarray, rows: int = ADD_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 view of up to `rows` rows) over an in-memory array."""
    for s in range(0, len(x), rows):
        yield s, np.ascontiguousarray(x[s : s + rows], dtype=np.float32)


def check_dims(index_dim: int, query_dim: int, what: str = "index and queries") -> None:
    if index_dim != query_dim:
        raise UserError(
            f"{what} have different embedding dimensions ({index_dim} vs {query_dim}); "
            "were they made by the same model?"
        )


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) inverted lists, but never fewer than 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


Chunks = Callable[[], Iterable[tuple[int, np.ndarray]]]


class Searcher:
    """Top-k inner-product search over a fixed database of unit vectors, held only by faiss.

    The database is streamed into the faiss index in chunks (`from_chunks`), so the index is the
    one full copy in memory; neighbour vectors for re-ranking come back out of it (`vectors`).

    Args:
      database: float32[N, D], L2-normalised (copied into faiss; the array is not kept).
      index_type: "flat" (exact) or "ivf" (inverted file, approximate).
      nlist: IVF lists; 0 picks `default_nlist(N)`.
      nprobe: IVF lists visited per query.
      batch_size: queries per faiss call.
      seed: IVF k-means seed.
      spherical: IVF coarse quantiser by spherical k-means (unit centroids), which is what
        inner-product assignment needs; False is faiss' plain (euclidean) k-means.
    """

    def __init__(self, database: np.ndarray, index_type: str = "flat", **kwargs):
        database = np.asarray(database)
        chunks = lambda: array_chunks(database)  # noqa: E731
        self._setup(chunks, len(database), database.shape[1], index_type, **kwargs)

    @classmethod
    def from_chunks(cls, chunks: Chunks, n: int, dim: int, index_type: str = "flat",
                    **kwargs) -> Searcher:
        """A Searcher over the rows that `chunks()` yields as (first row, float32 unit rows);
        `chunks` is called once for IVF training (a sample) and once to add every row."""
        self = object.__new__(cls)
        self._setup(chunks, n, dim, index_type, **kwargs)
        return self

    def _setup(self, chunks: Chunks, n: int, dim: int, index_type: str, *, nlist: int = 0,
               nprobe: int = 16, batch_size: int = DEFAULT_BATCH, seed: int = 0,
               spherical: bool = True) -> None:
        if index_type not in ("flat", "ivf"):
            raise UserError(f"--index_type must be flat or ivf, got {index_type!r}")
        if n < 1 or dim < 1:
            raise UserError(f"empty database ({n} x {dim})")
        self.index_type = index_type
        self.batch_size = max(1, int(batch_size))
        self.ivf = None
        if index_type == "ivf":
            self.ivf = train_ivf(chunks, n, dim, nlist or default_nlist(n), seed, spherical)
            self.ivf.nprobe = max(1, min(int(nprobe), self.ivf.nlist))
            self.index = self.ivf
        else:
            self.index = faiss.IndexFlatIP(dim)
        self.fill(chunks, n)

    def fill(self, chunks: Chunks, n: int) -> None:
        """Puts the n rows of `chunks()` into the empty index, in storage allocated once at its
        final size. (Appending chunk by chunk grows faiss' vectors by doubling: the last growth
        holds the old and the new buffer at once, up to 3x the data.) IVF: a first pass assigns
        every row to its list (the same assignment `add` makes), a second copies rows in."""
        d = self.dim
        if self.ivf is None:
            self.index.codes.resize(n * d * 4)
            self.index.ntotal = n
            view = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d)
            for s, c in chunks():
                view[s : s + len(c)] = c
            return
        self.ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # rebuilt below (a reset keeps it)
        assign = np.empty(n, np.int64)
        for s, c in chunks():
            c = np.ascontiguousarray(c, dtype=np.float32)
            assign[s : s + len(c)] = self.ivf.quantizer.search(c, 1)[1][:, 0]
        invlists = faiss.downcast_InvertedLists(self.ivf.invlists)
        counts = np.bincount(assign, minlength=self.ivf.nlist)
        for lst in np.flatnonzero(counts):
            invlists.resize(int(lst), int(counts[lst]))
        filled = np.zeros(self.ivf.nlist, np.int64)
        for s, c in chunks():
            c = np.ascontiguousarray(c, dtype=np.float32)
            a = assign[s : s + len(c)]
            order = np.argsort(a, kind="stable")  # rows keep their order inside each list
            lists, starts = np.unique(a[order], return_index=True)
            for lst, b, e in zip(lists, starts, [*starts[1:], len(order)], strict=True):
                rows = order[b:e]
                ids, codes = rows + s, np.ascontiguousarray(c[rows])
                invlists.update_entries(int(lst), int(filled[lst]), len(rows),
                                        faiss.swig_ptr(ids), faiss.swig_ptr(codes.view(np.uint8)))
                filled[lst] += len(rows)
        self.ivf.ntotal = n
        self.ivf.make_direct_map()  # row -> list position, for `vectors` (8 bytes/row)

    def add(self, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        """Appends rows (faiss grows its storage as it goes; `fill` does not)."""
        for _, c in chunks:
            self.index.add(np.ascontiguousarray(c, dtype=np.float32))
        if self.ivf is not None:
            self.ivf.make_direct_map()  # row -> list position, for `vectors` (8 bytes/row)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def database(self) -> np.ndarray:
        """float32[N, D]: a read-only view of faiss' storage (flat) or a full copy (IVF)."""
        if self.ivf is not None:
            return self.vectors(np.arange(self.size))
        raw = faiss.rev_swig_ptr(self.index.get_xb(), self.size * self.dim)
        return np.asarray(_KeepAlive(raw, (self.size, self.dim), self.index))

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32[*rows.shape, D]: the stored vectors of `rows` (-1 gives row 0's: mask them)."""
        rows = np.maximum(np.asarray(rows, dtype=np.int64), 0)
        if self.ivf is None:
            return self.database[rows]
        flat = self.ivf.reconstruct_batch(np.ascontiguousarray(rows.ravel()))
        return flat.reshape(*rows.shape, self.dim)

    def chunks(self, rows: int = ADD_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) over the stored database, one chunk in memory at a time."""
        for s in range(0, self.size, rows):
            e = min(s + rows, self.size)
            if self.ivf is None:
                yield s, self.database[s:e]
            else:
                yield s, self.ivf.reconstruct_n(s, e - s)

    def empty_like(self) -> Searcher:
        """The same settings and trained IVF centroids, with no vectors yet (fill with `add`)."""
        clone = object.__new__(Searcher)
        clone.__dict__.update(self.__dict__)
        if self.ivf is None:
            clone.index = faiss.IndexFlatIP(self.dim)
            return clone
        # Not clone_index: that would copy every inverted list before the reset.
        quantizer = faiss.clone_index(self.ivf.quantizer)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.ivf.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.is_trained, ivf.nprobe = True, self.ivf.nprobe
        clone.index = clone.ivf = ivf
        return clone

    def with_database(self, database: np.ndarray) -> Searcher:
        """The same search settings over new vectors (IVF keeps its trained centroids)."""
        clone = self.empty_like()
        clone.add(array_chunks(np.asarray(database)))
        return clone

    def search(
        self, queries: np.ndarray, k: int, *, desc: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scores float32[Q, k'], indices int64[Q, k']) with k' = min(k, N), best first.

        IVF may return fewer than k' hits for a query; missing slots hold index -1, score -inf.
        """
        queries = np.asarray(queries)
        check_dims(self.dim, queries.shape[1])
        k = min(int(k), self.size)
        scores = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        starts = range(0, len(queries), self.batch_size)
        show = desc is not None and len(starts) > 1
        for s in tqdm(starts, desc=desc, disable=not show, file=sys.stderr, unit="batch"):
            e = s + self.batch_size
            q = np.ascontiguousarray(queries[s:e], dtype=np.float32)
            scores[s:e], ids[s:e] = self._search_batch(q, k)
        return scores, ids

    def _search_batch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ivf is None:
            with _blas_database_block(_BLAS_DATABASE_BLOCK):
                return self.index.search(q, k)
        scores, ids = self.ivf.search(q, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored vectors, streamed in chunks (for IVF recall checks)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), self.size)
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for s, chunk in self.chunks():
            d, i = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(d, np.where(i >= 0, i + s, -1))
        heap.finalize()
        return heap.D, heap.I


class _KeepAlive:
    """A read-only array interface onto faiss memory that keeps its owner (the index) alive as
    long as any view exists: a bare rev_swig_ptr view dangles once the index is freed."""

    def __init__(self, raw: np.ndarray, shape: tuple[int, int], owner):
        self.owner = owner
        self.__array_interface__ = {
            "shape": shape, "typestr": raw.dtype.str, "version": 3,
            "data": (raw.__array_interface__["data"][0], True),
        }  # fmt: skip


@contextlib.contextmanager
def _blas_database_block(rows: int):
    """faiss' exact search multiplies query blocks by database blocks of this many rows; its
    default (1024) makes many small GEMMs: 8192 was 10-25% faster at 100k x 512 on 2 cores."""
    old = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = rows
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = old


def train_ivf(chunks: Chunks, n: int, dim: int, nlist: int, seed: int = 0,
              spherical: bool = True) -> faiss.IndexIVFFlat:
    """An empty inner-product IVF index whose coarse quantiser is trained on a sample of rows.

    spherical=True: centroids are renormalised after each k-means step (faiss'
    ClusteringParameters.spherical), so that "largest inner product with a centroid" - the
    assignment an IP index uses - picks the nearest direction, as for unit descriptors it should.
    """
    nlist = max(1, min(int(nlist), n))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.spherical = bool(spherical)
    # 64 points per centroid gives stable centroids at a quarter of faiss' default k-means cost.
    index.train(sample_rows(chunks, n, min(n, 64 * nlist), seed))
    return index


def sample_rows(chunks: Chunks, n: int, count: int, seed: int = 0) -> np.ndarray:
    """float32[count, D]: a uniform random sample of rows (sorted), gathered in one pass."""
    rows = np.sort(np.random.default_rng(seed).choice(n, count, replace=False))
    parts = []
    for s, c in chunks():
        lo, hi = np.searchsorted(rows, [s, s + len(c)])
        parts.append(np.array(c[rows[lo:hi] - s], dtype=np.float32))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k & exact top-k| / k, for int[Q, k] index arrays."""
    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"shape mismatch {approx_ids.shape} vs {exact_ids.shape}")
    if approx_ids.size == 0:
        return float("nan")
    hits = sum(
        len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids, strict=True)
    )
    return hits / exact_ids.size


def vote_landmarks(
    scores: np.ndarray, neighbour_landmarks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Landmark per query = the one with the largest sum of neighbour similarities.

    Args:
      scores: float32[Q, k] neighbour similarities (-inf for missing neighbours).
      neighbour_landmarks: int64[Q, k] landmark of each neighbour; -1 (no landmark) never wins
        but its neighbours still take slots, which lowers the confidence of non-landmark queries.

    Returns:
      (landmark int64[Q], confidence float32[Q]); landmark -1 and confidence 0 where no
      neighbour has a landmark. Ties go to the smaller landmark id.
    """
    landmarks = np.full(len(scores), -1, np.int64)
    confidence = np.zeros(len(scores), np.float32)
    for q, (s, lm) in enumerate(zip(scores, neighbour_landmarks, strict=True)):
        keep = (lm >= 0) & np.isfinite(s)
        if not keep.any():
            continue
        uniq, inverse = np.unique(lm[keep], return_inverse=True)
        sums = np.bincount(inverse, weights=s[keep].astype(np.float64))
        best = int(np.argmax(sums))
        landmarks[q], confidence[q] = uniq[best], sums[best]
    return landmarks, confidence
