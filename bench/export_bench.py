"""Export benchmark: the exported signature vs the Keras embedding model, and batched extraction.

    .venv/bin/python bench/export_bench.py [--backbone efficientnet-b0 --image_size 256]

Builds a random-init model (weights do not change the speed), writes a training workdir, exports
it with landmark_tf.serving.export (timed, size printed) and loads the SavedModel back. Then, on the
same GLDv2-sized uint8 images (480x640 .. 800x600) and interleaved call by call:
  (a) serving_default(input_image), what Kaggle calls;
  (b) the Keras embedding model called eagerly on resize_for_model(image);
  (c) the same Keras call compiled with tf.function (the fair reference for a graph).
Target: (a) within 10% of the Keras model. Batched: serving_batch on one-size batches,
serving_padded on mixed sizes, and landmark-embed end to end (JPEG decode + padded batches).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from landmark_tf.config import ModelConfig
from landmark_tf.modeling import model as model_lib
from landmark_tf.preprocess import resize_for_model
from landmark_tf.serving import embed, export, signatures

SHAPES = [(480, 640), (640, 480), (600, 800), (533, 800), (768, 512), (800, 600)]


def make_workdir(path: str, cfg: ModelConfig):
    """config.json + one checkpoint, as landmark-train leaves them; returns the embedding model."""
    models = model_lib.build_models(cfg, with_head=False)
    ckpt = model_lib.make_checkpoint(models, step=tf.Variable(1, dtype=tf.int64))
    tf.train.CheckpointManager(ckpt, os.path.join(path, "checkpoints"), 1).save()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": cfg.to_dict(), "train": {}, "data": {}}, f)
    return models.embedding_model


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*SHAPES[i % len(SHAPES)], 3), dtype=np.uint8) for i in range(n)]


def per_image(contenders: dict, imgs: list[np.ndarray], repeat: int) -> dict[str, float]:
    """Median seconds per image of each contender, calls interleaved image by image."""
    for fn in contenders.values():
        fn(imgs[0])
    times = {name: [] for name in contenders}
    for _ in range(repeat):
        for im in imgs:
            for name, fn in contenders.items():
                t = time.perf_counter()
                fn(im)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def throughput(contenders: dict, batches: list, repeat: int) -> dict[str, float]:
    """images/s of each contender from its median time per batch, calls interleaved batch by
    batch (after one warm-up call each)."""
    for fn, _ in contenders.values():
        fn(batches[0])
    times = {name: [] for name in contenders}
    for _ in range(repeat):
        for b in batches:
            for name, (fn, _) in contenders.items():
                t = time.perf_counter()
                fn(b)
                times[name].append(time.perf_counter() - t)
    return {name: len(batches[0]) / statistics.median(times[name]) for name in contenders}


def padded(imgs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([im.shape[:2] for im in imgs], dtype=np.int32)
    batch = np.zeros((len(imgs), *sizes.max(axis=0), 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        batch[i, : im.shape[0], : im.shape[1]] = im
    return batch, sizes


def jpeg_set(root: str, imgs: list[np.ndarray]) -> str:
    """GLDv2-layout JPEG tree + CSV for landmark-embed; returns the CSV path."""
    ids = [f"{i:016x}" for i in range(len(imgs))]
    for image_id, im in zip(ids, imgs, strict=True):
        folder = os.path.join(root, "images", *image_id[:3])
        os.makedirs(folder, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, f"{image_id}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    with open(os.path.join(root, "set.csv"), "w") as f:
        f.write("id\n" + "".join(f"{i}\n" for i in ids))
    return os.path.join(root, "set.csv")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="efficientnet-b0")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--embedding_dim", type=int, default=512)
    p.add_argument("--images", type=int, default=24, help="images for per-image latency")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=3, help="batches per throughput pass")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--embed_images", type=int, default=96, help="JPEGs for landmark-embed")
    args = p.parse_args()
    S = args.image_size
    cfg = ModelConfig(backbone=args.backbone, image_size=S, embedding_dim=args.embedding_dim,
                      num_classes=10)  # fmt: skip
    root = tempfile.mkdtemp(prefix="export-bench-")
    model = make_workdir(os.path.join(root, "workdir"), cfg)
    t = time.perf_counter()
    res = export.export_model(export.ExportConfig(os.path.join(root, "workdir"),
                                                  os.path.join(root, "export")))  # fmt: skip
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    loaded = signatures.load_quietly(res["export_dir"])
    load_s = time.perf_counter() - t
    sigs = loaded.signatures
    spec = [tf.TensorSpec([None, None, 3], tf.uint8)]
    graph = tf.function(lambda im: model(resize_for_model(im[None], S), training=False),
                        input_signature=spec)  # fmt: skip
    contenders = {
        "savedmodel serving_default": lambda im: sigs["serving_default"](input_image=im)[
            "global_descriptor"].numpy(),  # fmt: skip
        "keras eager": lambda im: model(resize_for_model(im[None], S), training=False).numpy(),
        "keras tf.function": lambda im: graph(im).numpy(),
    }
    imgs = images(args.images, 0)
    exported, eager = contenders["savedmodel serving_default"], contenders["keras eager"]
    diff = max(float(np.abs(exported(im) - eager(im)[0]).max()) for im in imgs[:4])
    lat = per_image(contenders, imgs, args.repeat)

    B = args.batch_size
    batches = [images(B, 10 + b) for b in range(args.batches)]
    keras_batch = tf.function(lambda x: model(resize_for_model(x, S), training=False),
                              input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    one_size = lambda fn: (lambda ims: fn(np.stack([ims[0]] * len(ims))), None)  # noqa: E731
    tput = throughput({
        "serving_batch (one size)": one_size(
            lambda x: sigs["serving_batch"](input_images=x)["global_descriptors"].numpy()),
        "keras tf.function batch (one size)": one_size(lambda x: keras_batch(x).numpy()),
        "serving_padded (mixed sizes)": (lambda ims: sigs["serving_padded"](**dict(zip(
            ("input_images", "image_sizes"), padded(ims), strict=True)))[
            "global_descriptors"].numpy(), None),
    }, batches, args.repeat)  # fmt: skip
    csv_path = jpeg_set(os.path.join(root, "set"), images(args.embed_images, 30))
    r = embed.embed_set(embed.EmbedConfig(model=res["export_dir"], output=os.path.join(
        root, "set.npz"), csv=csv_path, image_dir=os.path.join(root, "set", "images"),
        batch_size=B, num_threads=2))  # fmt: skip
    # Includes the one-off optimisation of the loaded graph on its first call (~1-2 s).
    tput["landmark-embed end to end (JPEG decode + padded)"] = r["images_per_second"]

    print(f"{args.backbone} at {S}px, D={args.embedding_dim}; export {export_s:.1f} s, "
          f"{res['size_mb']:.1f} MB; load {load_s:.1f} s; max |savedmodel - keras| = {diff:.2e}")
    ref = lat["keras eager"]
    for name, sec in lat.items():
        print(f"  per image  {name:40s} {sec * 1e3:8.1f} ms   x{sec / ref:.3f} of keras eager")
    print(f"  savedmodel / keras tf.function = "
          f"{lat['savedmodel serving_default'] / lat['keras tf.function']:.3f}")
    for name, ips in tput.items():
        print(f"  batch {B:3d}  {name:48s} {ips:8.1f} images/s")
    print(json.dumps({"per_image_ms": {k: round(v * 1e3, 2) for k, v in lat.items()},
                      "images_per_second": {k: round(v, 2) for k, v in tput.items()},
                      "export_seconds": round(export_s, 1), "size_mb": res["size_mb"],
                      "max_abs_diff": diff}))  # fmt: skip


if __name__ == "__main__":
    main()
