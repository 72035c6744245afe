"""Are a workdir's BatchNorm moving statistics stale? mAP@100 with them vs re-estimated ones.

  .venv/bin/python bench/bn_statistics.py --workdir demo_output/runs/b1 --demo_dir demo_output

Embeds the demo's index and test TFRecords with the workdir's embedding model twice: (a) with
the moving mean/variance that inference uses, (b) after re-estimating every BatchNorm's
statistics as the plain average over batches of 64 of up to 512 train images under the final
weights (stochastic depth off), as "precise BN" does (Wu & Johnson 2021). A large gap means the
moving averages still carry statistics of earlier weights: lower --bn_momentum for such runs.
"""

from __future__ import annotations

import argparse
import glob
import json

import keras
import numpy as np
import tensorflow as tf

from landmark_tf import preprocess
from landmark_tf.modeling import model as model_lib


def images(pattern: str, size: int, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """float32 [N, size, size, 3] 0..255 and ids of the records matching `pattern`."""
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/id": tf.io.FixedLenFeature([], tf.string)}
    xs, ids = [], []
    for record in tf.data.TFRecordDataset(sorted(glob.glob(pattern))):
        ex = tf.io.parse_single_example(record, spec)
        image = tf.io.decode_jpeg(ex["image/encoded"], channels=3)
        xs.append(preprocess.resize_for_model(image, size).numpy())
        ids.append(ex["image/id"].numpy().decode())
        if limit and len(xs) >= limit:
            break
    return np.stack(xs), ids


def map_at_100(q, db, q_ids, db_ids, solution: str) -> float:
    truth = {}
    with open(solution) as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        qid, relevant, usage = line.split(",")
        if usage != "Ignored":
            truth[qid] = set(relevant.split())
    ranks = np.argsort(-(q @ db.T), axis=1)[:, :100]
    aps = []
    for row, qid in enumerate(q_ids):
        if qid in truth:
            hits = np.array([db_ids[j] in truth[qid] for j in ranks[row]], float)
            precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
            aps.append((precision * hits).sum() / min(len(truth[qid]), 100))
    return float(np.mean(aps))


def embed(net, x):
    return np.concatenate([net(x[i:i + 64], training=False).numpy() for i in range(0, len(x), 64)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--demo_dir", required=True, help="scripts/demo.sh output folder")
    args = p.parse_args()
    net, cfg = model_lib.restore_embedding_model(args.workdir)
    d, size = args.demo_dir, cfg.image_size
    xi, ii = images(f"{d}/tfrecords/index/*.tfrec", size)
    xq, iq = images(f"{d}/tfrecords/test/*.tfrec", size)
    xt, _ = images(f"{d}/tfrecords/train/train-*.tfrec", size, 512)
    solution = f"{d}/gldv2/retrieval_solution_v2.1.csv"
    out = {"moving_statistics": map_at_100(embed(net, xq), embed(net, xi), iq, ii, solution)}
    layers = list(net._flatten_layers())
    for layer in layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    bns = [la for la in layers if isinstance(la, keras.layers.BatchNormalization)]
    for k, i in enumerate(range(0, len(xt), 64)):
        for bn in bns:
            bn.momentum = k / (k + 1.0)  # running mean over batches
        net(xt[i:i + 64], training=True)
    out["reestimated_statistics"] = map_at_100(embed(net, xq), embed(net, xi), iq, ii, solution)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
