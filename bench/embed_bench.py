"""landmark-embed: --workdir (the model under the trainer's strategy, tf.data resize/batching)
next to --model (the exported SavedModel, serving_padded), on the same TFRecords, images/s.

    .venv/bin/python bench/embed_bench.py                       # 384 images, B0 at 128 px
    .venv/bin/python bench/embed_bench.py --backbone efficientnet-b3 --image_size 300

Builds a random-init workdir (config.json + checkpoint, as landmark-train leaves it), exports it,
writes JPEGs of 200-500 px into one TFRecord shard, then times both paths in turn (best of
--repeat, interleaved) and checks their rows agree. The strategy is what `--strategy=auto`
resolves to here (on this machine: the CPU); run it on a TPU/GPU host for the accelerator figure.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from landmark_tf.config import ModelConfig
from landmark_tf.data import records
from landmark_tf.modeling import model as model_lib
from landmark_tf.retrieval.embeddings import load_embeddings
from landmark_tf.serving import embed, embed_accel, export


def make_workdir(path: str, backbone: str, image_size: int) -> None:
    cfg = ModelConfig(backbone=backbone, image_size=image_size, embedding_dim=512, num_classes=8)
    models = model_lib.build_models(cfg)
    ckpt = model_lib.make_checkpoint(models, step=tf.Variable(1, dtype=tf.int64))
    tf.train.CheckpointManager(ckpt, os.path.join(path, model_lib.CHECKPOINT_DIR), 1).save(1)
    with open(os.path.join(path, model_lib.CONFIG_FILE), "w") as f:
        json.dump({"model": cfg.to_dict(), "train": {}, "data": {"num_classes": 8}}, f)


def write_records(path: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with tf.io.TFRecordWriter(path) as w:
        for i in range(n):
            h, wd = rng.integers(200, 500, 2)
            image = rng.integers(0, 256, (h, wd, 3), dtype=np.uint8)
            encoded = tf.io.encode_jpeg(image, quality=90).numpy()
            w.write(records.make_example(encoded=encoded, image_id=f"img{i:06d}", label=-1,
                                         landmark_id=-1, height=int(h), width=int(wd),
                                         is_clean=True))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--backbone", default="efficientnet-b0")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="embed-bench-")
    workdir, export_dir = os.path.join(root, "run"), os.path.join(root, "export")
    os.makedirs(workdir)
    make_workdir(workdir, a.backbone, a.image_size)
    export.export_model(export.ExportConfig(workdir=workdir, export_dir=export_dir))
    shard = os.path.join(root, "index-00000-of-00001.tfrec")
    write_records(shard, a.images)
    paths = {
        "SavedModel (--model)": dict(model=export_dir),
        "workdir (--workdir)": dict(model="", accel=embed_accel.AccelConfig(workdir=workdir)),
    }
    best = {name: float("inf") for name in paths}
    for r in range(a.repeat):
        for name, kw in paths.items():
            out = os.path.join(root, f"{name[:5]}{r}.npz")
            t0 = time.perf_counter()
            result = embed.embed_set(embed.EmbedConfig(output=out, records=shard,
                                                       batch_size=a.batch_size, **kw))
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = [load_embeddings(os.path.join(root, f"{n[:5]}0.npz")).embeddings for n in paths]
    print(f"{a.images} images (200-500 px JPEG) -> {a.backbone} at {a.image_size} px, batch "
          f"{a.batch_size}; strategy {result.get('replicas', 1)} replica(s), policy "
          f"{result.get('policy')}; best of {a.repeat}, machine shared (2 cores)")  # fmt: skip
    base = best["SavedModel (--model)"]
    for name, seconds in best.items():
        print(f"  {name:<22} {a.images / seconds:7.1f} images/s  {base / seconds:5.2f}x")
    print(f"  max |row difference| {np.abs(rows[0] - rows[1]).max():.2e}")


if __name__ == "__main__":
    main()
