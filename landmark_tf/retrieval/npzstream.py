""".npz files read and written one member at a time, in chunks, without whole-array copies.

An .npz is a zip of .npy files. `np.savez` stores members uncompressed (ZIP_STORED), so each
member is a plain .npy at a fixed offset of the file: `NpzReader` finds that offset and reads
rows in chunks straight from the file (no memory map, so pages read once do not stay in the
process's resident set). Compressed members (`np.savez_compressed`) are streamed through the
zip decompressor in file order. `NpzWriter` writes uncompressed members chunk by chunk through
`zipfile`, ZIP64 throughout, so files of any size load with plain `np.load` too.

Paths may be gs://: the reader copies the file to a local temporary first (disk, not memory);
the writer writes a local temporary and copies it up. Local writes are atomic (rename).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator

import numpy as np

from landmark_tf.errors import BadFile, UserError, reason

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes


def _is_remote(path: str) -> bool:
    return "://" in path


def exists(path: str) -> bool:
    """Local paths without importing TensorFlow (its import alone is ~0.5 GB of RSS)."""
    if not _is_remote(path):
        return os.path.exists(path)
    import tensorflow as tf

    return tf.io.gfile.exists(path)


class Member:
    """One .npy member: `shape`, `dtype`, and row access that never reads the whole array."""

    def __init__(self, reader: NpzReader, info: zipfile.ZipInfo):
        self._reader, self._info = reader, info
        self.stored = info.compress_type == zipfile.ZIP_STORED
        with self._open() as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            header = f.tell()
        if fortran or dtype.hasobject:
            raise UserError(f"{reader.source}: member {info.filename} is Fortran-ordered or "
                            "holds Python objects; rewrite it with np.savez of plain arrays")
        self.shape, self.dtype = tuple(shape), dtype
        self._data_offset = header  # absolute (stored) or from the member start (compressed)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize

    def _start(self) -> int:
        f = self._reader.file
        f.seek(self._info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        return self._info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]

    def _open(self):
        if self.stored:
            f = self._reader.file
            f.seek(self._start())
            return _NoClose(f)
        return self._reader.zip.open(self._info)

    def _at_row(self, row: int):
        """The open member positioned at `row` (compressed members skip by decompressing)."""
        f = self._open()
        if self.stored:
            f.f.seek(self._data_offset + row * self._row_bytes)
        else:
            _skip(f, self._data_offset + row * self._row_bytes)
        return f

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as a new array (all of it by default)."""
        if not self.shape:
            with self._at_row(0) as f:
                return np.frombuffer(f.read(self.dtype.itemsize), self.dtype).reshape(())
        stop = len(self) if stop is None else min(stop, len(self))
        start = min(start, stop)
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        if self.stored:
            f = self._reader.file
            f.seek(self._data_offset + start * self._row_bytes)
            _read_into(f, out)
            return out
        for s, chunk in self.chunks(max(1, stop - start), start=start):
            out[s - start : s - start + len(chunk)] = chunk[: stop - s]
            break
        return out

    def chunks(self, rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (first row, array of up to `rows` rows) in order from row `start`."""
        rows = max(1, int(rows))
        if self.stored:
            for s in range(start, len(self), rows):
                yield s, self.read(s, s + rows)
            return
        with self._at_row(start) as f:
            for s in range(start, len(self), rows):
                out = np.empty((min(rows, len(self) - s), *self.shape[1:]), self.dtype)
                _read_into(f, out)
                yield s, out


class _NoClose:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        return False


def _skip(f, n: int) -> None:
    while n > 0:
        got = len(f.read(min(n, 1 << 24)))
        if not got:
            raise UserError("truncated .npy member")
        n -= got


def _read_into(f, out: np.ndarray) -> None:
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < len(view):
        n = f.readinto(view[got:]) if hasattr(f, "readinto") else _copy_read(f, view[got:])
        if not n:
            raise UserError(f"truncated .npy member ({got} of {len(view)} bytes)")
        got += n


def _copy_read(f, view) -> int:
    data = f.read(len(view))
    view[: len(data)] = data
    return len(data)


class NpzReader:
    """Members of an .npz by name (without ".npy"); a context manager that closes the file."""

    def __init__(self, path: str):
        self.source, self._tmpdir = path, None
        local = path
        if _is_remote(path):
            import tensorflow as tf

            self._tmpdir = tempfile.mkdtemp(prefix="landmark-npz-")
            local = os.path.join(self._tmpdir, "copy.npz")
            tf.io.gfile.copy(path, local, overwrite=True)
        self.file = None
        try:
            self.file = open(local, "rb")  # noqa: SIM115 (closed by close())
            self.zip = zipfile.ZipFile(self.file)
            self.members = {
                i.filename[: -len(".npy")] if i.filename.endswith(".npy") else i.filename:
                Member(self, i) for i in self.zip.infolist()
            }
        except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
            self.close()
            raise BadFile(path, reason(e)) from e
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as e:
            self.close()
            raise BadFile(path, f"not a readable .npz file ({e})") from e

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


class NpzWriter:
    """Writes an .npz member by member; `stream` writes one member in row chunks.

        with NpzWriter(path) as w:
            with w.stream("embeddings", np.float32, (n, d)) as put:
                for chunk in chunks: put(chunk)
            w.write("ids", ids)

    The file appears at `path` only when the block ends without an exception.
    """

    def __init__(self, path: str):
        self.path = path
        folder = os.path.dirname(path) if not _is_remote(path) else None
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._local = (
            os.path.join(tempfile.mkdtemp(prefix="landmark-npz-"), "out.npz")
            if _is_remote(path)
            else os.path.join(folder or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
        )
        self._zip = zipfile.ZipFile(self._local, "w", zipfile.ZIP_STORED, allowZip64=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._zip.close()
        if exc_type is not None:
            self._discard()
            return
        try:
            if _is_remote(self.path):
                import tensorflow as tf

                tf.io.gfile.copy(self._local, self.path, overwrite=True)
            else:
                os.replace(self._local, self.path)
        except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
            raise BadFile(self.path, reason(e)) from e
        finally:
            self._discard()

    def _discard(self) -> None:
        """Removes the local temporary (gone already after a successful replace)."""
        if _is_remote(self.path):
            shutil.rmtree(os.path.dirname(self._local), ignore_errors=True)
        elif os.path.exists(self._local):
            os.remove(self._local)

    def write(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array, order="C")
        with self.stream(name, array.dtype, array.shape) as put:
            if array.ndim:
                put(array)
            else:
                put.raw(array.tobytes())

    def stream(self, name: str, dtype, shape: tuple[int, ...]) -> _MemberStream:
        return _MemberStream(self._zip, name, np.dtype(dtype), tuple(int(s) for s in shape))


class _MemberStream:
    def __init__(self, zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        if dtype.hasobject:
            raise ValueError(f"{name}: object arrays cannot be written without pickle")
        self._f = zf.open(f"{name}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": shape}  # fmt: skip
        np.lib.format.write_array_header_2_0(self._f, header)
        self.dtype, self.shape, self.rows = dtype, shape, 0

    def __enter__(self) -> _MemberStream:
        return self

    def __call__(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:]:
            raise ValueError(f"chunk of shape {chunk.shape} for member of shape {self.shape}")
        self._f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
        self.rows += len(chunk)

    def raw(self, data: bytes) -> None:
        self._f.write(data)
        self.rows = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is None and self.rows is not None and self.shape and self.rows != self.shape[0]:
            raise ValueError(f"wrote {self.rows} rows into a member of shape {self.shape}")
