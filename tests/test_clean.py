"""landmark-clean: components against a brute-force reference, the largest group per class on
embeddings with known noise, the train_clean.csv contract with landmark-tfrecords, and bad input."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from landmark_tf.curation import clean, graph
from landmark_tf.data import gldv2, planning
from landmark_tf.errors import UserError
from landmark_tf.retrieval.embeddings import save_embeddings

BIN = os.path.join(os.path.dirname(sys.executable), "landmark-clean")


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _reference_components(n, src, dst):
    """Union-find, the textbook way, as the reference."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


def test_connected_components_match_union_find():
    rng = np.random.default_rng(0)
    n = 500
    src, dst = rng.integers(0, n, 300), rng.integers(0, n, 300)
    labels = graph.connected_components(n, src, dst)
    ref = _reference_components(n, src, dst)
    # Same partition, and each label is its component's smallest member.
    np.testing.assert_array_equal(labels, ref)
    assert graph.connected_components(3, np.zeros(0, int), np.zeros(0, int)).tolist() == [0, 1, 2]


@pytest.mark.parametrize("k", [2, 50])
def test_within_class_edges_equal_brute_force(k, monkeypatch):
    rng = np.random.default_rng(1)
    sizes = np.array([1, 2, 5, 9, 40, 200])  # 200 > DENSE_MAX: the faiss path
    x = _unit(rng.normal(size=(sizes.sum(), 8)))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    src, dst = graph.within_class_edges(x, starts, sizes, k, 0.2)
    got = set(zip(src.tolist(), dst.tolist(), strict=True))
    want = set()
    for s, n in zip(starts, sizes, strict=True):
        sims = x[s:s + n] @ x[s:s + n].T
        np.fill_diagonal(sims, -np.inf)
        for i in range(n):
            top = np.argsort(-sims[i], kind="stable")[:min(k, n - 1)]
            want |= {(s + i, s + j) for j in top if sims[i, j] >= 0.2}
    assert got == want


def _noisy_classes(rng, classes=6, per_class=12, noise=3, dim=64):
    """Each class: a tight cluster around its centre plus `noise` unrelated random images."""
    ids, landmarks, vectors, is_noise = [], [], [], []
    for c in range(classes):
        centre = rng.normal(size=dim)
        for i in range(per_class):
            bad = i < noise
            v = rng.normal(size=dim) if bad else centre + 0.3 * rng.normal(size=dim)
            ids.append(f"img{c:02d}{i:03d}")
            landmarks.append(1000 + 7 * c)
            vectors.append(v)
            is_noise.append(bad)
    return np.array(ids), np.array(landmarks), _unit(np.array(vectors)), np.array(is_noise)


def _write_train(tmp_path, ids, landmarks, vectors, embed_landmarks=True):
    train_csv = str(tmp_path / "train.csv")
    with open(train_csv, "w") as f:
        f.write("id,url,landmark_id\n")
        for i, lm in zip(ids, landmarks, strict=True):
            f.write(f"{i},http://x/{i}.jpg,{lm}\n")
    npz = str(tmp_path / "train.npz")
    save_embeddings(npz, ids, vectors, landmarks if embed_landmarks else None)
    return train_csv, npz


def test_clean_drops_the_noise_and_writes_a_clean_list_tfrecords_reads(tmp_path):
    rng = np.random.default_rng(2)
    ids, landmarks, vectors, is_noise = _noisy_classes(rng)
    # A rare class (2 images) is dropped whatever its images look like.
    ids = np.append(ids, ["rare0001", "rare0002"])
    landmarks = np.append(landmarks, [5, 5])
    vectors = np.concatenate([vectors, _unit(np.ones((2, 64)))])
    is_noise = np.append(is_noise, [False, False])
    train_csv, npz = _write_train(tmp_path, ids, landmarks, vectors)
    out, report = str(tmp_path / "clean" / "train_clean.csv"), str(tmp_path / "report.csv")
    result = clean.clean(clean.CleanConfig(npz, train_csv, out, report, k=8, auto_quantile=0.999,
                                           min_images=3))
    kind, rows = gldv2.read_csv(out)
    assert kind == "clean"
    kept = {r.image_id for r in rows}
    assert kept == set(ids[(~is_noise) & (landmarks != 5)])
    assert result["classes"] == 6 and result["kept"] == len(kept)
    assert result["dropped"] == len(ids) - len(kept) and result["input_classes"] == 7
    # landmark-tfrecords takes it as is, next to the full train.csv.
    plan = planning.build_plan(train_csv=train_csv, clean_csv=out)
    flags = {ex.image_id: ex.is_clean for ex in plan.splits["train"]}
    assert {i for i, c in flags.items() if c} == kept
    with open(report) as f:
        per_class = {int(r["landmark_id"]): r for r in csv.DictReader(f)}
    assert per_class[5]["status"] == "too_few_images" and per_class[5]["kept"] == "0"
    assert per_class[1000]["kept"] == "9" and per_class[1000]["dropped"] == "3"
    # Its 3 noise images: two happen to be alike (cosine 0.32) and form one group of their own.
    assert per_class[1000]["groups"] == "3" and per_class[1000]["status"] == "kept"


def test_auto_threshold_is_the_cross_class_quantile():
    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(400, 16)))
    classes = np.repeat(np.arange(40), 10)
    t = graph.cross_class_quantile(x, classes, 0.9, samples=50_000)
    sims = x @ x.T
    other = classes[:, None] != classes[None, :]
    assert abs(t - np.quantile(sims[other], 0.9)) < 0.02


def test_a_class_without_a_large_group_is_dropped(tmp_path):
    rng = np.random.default_rng(4)
    ids = np.array([f"id{i:04d}" for i in range(8)])
    landmarks = np.array([1] * 4 + [2] * 4)
    centre = rng.normal(size=16)
    vectors = _unit(np.concatenate([centre + 0.1 * rng.normal(size=(4, 16)),
                                    np.eye(16)[:4]]))  # class 2: four orthogonal images
    train_csv, npz = _write_train(tmp_path, ids, landmarks, vectors)
    r = clean.clean(clean.CleanConfig(npz, train_csv, str(tmp_path / "c.csv"), threshold=0.5,
                                      min_images=2))
    assert (r["classes"], r["kept"], r["dropped"], r["dropped_classes"]) == (1, 4, 4, 1)
    assert (r["not_embedded"], r["embeddings_not_in_csv"]) == (0, 0)


def test_min_group_keeps_every_facet_of_a_class_and_still_drops_single_noise(tmp_path):
    rng = np.random.default_rng(6)
    facets = [rng.normal(size=32) for _ in range(3)]  # one class, three unrelated looks
    sizes = (6, 4, 3)
    vectors = [f + 0.1 * rng.normal(size=(n, 32)) for f, n in zip(facets, sizes, strict=True)]
    noise = rng.normal(size=(3, 32))  # three unrelated images filed under the class
    vectors = _unit(np.concatenate([*vectors, noise]))
    ids = np.array([f"id{i:04d}" for i in range(len(vectors))])
    landmarks = np.full(len(ids), 7)
    train_csv, npz = _write_train(tmp_path, ids, landmarks, vectors)

    def kept(**kw):
        out = str(tmp_path / f"clean{len(kw)}.csv")
        clean.clean(clean.CleanConfig(npz, train_csv, out, threshold=0.8, k=8, **kw))
        return {r.image_id for r in gldv2.read_csv(out)[1]}

    assert kept() == set(ids[:6])  # the largest group only: two facets lost
    assert kept(min_group=2) == set(ids[:13])  # every facet kept, the noise dropped


def test_labels_that_disagree_with_train_csv_are_an_error(tmp_path):
    ids, landmarks, vectors, _ = _noisy_classes(np.random.default_rng(5), classes=2)
    train_csv, _ = _write_train(tmp_path, ids, landmarks, vectors)
    npz = str(tmp_path / "other.npz")
    save_embeddings(npz, ids, vectors, landmarks + 1)
    with pytest.raises(UserError, match="another landmark_id"):
        clean.clean(clean.CleanConfig(npz, train_csv, str(tmp_path / "c.csv")))


def test_cli_prints_closing_json_and_rejects_bad_input(tmp_path):
    ids, landmarks, vectors, _ = _noisy_classes(np.random.default_rng(6), classes=3)
    train_csv, npz = _write_train(tmp_path, ids, landmarks[:], vectors, embed_landmarks=False)
    out = str(tmp_path / "train_clean.csv")
    p = subprocess.run([BIN, f"--embeddings={npz}", f"--train_csv={train_csv}",
                        f"--output={out}", "--k=8"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"classes", "kept", "dropped"} <= set(last) and last["classes"] == 3
    p = subprocess.run([BIN, f"--embeddings={npz}", f"--train_csv={train_csv}",
                        f"--output={out}", "--threshold=2"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("landmark-clean: error: --threshold")
