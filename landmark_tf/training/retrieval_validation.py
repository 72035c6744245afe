"""Retrieval validation during training: mAP@100 of a held-out query set against a held-out index.

Classification accuracy of the head says little about retrieval of landmarks the head has never
seen; this embeds two labelled TFRecord sets (e.g. `landmark-tfrecords --csv/--split` on a slice
of GLDv2 or of landmark-synth's index/test) with the model being trained, on the trainer's
devices (either backend), every `every` steps, ranks the index for each query (faiss, exact)
and scores Kaggle mAP@100 with "same landmark" as relevance (queries without a landmark in the
index are left out).

Preprocessing is the SavedModel's (decode -> resize_for_model), so the figure is what
landmark-export + landmark-embed + landmark-evaluate would report on the same records.
Results go to TensorBoard (logs/retrieval/map@100) and into the closing JSON
(retrieval_map@100, retrieval_step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from landmark_tf.data import records
from landmark_tf.errors import UserError
from landmark_tf.retrieval import knn, metrics, solutions


@dataclasses.dataclass
class RetrievalValConfig:
    """queries / index: TFRecord globs of labelled records; every: steps between runs
    (0 = with each classification validation, i.e. --eval_every); batch_size: global batch."""

    queries: str
    index: str
    every: int = 0
    batch_size: int = 64


class _RecordSet:
    """ids, landmark ids (read once) and a dataset of decoded uint8 images, in record order."""

    def __init__(self, pattern: str, flag: str):
        self.files = sorted(tf.io.gfile.glob(pattern))
        if not self.files:
            raise UserError(f"{flag} {pattern}: no file matches")
        meta = self._records().map(lambda ex: (ex["image/id"], ex["image/class/landmark_id"]))
        pairs = list(meta.as_numpy_iterator())
        self.ids = np.array([i.decode("utf-8", "replace") for i, _ in pairs])
        self.landmark_ids = np.array([lm for _, lm in pairs], np.int64)
        if not (self.landmark_ids >= 0).any():
            raise UserError(f"{flag} {pattern}: no record has a landmark id; retrieval "
                            "validation needs labelled records")  # fmt: skip

    def _records(self) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(self.files).map(records.parse_example)

    def images(self) -> tf.data.Dataset:
        decode = lambda ex: records.decode_image(ex["image/encoded"])  # noqa: E731
        return self._records().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)  # fmt: skip


def retrieval_map(q_vecs, q_labels, x_vecs, x_labels, x_ids, q_ids) -> float:
    """Kaggle mAP@100 with relevance = same landmark id (-1 never relevant)."""
    _, ids = knn.Searcher(x_vecs).search(q_vecs, metrics.MAX_PREDICTIONS)
    predictions = {q: [x_ids[j] for j in row if j >= 0] for q, row in zip(q_ids, ids.tolist(),
                                                                          strict=True)}
    sol = solutions.solution_from_labels(np.asarray(q_ids), q_labels, np.asarray(x_ids), x_labels)
    scored = {q: rel for q, rel in sol.subset().items() if rel}
    if not scored:
        raise UserError("retrieval validation: no query has a relevant index image")
    return float(metrics.mean_average_precision(predictions, scored))


class Hook:
    """Called by the training loop after each execution; returns closing-JSON facts."""

    def __init__(self, cfg: RetrievalValConfig, run):
        """run: the train.Run; its backend trainer embeds (under either backend)."""
        self.cfg, self.every = cfg, cfg.every or run.cfg.eval_every or (
            run.plan.steps_per_epoch)
        self.queries = _RecordSet(cfg.queries, "--retrieval_queries")
        self.index = _RecordSet(cfg.index, "--retrieval_index")
        self.embedder = run.trainer.embedder([run.models.config.image_size], cfg.batch_size)
        self.last: dict = {}

    def due(self, step: int, n: int, total: int) -> bool:
        return step == total or step // self.every > (step - n) // self.every

    def __call__(self, step: int, n: int, total: int, writer) -> dict:
        if not self.due(step, n, total):
            return self.last
        q = self.embedder.embed_dataset(self.queries.images())
        x = self.embedder.embed_dataset(self.index.images())
        value = retrieval_map(q, self.queries.landmark_ids, x, self.index.landmark_ids,
                              self.index.ids.tolist(), self.queries.ids.tolist())
        logging.info("step %d: retrieval mAP@100 %.4f", step, value)
        with writer("retrieval").as_default(step=step):
            tf.summary.scalar("map@100", value)
        self.last = {"retrieval_map@100": value, "retrieval_step": step,
                     "retrieval_queries": len(q), "retrieval_index": len(x)}  # fmt: skip
        return self.last
