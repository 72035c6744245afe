"""landmark-embed's library: embed every image of a set with an exported SavedModel -> .npz.

Exactness: images of different sizes are zero-padded into one batch and sent with their true
sizes to the `serving_padded` signature, which crops each back and resizes it on its own with
`resize_for_model`; so each row equals `serving_default` on the original image (within float
rounding of the batched convolution). Exports without it (e.g. someone else's Kaggle model) are
called image by image through `serving_default`.

Resumable: the set is cut into chunks of `chunk_size` images in source order; each finished chunk
is an atomic part file in `<output>.parts/`; a rerun skips finished chunks, and the merge gives
the same file as an uninterrupted run. Unreadable images are skipped and listed in
`<output stem>.skipped.json`, never fatal.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from landmark_tf import fileio
from landmark_tf.data import provenance
from landmark_tf.errors import UserError
from landmark_tf.retrieval import npzstream
from landmark_tf.retrieval.embeddings import DTYPES, write_embeddings
from landmark_tf.serving import embed_accel, embed_sources, signatures
from landmark_tf.serving.embed_sources import Item

MANIFEST = "manifest.json"


@dataclasses.dataclass
class EmbedConfig:
    """Source: `records` (a TFRecord glob) or `csv` + `image_dir` (IMAGE_DIR/a/b/c/<id>.jpg)."""

    model: str
    output: str
    records: str | None = None
    csv: str | None = None
    image_dir: str | None = None
    batch_size: int = 32
    chunk_size: int = 10000
    max_batch_pixels: int = 1 << 26  # padded B*H*W cap per batch (~200 MB of uint8 pixels)
    num_threads: int = 8
    dtype: str = "float32"  # storage of the merged set: float32 or float16 (half the bytes)
    accel: embed_accel.AccelConfig | None = None  # instead of `model`: a workdir on TPU/GPU/CPU
    revisitop_gnd: str | None = None  # instead of records/csv: revisitop images (+ image_dir)
    revisitop_set: str = "queries"  # queries: qimlist cropped to bbx; database: imlist


class Embedder:
    """Calls a SavedModel of the Kaggle format on lists of uint8 [H, W, 3] images."""

    def __init__(self, path: str):
        if not fileio.exists(fileio.join(path, "saved_model.pb")):
            raise UserError(f"--model {path}: no saved_model.pb, not a SavedModel folder")
        self._loaded = signatures.load_quietly(path)
        found = self._loaded.signatures
        if signatures.DEFAULT not in found:
            raise UserError(f"--model {path}: SavedModel has no '{signatures.DEFAULT}' signature")
        self._padded = found.get(signatures.PADDED)
        self._single = found[signatures.DEFAULT]
        out = (self._padded or self._single).structured_outputs
        self.dim = int(next(iter(out.values())).shape[-1] or 0)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """float32 [len(images), D]."""
        if self._padded is None:
            rows = [self._single(**{signatures.INPUT_IMAGE: im}) for im in images]
            return np.stack([r[signatures.OUTPUT].numpy() for r in rows])
        sizes = np.array([im.shape[:2] for im in images], dtype=np.int32)
        batch = np.zeros((len(images), *sizes.max(axis=0), 3), dtype=np.uint8)
        for i, im in enumerate(images):
            batch[i, : im.shape[0], : im.shape[1]] = im
        out = self._padded(**{signatures.INPUT_IMAGES: batch, signatures.IMAGE_SIZES: sizes})
        return out[signatures.OUTPUTS].numpy()


def embed_set(cfg: EmbedConfig) -> dict[str, Any]:
    """Embeds the source of `cfg` into `cfg.output`; returns the closing-JSON facts."""
    _check_config(cfg)
    source = embed_sources.open_source(cfg.records, cfg.csv, cfg.image_dir, cfg.revisitop_gnd,
                                       cfg.revisitop_set)
    if cfg.accel is not None:
        embedder = embed_accel.AccelEmbedder(cfg.accel, cfg.batch_size)
    else:
        embedder = Embedder(cfg.model)
    parts_dir = cfg.output + ".parts"
    # What a killed merge left (NpzWriter's and write_text_atomic's temporaries of the output).
    folder, name = os.path.split(cfg.output)
    fileio.remove_temporaries(folder or ".", of=name)
    fileio.remove_temporaries(folder or ".", of=name[: -len(".npz")] + ".skipped.json")
    _start_parts(parts_dir, _manifest(cfg, source, embedder))
    start, done = time.time(), 0
    bar = tqdm(total=source.total, unit="img", desc="embed", file=sys.stderr, mininterval=1.0)
    with futures.ThreadPoolExecutor(cfg.num_threads) as pool, bar:
        names = []
        for k, chunk in enumerate(_chunks(source.items, cfg.chunk_size)):
            names.append(_part_name(k))
            path = fileio.join(parts_dir, names[-1])
            if fileio.exists(path):
                bar.update(sum(1 for _ in chunk))
                continue
            part = _embed_chunk(chunk, embedder, pool, cfg, bar)
            done += len(part["ids"]) + len(part["skipped_ids"])
            _write_npz(path, part)
    training_list = _training_list(cfg, embedder)
    result = _merge(parts_dir, names, cfg.output, source.labelled, embedder.dim, cfg.dtype,
                    training_list)
    tf.io.gfile.rmtree(parts_dir)
    seconds = max(time.time() - start, 1e-9)
    facts = {"model": cfg.model}
    if cfg.accel is not None:
        facts = {"workdir": embedder.workdir, "policy": embedder.policy,
                 "replicas": embedder.strategy.num_replicas_in_sync}  # fmt: skip
    facts["training_list"] = provenance.describe(training_list)
    return {**result, "images_per_second": round(done / seconds, 2), **facts}


def _training_list(cfg: EmbedConfig, embedder) -> dict | None:
    """The model's training list: from the workdir, or the export's metadata.json (exports by
    others have none: unknown)."""
    if cfg.accel is not None:
        return provenance.find(embedder.workdir)
    meta = fileio.join(cfg.model, "metadata.json")
    return provenance.find(cfg.model) if fileio.exists(meta) else None


def _check_config(cfg: EmbedConfig) -> None:
    if bool(cfg.model) == (cfg.accel is not None):
        raise UserError("give either --model (a SavedModel) or --workdir (a training workdir)")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if not cfg.output.endswith(".npz"):
        raise UserError(f"--output {cfg.output}: must end with .npz")
    fileio.check_output_file(cfg.output, "--output")
    for name in ("batch_size", "chunk_size", "max_batch_pixels", "num_threads"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")


def _manifest(cfg: EmbedConfig, source: embed_sources.Source, embedder) -> dict[str, Any]:
    """What must not change between a run and its resumption (a re-export at the same path
    changes the model fingerprint)."""
    keys = ("model", "records", "csv", "image_dir", "batch_size", "chunk_size", "max_batch_pixels",
            "revisitop_gnd", "revisitop_set")
    if cfg.accel is not None:
        return {**{k: getattr(cfg, k) for k in keys}, "source_sha256": source.digest,
                **embedder.fingerprint()}  # fmt: skip
    fingerprint = fileio.join(cfg.model, "fingerprint.pb")
    if not fileio.exists(fingerprint):
        fingerprint = fileio.join(cfg.model, "saved_model.pb")
    model_sha = hashlib.sha256(fileio.read_bytes(fingerprint)).hexdigest()
    return {**{k: getattr(cfg, k) for k in keys}, "source_sha256": source.digest,
            "model_sha256": model_sha}  # fmt: skip


def _start_parts(parts_dir: str, manifest: dict[str, Any]) -> None:
    path = fileio.join(parts_dir, MANIFEST)
    if fileio.exists(path):
        old = fileio.read_json(path)
        if old != manifest:
            diff = sorted(k for k in manifest.keys() | old.keys() if old.get(k) != manifest.get(k))
            raise UserError(
                f"{parts_dir} holds an unfinished run with other settings ({', '.join(diff)} "
                "differ): rerun with the same flags to resume, or delete that folder"
            )
        fileio.remove_temporaries(parts_dir)
        return
    fileio.makedirs(parts_dir)
    fileio.write_json_atomic(path, manifest)


def _part_name(k: int) -> str:
    return f"part-{k:06d}.npz"


def _chunks(items: Iterable[Item], size: int) -> Iterator[Iterator[Item]]:
    """Consecutive chunks of `size` items, each a lazy iterator that must be consumed in turn."""
    it = iter(items)
    while True:
        first = next(it, None)
        if first is None:
            return
        remaining = size - 1

        def chunk(first=first, remaining=remaining):
            yield first
            for _ in range(remaining):
                item = next(it, None)
                if item is None:
                    return
                yield item

        yield chunk()


def _embed_chunk(chunk, embedder, pool, cfg: EmbedConfig, bar) -> dict[str, np.ndarray]:
    ids, landmark_ids, vectors, skipped, cropped = [], [], [], [], []
    decoded = _decode_ahead(chunk, pool, depth=2 * cfg.batch_size + cfg.num_threads)

    def taken(batch):
        ids.extend(item.id for item, _ in batch)
        landmark_ids.extend(item.landmark_id for item, _ in batch)
        cropped.extend(item.crop is not None for item, _ in batch)
        bar.update(len(batch))

    if isinstance(embedder, embed_accel.AccelEmbedder):  # one tf.data stream per chunk

        def good():
            for item, image in decoded:
                if isinstance(image, str):
                    skipped.append((item.id, item.path, image))
                    continue
                taken([(item, image)])
                yield image

        vectors.append(embedder.embed_stream(good()))
    else:
        for batch in _batches(decoded, skipped, cfg.batch_size, cfg.max_batch_pixels):
            vectors.append(embedder([image for _, image in batch]))
            taken(batch)
    bar.update(len(skipped))
    emb = np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
    return {
        "ids": np.array(ids, dtype=str),
        "embeddings": emb.astype(np.float32),
        "landmark_ids": np.array(landmark_ids, dtype=np.int64),
        "skipped_ids": np.array([s[0] for s in skipped], dtype=str),
        "skipped_paths": np.array([s[1] for s in skipped], dtype=str),
        "skipped_reasons": np.array([s[2] for s in skipped], dtype=str),
        "cropped": np.array(cropped, dtype=bool),
    }


def _decode_ahead(items: Iterable[Item], pool, depth: int):
    """Yields (item, uint8 image or reason str) in order, decoding up to `depth` ahead."""
    pending = collections.deque()
    for item in items:
        pending.append((item, pool.submit(embed_sources.load_image, item)))
        if len(pending) >= depth:
            item, fut = pending.popleft()
            yield item, fut.result()
    while pending:
        item, fut = pending.popleft()
        yield item, fut.result()


def _batches(decoded, skipped: list, batch_size: int, max_pixels: int):
    """Groups decoded images into batches; failures go to `skipped` as (id, path, reason)."""
    batch, height, width = [], 0, 0
    for item, image in decoded:
        if isinstance(image, str):
            skipped.append((item.id, item.path, image))
            continue
        h, w = max(height, image.shape[0]), max(width, image.shape[1])
        if batch and (len(batch) == batch_size or (len(batch) + 1) * h * w > max_pixels):
            yield batch
            batch, (h, w) = [], image.shape[:2]
        batch.append((item, image))
        height, width = h, w
    if batch:
        yield batch


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fileio.write_bytes_atomic(path, buf.getvalue())


def _merge(parts_dir, names, output, labelled, dim, dtype="float32",
           training_list=None) -> dict[str, Any]:
    """Streams the parts into `output`: one part's rows in memory at a time (ids and labels,
    small, are gathered first); rows are checked (finite, non-zero) as they pass."""
    paths = [fileio.join(parts_dir, n) for n in names]
    small = {k: [] for k in ("ids", "landmark_ids", "skipped_ids", "skipped_paths",
                             "skipped_reasons", "cropped")}  # fmt: skip
    for path in paths:
        with npzstream.NpzReader(path) as r:
            for key, values in small.items():
                if key in r.members:
                    values.append(r.members[key].read())
    cat = lambda key: np.concatenate(small[key]) if small[key] else np.zeros(0)  # noqa: E731
    skipped = [
        {"id": str(i), "path": str(p), "reason": str(r)}
        for i, p, r in zip(cat("skipped_ids"), cat("skipped_paths"), cat("skipped_reasons"),
                           strict=True)
    ]
    skipped_path = output[: -len(".npz")] + ".skipped.json"
    fileio.write_text_atomic(skipped_path, json.dumps({"count": len(skipped), "skipped": skipped}))
    ids = cat("ids").astype(str)
    if ids.size == 0:
        raise UserError(f"no image could be embedded ({len(skipped)} skipped, see {skipped_path})")
    landmark_ids = cat("landmark_ids").astype(np.int64)
    if labelled is None:  # records: labelled when any image has a landmark
        labelled = bool((landmark_ids >= 0).any())
    cropped = cat("cropped").astype(bool) if small["cropped"] else None
    if cropped is not None and not cropped.any():
        cropped = None  # only revisitop query sets carry the member
    write_embeddings(output, ids, _part_rows(paths), len(ids), dim,
                     landmark_ids if labelled else None, dtype, cropped,
                     training_list)  # fmt: skip
    return {
        "output": output, "count": len(ids), "dim": dim, "skipped": len(skipped),
        "skipped_list": skipped_path, "labelled": labelled, "chunks": len(names), "dtype": dtype,
    }


def _part_rows(paths: list[str]):
    for path in paths:
        with npzstream.NpzReader(path) as r:
            rows = r.members["embeddings"]
            if len(rows):
                yield rows.read()


def default_threads() -> int:
    return min(8, os.cpu_count() or 1)
