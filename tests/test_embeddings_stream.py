"""Embedding files at scale: member-by-member reading and writing, old np.savez files, float16
storage, chunked validation, and re-ranking through the main index."""

import os

import numpy as np
import pytest

from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn, npzstream, rerank
from landmark_tf.retrieval.embeddings import (
    load_embeddings,
    open_embeddings,
    save_embeddings,
    write_embeddings,
)
from landmark_tf.retrieval.evaluation import EvalConfig, evaluate


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed, "ours"])
def test_old_and_new_files_stream_the_same_rows_in_chunks(tmp_path, writer):
    rng = np.random.default_rng(0)
    x, ids = _unit(rng, 1000, 12) * 2.0, np.array([f"id{i}" for i in range(1000)])
    lm = np.arange(1000) % 7
    path = str(tmp_path / "e.npz")
    if writer == "ours":
        write_embeddings(path, ids, (x[s : s + 300] for s in range(0, 1000, 300)), 1000, 12, lm)
    else:
        writer(path, ids=ids, embeddings=x, landmark_ids=lm)
    with open_embeddings(path, chunk_rows=128) as f:
        assert f.renormalised == 1000 and f.ids.tolist() == ids.tolist()
        chunks = list(f.chunks())
        assert [s for s, _ in chunks] == list(range(0, 1000, 128))
        np.testing.assert_allclose(np.concatenate([c for _, c in chunks]), x / 2, atol=1e-6)
        np.testing.assert_array_equal(f.landmark_ids, lm)
    np.testing.assert_array_equal(np.load(path)["embeddings"], x)  # plain numpy still reads it


def test_bad_row_in_a_later_chunk_names_its_id(tmp_path):
    x = np.ones((500, 4), np.float32)
    x[431, 2] = np.nan
    path = str(tmp_path / "bad.npz")
    np.savez(path, ids=np.array([f"r{i}" for i in range(500)]), embeddings=x)
    with pytest.raises(UserError, match="NaN.*'r431'"):
        open_embeddings(path, chunk_rows=100)


def test_write_refuses_a_wrong_row_count_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "e.npz")
    with pytest.raises(UserError, match="3 embedding rows for 4 ids"):
        write_embeddings(path, ["a", "b", "c", "d"], [np.eye(3, dtype=np.float32)], 4, 3)
    assert os.listdir(tmp_path) == []


def test_float16_storage_halves_the_file_and_ranks_the_same(tmp_path):
    rng = np.random.default_rng(1)
    x, q = _unit(rng, 3000, 64), _unit(rng, 50, 64)
    ids = [f"x{i}" for i in range(3000)]
    save_embeddings(str(tmp_path / "f32.npz"), ids, x)
    save_embeddings(str(tmp_path / "f16.npz"), ids, x, dtype="float16")
    save_embeddings(str(tmp_path / "q.npz"), [f"q{i}" for i in range(50)], q)
    assert np.load(str(tmp_path / "f16.npz"))["embeddings"].dtype == np.float16
    sizes = [os.path.getsize(tmp_path / f) for f in ("f32.npz", "f16.npz")]
    assert sizes[1] < 0.55 * sizes[0]
    with open_embeddings(str(tmp_path / "f16.npz")) as f:
        assert f.renormalised == 0  # float16 rounding of norms is not "not unit length"
    sub = {}
    for name in ("f32", "f16"):
        out = str(tmp_path / f"{name}.csv")
        evaluate(EvalConfig(queries=str(tmp_path / "q.npz"), index=str(tmp_path / f"{name}.npz"),
                            submission=out, k=10))  # fmt: skip
        with open(out) as f:
            sub[name] = f.read().splitlines()
    same = sum(a == b for a, b in zip(sub["f32"], sub["f16"], strict=True)) / len(sub["f32"])
    assert same > 0.9
    with pytest.raises(UserError, match="dtype"):
        save_embeddings(str(tmp_path / "x.npz"), ids, x, dtype="int8")


def test_reader_refuses_pickled_members_and_non_zip(tmp_path):
    path = str(tmp_path / "junk.npz")
    with open(path, "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        npzstream.NpzReader(path)


def _clustered(rng, n, centres):
    x = centres[rng.integers(0, len(centres), n)] + 0.8 * rng.normal(size=(n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_dba_and_aqe_search_through_the_ivf_index(monkeypatch):
    rng = np.random.default_rng(2)
    db = _clustered(rng, 3000, rng.normal(size=(30, 16)))
    exact = rerank.database_augmentation(knn.Searcher(db), 5, 3.0)
    ivf = knn.Searcher(db, "ivf", nlist=16, nprobe=16)  # every list: same neighbours as exact
    kinds, original = [], knn.Searcher._search_batch

    def spy(self, q, k):
        kinds.append("ivf" if self.ivf is not None else "flat")
        return original(self, q, k)

    monkeypatch.setattr(knn.Searcher, "_search_batch", spy)
    monkeypatch.setattr(knn.faiss, "knn", None)  # no exact search by another route either
    queries, out = rerank.rerank_vectors(db[:100], ivf, "dba+aqe", 5, 3.0)
    assert kinds and set(kinds) == {"ivf"}
    np.testing.assert_allclose(out.database, exact, atol=1e-5)
    assert out.ivf is not None and out.size == 3000 and queries.shape == (100, 16)


def test_dba_in_place_reuses_the_index_and_gives_the_same_vectors():
    rng = np.random.default_rng(3)
    db = _clustered(rng, 2000, rng.normal(size=(20, 8)))
    copy = rerank.augment_database(knn.Searcher(db), 4, 3.0)
    searcher = knn.Searcher(db)
    same = rerank.augment_database(searcher, 4, 3.0, in_place=True)
    assert same is searcher
    np.testing.assert_allclose(same.database, copy.database, atol=1e-6)


def test_load_embeddings_keeps_stored_rows(tmp_path):
    path = str(tmp_path / "e.npz")
    save_embeddings(path, ["a", "b"], np.array([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_array_equal(load_embeddings(path).embeddings, [[3, 4], [0, 2]])
