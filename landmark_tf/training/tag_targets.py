"""Targets of tag pretraining: per-image title tags (image/tags) as a padded tensor with weights.

WeChat AI ("Rethinking Model Pretraining for Noisy Image Classification", Yan, Niu, Zhou; GLD2019)
pretrains the backbone on web images' own text before the class stage:
  multilabel (WT-Set): the loss is the sum over an image's tags of the cross-entropy of the softmax
    over the tag vocabulary, every tag weight 1 (the seed: "sum of cross-entropies over an image's
    target labels"; not divided by the image's tag count, as the seed states it).
  label_weighted (LW-Set): each tag's cross-entropy weighted, the weights of an image summing to 1
    (a soft target over the concepts). The seed's weights are text similarities between the title
    and the concept names (top-k); this dataset has no concept names beyond the title words, so
    here a tag's weight is its smoothed inverse document frequency (sklearn's smooth idf,
    ln((1 + N) / (1 + df)) + 1, N titles, df from tag_vocab.csv), normalised over the image's
    tags: rarer, more specific words count more. That weighting is this package's choice.
Not here: the seed's class-balanced sampling over tags (--sampling balances landmark classes).

The batch carries tags as int32 [B, T] padded with -1, T = dataset_info.json's tags.max_tags; the
weights float32 [B, T] are 0 on padding, so images without tags add nothing to the loss.
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.config import TrainConfig
from landmark_tf.data import records
from landmark_tf.errors import UserError


def smooth_idf(document_frequency: np.ndarray, num_titles: int) -> np.ndarray:
    """float32 [V]: ln((1 + N) / (1 + df)) + 1 (sklearn TfidfTransformer, smooth_idf=True)."""
    df = np.asarray(document_frequency, dtype=np.float64)
    return (np.log((1.0 + num_titles) / (1.0 + df)) + 1.0).astype(np.float32)


def read_vocab(data_dir: str, info: dict) -> np.ndarray:
    """int64 [V] document frequencies of tag_vocab.csv, by tag id; UserError when it does not
    match dataset_info.json's tags."""
    path = fileio.join(data_dir, info["tags"].get("vocab_file", "tag_vocab.csv"))
    if not fileio.exists(path):
        raise UserError(f"{path} not found: the tag vocabulary of {data_dir} is missing")
    rows = list(csv.DictReader(io.StringIO(fileio.read_text(path))))
    if [int(r["tag_id"]) for r in rows] != list(range(info["tags"]["vocab_size"])):
        raise UserError(f"{path}: tag ids are not 0..{info['tags']['vocab_size'] - 1}")
    return np.array([int(r["document_frequency"]) for r in rows], dtype=np.int64)


def for_head(plan, cfg: TrainConfig, head: str):
    """`plan` (train.DataPlan) for a tag head: classes = the tag vocabulary, tag width and
    weights set, no top-1 validation (landmark labels are not tags). UserError for records
    without tags and for settings that weight landmark classes."""
    where = fileio.join(cfg.data_dir, records.DATASET_INFO)
    info = records.load_dataset_info(cfg.data_dir)
    if "tags" not in info:
        raise UserError(f"--head={head} trains on title tags, but {where} has none: write the "
                        "records with landmark-tfrecords --attribution_csv")
    tags = info["tags"]
    if int(tags["vocab_size"]) < 2:
        raise UserError(f"{where}: {tags['vocab_size']} tags; --head={head} needs at least 2")
    if cfg.class_weighting != "none" or cfg.not_clean_weight != 1.0:
        raise UserError(f"--class_weighting and --not_clean_weight weight landmark classes; "
                        f"--head={head} weights tags (use the defaults)")
    if cfg.grad_accum_steps == 0:
        raise UserError(f"--grad_accum_steps=auto does not plan --head={head} yet; give a number")
    weights = None
    if head == "label_weighted":
        df = read_vocab(cfg.data_dir, info)
        weights = smooth_idf(df, int(info["source"]["attribution_rows"]))
    return dataclasses.replace(plan, num_classes=int(tags["vocab_size"]), val_files=(),
                               val_examples=0, tag_width=max(int(tags["max_tags"]), 1),
                               tag_weights=weights)


def parse_tags(serialized: tf.Tensor, width: int) -> tf.Tensor:
    """int32 [width]: a record's image/tags, cut to `width` and padded with -1 (host, tf.data)."""
    spec = {records.TAGS_FEATURE: tf.io.VarLenFeature(tf.int64)}
    tags = tf.io.parse_single_example(serialized, spec)[records.TAGS_FEATURE].values[:width]
    tags = tf.cast(tags, tf.int32)
    tags = tf.pad(tags, [[0, width - tf.shape(tags)[0]]], constant_values=-1)
    return tf.ensure_shape(tags, [width])  # static: batches have static shapes (JAX shards them)


def tag_weights(tags: tf.Tensor, table: tf.Tensor | None) -> tf.Tensor:
    """float32 [B, T] loss weights of int32 [B, T] tags (-1 padding): 1 per tag (table None,
    multilabel), or table[tag] normalised to sum 1 over the image's tags (label_weighted)."""
    valid = tf.cast(tags >= 0, tf.float32)
    if table is None:
        return valid
    w = tf.gather(table, tf.maximum(tags, 0)) * valid
    return tf.math.divide_no_nan(w, tf.reduce_sum(w, axis=1, keepdims=True))
