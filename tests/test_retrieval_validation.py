"""Retrieval validation during training: held-out mAP@100 every N steps, to TensorBoard and the
closing JSON, equal to embedding the same records with the trained model by hand."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from tiny_dataset import make_dataset

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import model
from landmark_tf.preprocess import resize_for_model
from landmark_tf.training import retrieval_validation, train

MODEL = ModelConfig(image_size=32, embedding_dim=16, margin=0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    make_dataset(out, train_counts=(6, 6, 6, 6), val_counts=(2, 2, 2, 2), size=32)
    return out


def _embed_by_hand(embedding_model, pattern):
    ds = tf.data.TFRecordDataset(sorted(glob.glob(pattern)))
    vecs, labels, ids = [], [], []
    for raw in ds:
        ex = tf.io.parse_single_example(raw, {
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/id": tf.io.FixedLenFeature([], tf.string),
            "image/class/landmark_id": tf.io.FixedLenFeature([], tf.int64)})
        image = tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False)
        vecs.append(embedding_model(resize_for_model(image, 32)[None], training=False)[0].numpy())
        labels.append(int(ex["image/class/landmark_id"]))
        ids.append(ex["image/id"].numpy().decode())
    vecs = np.array(vecs)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True), np.array(labels), ids


def test_map_every_n_steps_to_tensorboard_and_json(data, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = TrainConfig(data_dir=data, workdir=workdir, train_steps=4, batch_size=8,
                      learning_rate=0.05, schedule="constant", checkpoint_every=4, val_split="",
                      augment=[], steps_per_execution=1)
    rv = retrieval_validation.RetrievalValConfig(
        queries=os.path.join(data, "val-*"), index=os.path.join(data, "train-*"), every=2,
        batch_size=3)
    result = train.train(MODEL, cfg, rv)
    assert result["retrieval_step"] == 4 and result["retrieval_queries"] == 8
    assert result["retrieval_index"] == 24
    events = glob.glob(os.path.join(workdir, "logs", "retrieval", "*"))
    steps = [e.step for f in events for e in tf.compat.v1.train.summary_iterator(f)
             for v in e.summary.value if v.tag == "map@100"]
    assert sorted(steps) == [2, 4]
    embedding_model, _ = model.restore_embedding_model(workdir)
    q, q_lm, q_ids = _embed_by_hand(embedding_model, os.path.join(data, "val-*"))
    x, x_lm, x_ids = _embed_by_hand(embedding_model, os.path.join(data, "train-*"))
    want = retrieval_validation.retrieval_map(q, q_lm, x, x_lm, x_ids, q_ids)
    assert result["retrieval_map@100"] == pytest.approx(want, abs=1e-6)
    assert 0.0 < want <= 1.0


def test_unlabelled_or_missing_records_are_user_errors(data, tmp_path):
    with pytest.raises(UserError, match="no file matches"):
        retrieval_validation._RecordSet(str(tmp_path / "none-*"), "--retrieval_queries")
