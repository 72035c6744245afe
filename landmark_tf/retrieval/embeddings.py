"""The embedding-set file (.npz) every stage after landmark-embed reads or writes.

Layout (numpy .npz, no pickled objects):
  ids           str[N]      image ids, unique
  embeddings    float32[N, D] one descriptor per id, L2-normalised
  landmark_ids  int64[N]    optional, for labelled sets; -1 means "no landmark"
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile

import numpy as np

from landmark_tf.errors import UserError

_REQUIRED = ("ids", "embeddings")


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
            f"{source}: {bad.size} embeddings contain NaN or Inf (first id {ids[bad[0]]!r})"
        )
    zero = np.flatnonzero(~np.any(emb != 0, axis=1))
    if zero.size:
        raise UserError(
            f"{source}: {zero.size} embeddings are all zero and cannot be compared by cosine "
            f"(first id {ids[zero[0]]!r})"
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


def save_embeddings(path: str, ids, embeddings, landmark_ids=None) -> EmbeddingSet:
    """Validates and writes an embedding set atomically (local path or gs://).

    Args:
      path: destination .npz file; its folder is created if missing.
      ids: N strings; embeddings: float[N, D]; landmark_ids: optional int[N].

    Returns:
      The EmbeddingSet that was written.
    """
    from landmark_tf import fileio  # TensorFlow only where files are touched.

    es = validate(ids, embeddings, landmark_ids, source=path)
    arrays = {"ids": es.ids, "embeddings": es.embeddings}
    if es.landmark_ids is not None:
        arrays["landmark_ids"] = es.landmark_ids
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    folder = os.path.dirname(path)
    if folder:
        fileio.makedirs(folder)
    fileio.write_bytes_atomic(path, buf.getvalue())
    return es


def load_embeddings(path: str) -> EmbeddingSet:
    """Reads and validates an embedding set written by `save_embeddings` (or by hand).

    Raises:
      UserError: missing file, not an .npz, missing keys, or any `validate` failure.
    """
    import tensorflow as tf

    from landmark_tf import fileio

    if not fileio.exists(path):
        raise UserError(f"{path}: embedding file not found")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise UserError(f"{path}: a single array, not an .npz embedding set")
            with z:
                return _from_npz(z, path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz embedding set ({e})") from e


def _from_npz(z, path: str) -> EmbeddingSet:
    missing = [k for k in _REQUIRED if k not in z.files]
    if missing:
        raise UserError(
            f"{path}: missing array(s) {missing}; found {sorted(z.files)} "
            "(expected ids, embeddings[, landmark_ids])"
        )
    lm = z["landmark_ids"] if "landmark_ids" in z.files else None
    return validate(z["ids"], z["embeddings"], lm, source=path)
