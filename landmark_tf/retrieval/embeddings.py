"""The embedding-set file (.npz) every stage after landmark-embed reads or writes.

Layout (numpy .npz, no pickled objects):
  ids           str[N]      image ids, unique
  embeddings    float32[N, D] (or float16[N, D] when written with dtype=float16) one
                descriptor per id, L2-normalised
  landmark_ids  int64[N]    optional, for labelled sets; -1 means "no landmark"
  cropped       bool[N]     optional: 1 where the image was cropped to its ground-truth box
                before it was described (revisited Oxford/Paris queries, as published)
  training_list str[]       optional: JSON of the training list that built the model
                (landmark_tf.data.provenance; the exclusion list's path and sha256)

Files of any size: `open_embeddings` validates and serves the embeddings in float32 row chunks
without loading them (members are read at their offset in the zip, see npzstream), and
`save_embeddings` / `write_embeddings` write member by member. Files made by `np.savez` (or
`np.savez_compressed`) read the same way; `load_embeddings` loads a whole (small) set.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

import numpy as np

from landmark_tf.errors import UserError
from landmark_tf.retrieval import npzstream

_REQUIRED = ("ids", "embeddings")
CHUNK_ROWS = 65536  # rows per read: 128 MiB of float32 at D = 512
DTYPES = ("float32", "float16")
# A row whose norm is off by more than this counts as "renormalised" rather than rounding
# (float16 storage rounds norms by up to ~1e-3).
NORM_TOLERANCE = 2e-3
CROPPED = "cropped"
TRAINING_LIST = "training_list"


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
    """An embedding set in memory.

    Attributes:
      ids: str[N] numpy array (unicode), unique.
      embeddings: float32[N, D].
      landmark_ids: int64[N] or None; -1 marks an image without a landmark.
    """

    ids: np.ndarray
    embeddings: np.ndarray
    landmark_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def validate(ids, embeddings, landmark_ids=None, *, source: str = "embedding set") -> EmbeddingSet:
    """Checks shapes, dtypes, uniqueness and finiteness; returns a normalised-dtype EmbeddingSet.

    Args:
      ids: sequence of N strings (str or bytes).
      embeddings: array-like [N, D] of floats.
      landmark_ids: optional array-like [N] of integers.
      source: how to name the data in error messages (usually the file path).

    Raises:
      UserError: naming `source` and the first offending id.
    """
    ids = _as_str_ids(ids, source)
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise UserError(
            f"{source}: 'embeddings' must be a float array [N, D], got {emb.dtype}{list(emb.shape)}"
        )
    if emb.shape[0] != ids.shape[0]:
        raise UserError(f"{source}: {ids.shape[0]} ids but {emb.shape[0]} embedding rows")
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise UserError(f"{source}: empty embedding set (shape {list(emb.shape)})")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    _check_rows(ids, emb, source)
    _check_unique(ids, source)
    return EmbeddingSet(ids, emb, _as_landmark_ids(landmark_ids, len(ids), source))


def _as_str_ids(ids, source: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    elif arr.dtype.kind == "O" and all(isinstance(i, str) for i in arr.ravel()):
        arr = arr.astype(str)
    if arr.dtype.kind != "U" or arr.ndim != 1:
        raise UserError(f"{source}: 'ids' must be a 1-D array of strings, got {arr.dtype}")
    return arr


def _check_rows(ids: np.ndarray, emb: np.ndarray, source: str) -> None:
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise UserError(
            f"{source}: {bad.size} embeddings contain NaN or Inf (first id {str(ids[bad[0]])!r})"
        )
    zero = np.flatnonzero(~np.any(emb != 0, axis=1))
    if zero.size:
        raise UserError(
            f"{source}: {zero.size} embeddings are all zero and cannot be compared by cosine "
            f"(first id {str(ids[zero[0]])!r})"
        )


def _check_unique(ids: np.ndarray, source: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
        dups = uniq[counts > 1]
        examples = ", ".join(repr(str(d)) for d in dups[:3])
        raise UserError(f"{source}: {dups.size} ids occur more than once, e.g. {examples}")


def _as_landmark_ids(landmark_ids, n: int, source: str) -> np.ndarray | None:
    if landmark_ids is None:
        return None
    arr = np.asarray(landmark_ids)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(
            f"{source}: 'landmark_ids' must be int[{n}], got {arr.dtype}{list(arr.shape)}"
        )
    return arr.astype(np.int64)


def check_rows(ids: np.ndarray, emb: np.ndarray, source: str, start: int = 0) -> int:
    """Finite, non-zero rows (UserError otherwise); returns how many are not unit length."""
    _check_rows(ids[start : start + len(emb)], emb, source)
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb, dtype=np.float64))
    return int(np.sum(np.abs(norms - 1.0) > NORM_TOLERANCE))


def write_embeddings(path: str, ids, chunks: Iterable[np.ndarray], n: int, dim: int,
                     landmark_ids=None, dtype: str = "float32", cropped=None,
                     training_list: dict | None = None) -> int:
    """Streams `chunks` (float arrays [*, dim] summing to n rows) into a new embedding set.

    Each chunk is checked (finite, non-zero) as it passes; ids must be unique. Only one chunk is
    in memory at a time. Returns the number of rows that were not unit length (stored as given).
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    ids = _as_str_ids(ids, path)
    if len(ids) != n or n == 0 or dim == 0:
        raise UserError(f"{path}: {len(ids)} ids for {n} embedding rows of dimension {dim}")
    _check_unique(ids, path)
    landmark_ids = _as_landmark_ids(landmark_ids, n, path)
    off_unit = 0
    with npzstream.NpzWriter(path) as w:
        w.write("ids", ids)
        if landmark_ids is not None:
            w.write("landmark_ids", landmark_ids)
        if cropped is not None:
            w.write(CROPPED, np.asarray(cropped, dtype=bool).reshape(n))
        if training_list:
            w.write(TRAINING_LIST, np.array(json.dumps(training_list, sort_keys=True)))
        with w.stream("embeddings", dtype, (n, dim)) as put:
            for chunk in chunks:
                chunk = np.asarray(chunk)
                if chunk.ndim != 2 or chunk.shape[1] != dim:
                    raise UserError(f"{path}: rows of shape {list(chunk.shape)}, not [*, {dim}]")
                off_unit += check_rows(ids, chunk.astype(np.float32, copy=False), path, put.rows)
                put(chunk)
            if put.rows != n:
                raise UserError(f"{path}: {put.rows} embedding rows for {n} ids")
    return off_unit


def save_embeddings(path: str, ids, embeddings, landmark_ids=None, dtype: str = "float32"):
    """Validates and writes an embedding set atomically (local path or gs://).

    Args:
      path: destination .npz file; its folder is created if missing.
      ids: N strings; embeddings: float[N, D]; landmark_ids: optional int[N].
      dtype: "float32" or "float16" storage.

    Returns:
      The EmbeddingSet that was written (embeddings as given, float32).
    """
    es = validate(ids, embeddings, landmark_ids, source=path)
    rows = range(0, len(es), CHUNK_ROWS)
    chunks = (es.embeddings[s : s + CHUNK_ROWS] for s in rows)
    write_embeddings(path, es.ids, chunks, len(es), es.dim, es.landmark_ids, dtype)
    return es


class EmbeddingFile:
    """An embedding set on disk: ids and landmark ids in memory, descriptors read in chunks.

    Attributes:
      ids: str[N]; landmark_ids: int64[N] or None; dim: D; dtype: the stored float dtype.
      renormalised: rows whose stored norm is not 1 (they are normalised when read).
      cropped: bool[N] or None: rows described from a crop (revisitop query bbx).
      training_list: dict or None: the training list that built the model (see provenance).
    """

    def __init__(self, path: str, chunk_rows: int = CHUNK_ROWS):
        self.path, self.chunk_rows = path, chunk_rows
        self._reader = npzstream.NpzReader(path)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        members = self._reader.members
        missing = [k for k in _REQUIRED if k not in members]
        if missing:
            raise UserError(f"{self.path}: missing array(s) {missing}; found {sorted(members)} "
                            "(expected ids, embeddings[, landmark_ids])")
        self._emb = members["embeddings"]
        shape, dtype = self._emb.shape, self._emb.dtype
        if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
            raise UserError(f"{self.path}: 'embeddings' must be a float array [N, D], "
                            f"got {dtype}{list(shape)}")
        self.ids = _as_str_ids(members["ids"].read(), self.path)
        if shape[0] != len(self.ids):
            raise UserError(f"{self.path}: {len(self.ids)} ids but {shape[0]} embedding rows")
        if shape[0] == 0 or shape[1] == 0:
            raise UserError(f"{self.path}: empty embedding set (shape {list(shape)})")
        lm = members["landmark_ids"].read() if "landmark_ids" in members else None
        crop = members.get(CROPPED)
        self.cropped = crop.read().astype(bool) if crop is not None else None
        self.training_list = _training_list(members.get(TRAINING_LIST))
        self.landmark_ids = _as_landmark_ids(lm, len(self.ids), self.path)
        _check_unique(self.ids, self.path)
        self.dim, self.dtype = int(shape[1]), dtype
        self.renormalised = sum(
            check_rows(self.ids, c, self.path, s) for s, c in self._raw_chunks()
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __enter__(self) -> EmbeddingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    def _raw_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for s, c in self._emb.chunks(rows or self.chunk_rows):
            yield s, c.astype(np.float32, copy=False)

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32[m, D] unit rows), normalised in place, one chunk in memory."""
        for s, c in self._raw_chunks(rows):
            c /= np.linalg.norm(c, axis=1, keepdims=True)
            yield s, c

    def read_all(self) -> np.ndarray:
        """float32[N, D] unit rows, filled chunk by chunk (one full array, no temporaries)."""
        out = np.empty((len(self), self.dim), np.float32)
        for s, c in self.chunks():
            out[s : s + len(c)] = c
        return out


def open_embeddings(path: str, chunk_rows: int = CHUNK_ROWS) -> EmbeddingFile:
    """Opens and validates (in chunks) an embedding set; close it (or use `with`) when done.

    Raises:
      UserError: missing file, not an .npz, missing keys, or any validation failure.
    """
    if not npzstream.exists(path):
        raise UserError(f"{path}: embedding file not found")
    return EmbeddingFile(path, chunk_rows)


def load_embeddings(path: str) -> EmbeddingSet:
    """Reads and validates a whole embedding set (rows as stored, in float32).

    Raises:
      UserError: missing file, not an .npz, missing keys, or any `validate` failure.
    """
    with open_embeddings(path) as f:
        emb = np.empty((len(f), f.dim), np.float32)
        for s, c in f._raw_chunks():
            emb[s : s + len(c)] = c
        return EmbeddingSet(f.ids, emb, f.landmark_ids)


def _training_list(member) -> dict | None:
    if member is None:
        return None
    try:
        rec = json.loads(str(member.read()))
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None
