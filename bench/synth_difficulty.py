"""How hard is landmark-synth's retrieval task? mAP@100 of cheap descriptors, side by side.

    .venv/bin/python bench/synth_difficulty.py [--data_dir DIR] [--difficulty 1.0] [--cnn]

Makes (or reads) a synthetic dataset and scores test->index retrieval with descriptors that
need no training: (a) raw downsampled pixels, (b) colour histograms, (c) with --cnn, a
random-init EfficientNet-B0 (forward passes only). It also scores (d) a descriptor *learned* on
the train split: gradient-orientation histograms projected by LDA onto the train landmarks.
A good synthetic task keeps (a)-(c) low and lets (d), and a trained network, win.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from landmark_tf import fileio
from landmark_tf.synth import generator


def load(root: str, split: str, ids: list[str], size: int) -> np.ndarray:
    """float32 [N, size, size, 3] 0..255."""
    out = []
    for image_id in ids:
        data = fileio.read_bytes(generator.image_path(root, split, image_id))
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img, dtype=np.float32))
    return np.stack(out)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def raw_pixels(x: np.ndarray) -> np.ndarray:
    n, s = x.shape[0], x.shape[1] // 16
    small = x.reshape(n, 16, s, 16, s, 3).mean(axis=(2, 4)).reshape(n, -1)
    return l2n(small - small.mean(axis=1, keepdims=True))


def colour_hist(x: np.ndarray, bins: int = 8) -> np.ndarray:
    q = np.minimum((x / 256 * bins).astype(np.int64), bins - 1)
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    h = np.stack([np.bincount(c.ravel(), minlength=bins**3) for c in code]).astype(np.float64)
    return l2n(np.sqrt(h))  # Hellinger


def gradient_hist(x: np.ndarray, cells: int = 6, bins: int = 9) -> np.ndarray:
    """HOG-like: unsigned gradient-orientation histograms on a cells x cells grid."""
    g = x.mean(axis=3)
    gy, gx = np.gradient(g, axis=(1, 2))
    mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)
    b = np.minimum((ang / np.pi * bins).astype(np.int64), bins - 1)
    n, s = g.shape[0], g.shape[1] // cells
    feats = np.zeros((n, cells, cells, bins))
    for k in range(bins):
        m = (mag * (b == k))[:, : s * cells, : s * cells]
        feats[..., k] = m.reshape(n, cells, s, cells, s).sum(axis=(2, 4))
    feats = np.sqrt(feats.reshape(n, -1))
    return l2n(feats)


def lda(x: np.ndarray, y: np.ndarray, dim: int, reg: float) -> np.ndarray:
    """Projection float64 [F, dim] maximising between- over within-landmark scatter."""
    mu = x.mean(axis=0)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    within = sum(np.cov((x[y == c] - means[i]).T, bias=True) * (y == c).sum()
                 for i, c in enumerate(classes)) / len(x)
    between = np.cov((means - mu).T, bias=True)
    within += reg * np.trace(within) / len(within) * np.eye(len(within))
    vals, vecs = np.linalg.eig(np.linalg.solve(within, between))
    order = np.argsort(-vals.real)[:dim]
    return vecs[:, order].real


def untrained_cnn(*images: np.ndarray) -> list[np.ndarray]:
    """GAP features of one random-init EfficientNet-B0 for each float32 [N, S, S, 3] batch."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.EfficientNetB0(
        weights=None, include_top=False, pooling="avg", input_shape=images[0].shape[1:])
    return [l2n(model.predict(x, batch_size=64, verbose=0)) for x in images]


def map_at_100(q: np.ndarray, db: np.ndarray, db_ids, truth: dict[int, set]) -> float:
    """Kaggle mAP@100 over the queries (rows of q) listed in `truth`."""
    ranks = np.argsort(-(q @ db.T), axis=1)[:, :100]
    aps = []
    for row, relevant in truth.items():
        hits = np.array([db_ids[j] in relevant for j in ranks[row]], dtype=np.float64)
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum() / min(len(relevant), 100))
    return float(np.mean(aps))


def read_csv(path: str) -> list[list[str]]:
    return [line.split(",") for line in fileio.read_text(path).splitlines()[1:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", help="an existing landmark-synth output (default: make one)")
    p.add_argument("--difficulty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96, help="descriptor input size")
    p.add_argument("--cnn", action="store_true", help="also score a random-init EfficientNet-B0")
    args = p.parse_args()
    root = args.data_dir or tempfile.mkdtemp(prefix="synth-bench-")
    t0 = time.time()
    if not args.data_dir:
        cfg = generator.SynthConfig(difficulty=args.difficulty, seed=args.seed)
        print(json.dumps(generator.generate(cfg, root, progress=False)), file=sys.stderr)
    made = time.time() - t0
    train = read_csv(fileio.join(root, "train.csv"))
    clean = {i for row in read_csv(fileio.join(root, "train_clean.csv")) for i in row[1].split()}
    train = [r for r in train if r[0] in clean]
    index_ids = [r[0] for r in read_csv(fileio.join(root, "index.csv"))]
    test_ids = [r[0] for r in read_csv(fileio.join(root, "test.csv"))]
    solution = read_csv(fileio.join(root, "retrieval_solution_v2.1.csv"))
    row_of = {t: i for i, t in enumerate(test_ids)}
    truth = {row_of[r[0]]: set(r[1].split()) for r in solution if r[2] != "Ignored"}
    xs = {s: load(root, s, ids, args.size) for s, ids in
          (("train", [r[0] for r in train]), ("index", index_ids), ("test", test_ids))}
    y = np.array([int(r[2]) for r in train])
    results = {}
    for name, fn in (("raw_pixels_16x16", raw_pixels), ("colour_hist_8x8x8", colour_hist)):
        results[name] = map_at_100(fn(xs["test"]), fn(xs["index"]), index_ids, truth)
    hog = {s: gradient_hist(v) for s, v in xs.items()}
    results["gradient_hist_untrained"] = map_at_100(hog["test"], hog["index"], index_ids, truth)
    w = lda(hog["train"], y, dim=min(64, len(np.unique(y)) - 1), reg=1.0)
    results["gradient_hist_lda_trained"] = map_at_100(
        l2n(hog["test"] @ w), l2n(hog["index"] @ w), index_ids, truth)
    if args.cnn:
        test, index = untrained_cnn(xs["test"], xs["index"])
        results["efficientnet_b0_random_init"] = map_at_100(test, index, index_ids, truth)
    results.update(queries=len(truth), index=len(index_ids), generate_seconds=round(made, 1))
    if not args.data_dir:
        shutil.rmtree(root)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
