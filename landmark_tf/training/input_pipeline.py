"""TFRecord shards -> per-replica batches for `strategy.distribute_datasets_from_function`.

Every replica of the run reads its own stream of records (its own shards, interleaved in
parallel: stream_files), and each host builds the streams of the replicas it feeds; batches
have the per-replica size and static shapes (`drop_remainder=True`):
  {"image": uint8[b, S, S, 3], "label": int32[b], "weight": float32[b],
   "flip": bool[b]}   # images to mirror; the train step applies it (step_math.prepare_images)
(tag heads, `tag_width` T > 0: "label" int32[b, T] title tags padded with -1, "weight"
float32[b, T]; see tag_targets).
Images cross host -> device as uint8 (`infeed_dtype`), a quarter of float32's bytes (403 MB ->
101 MB per step at 128 x 512^2); the resized pixels are rounded to integers on the host and the
step casts them to float32 on the device. infeed_dtype="float32" keeps the unrounded floats.

Data order is a pure function of (seed, number of replicas, step), which is how training
resumes step-exactly, and it does not depend on how the replicas are spread over hosts:
training is cut into epochs of `steps_per_epoch` steps; in epoch e each stream reads its files
in an order shuffled with seed (seed, stream, e), interleaving 16 at a time, permutes blocks of
`shuffle_buffer` serialized records with seeds from (seed, stream, e) (when resampling
classes, the resampler's windows of that size are the shuffle, with a record's copies spread),
and takes exactly steps_per_epoch * per-replica batch records (passing over the files again if
resampling came up short). Stream 0 is what a one-replica run reads. With `batch_classes` =
K > 0 each window is then regrouped into runs of K records of
one class in a random order (sampling.class_groups), so every per-replica batch of B = P * K
examples is P classes x K images, for pair losses (n-pairs). Resuming at step s rebuilds
epoch s // steps_per_epoch and skips the records of its first s % steps_per_epoch steps
*before* parsing and decoding, so a resume costs reading, not decoding, at most one epoch of
records. Augmentation draws are stateless functions of (seed, stream, e, position in epoch) of
each example. Batches never straddle epochs. Memory: each stream holds its own shuffle
window, so a host feeding 8 replicas holds 8 windows of `shuffle_buffer` records.

Evaluation reads the files in listed order without shuffling and pads with label -1 / weight 0
examples up to a fixed number of steps, so every host runs the same number of steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from landmark_tf.errors import UserError
from landmark_tf.modeling import losses
from landmark_tf.training import augment, sampling, tag_targets

AUTOTUNE = tf.data.AUTOTUNE
_MAX_CYCLE = 16  # files read at once per host
_READ_BUFFER = 8 << 20  # bytes of read-ahead per file (GCS likes large reads)
_FOREVER = 2**62


@dataclasses.dataclass(frozen=True)
class TrainInput:
    """What the training pipeline reads and how.

    `repeat_factors` (float32[C], see sampling.repeat_factors) is None for uniform sampling;
    `class_weights` (float32[C], see losses.class_weights) is None for unweighted loss.
    """

    files: tuple[str, ...]
    image_size: int
    global_batch_size: int
    steps_per_epoch: int
    seed: int = 0
    start_step: int = 0
    shuffle_buffer: int = 4096
    augment: tuple[str, ...] = ("flip",)
    repeat_factors: np.ndarray | None = dataclasses.field(default=None, compare=False)
    class_weights: np.ndarray | None = dataclasses.field(default=None, compare=False)
    not_clean_weight: float = 1.0
    infeed_dtype: str = "uint8"
    # > 0: each per-replica batch is batch_classes-image groups of one class each (P x K
    # sampling, sampling.class_groups); 0: the i.i.d. stream.
    batch_classes: int = 0
    # > 0: tag pretraining (tag_targets): "label" is int32 [b, tag_width] title tags, -1
    # padded, and "weight" float32 [b, tag_width]; tag_weights float32 [V] or None (all 1).
    tag_width: int = 0
    tag_weights: np.ndarray | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class EvalInput:
    """A deterministic pass over `files`, padded to `num_steps` global batches."""

    files: tuple[str, ...]
    image_size: int
    global_batch_size: int
    num_steps: int
    infeed_dtype: str = "uint8"


def to_infeed(image: tf.Tensor, dtype: str) -> tf.Tensor:
    """float32 0..255 pixels -> the infeed dtype (uint8: rounded to the nearest integer)."""
    if dtype == "float32":
        return image
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def host_files(files: tuple[str, ...], ctx: tf.distribute.InputContext) -> list[str]:
    """This host's share of the shards (every num_input_pipelines-th file)."""
    mine = list(files[ctx.input_pipeline_id :: ctx.num_input_pipelines])
    if not mine:
        raise UserError(
            f"{len(files)} shard(s) cannot feed {ctx.num_input_pipelines} hosts: "
            "write at least one shard per host"
        )
    return mine


def _host_batch(global_batch: int, ctx: tf.distribute.InputContext) -> tuple[int, int]:
    """(per-replica batch, examples this host consumes per step)."""
    per_replica = ctx.get_per_replica_batch_size(global_batch)
    replicas_here = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    return per_replica, per_replica * replicas_here


def check_batch_classes(micro_batch: int, batch_classes: int) -> None:
    """UserError unless a (micro-)batch of `micro_batch` examples splits into whole groups of
    `batch_classes` (0: no grouping, always fine)."""
    if batch_classes and micro_batch % batch_classes:
        raise UserError(
            f"--batch_classes={batch_classes} needs a per-replica (micro-)batch that is a "
            f"multiple of it, got {micro_batch} (--batch_size / replicas / --grad_accum_steps)"
            "; change --batch_size or --batch_classes")


def _read(files: tf.Tensor, cycle: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER),
        cycle_length=cycle,
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )


def shuffle_blocks(ds: tf.data.Dataset, size: int, seed: tf.Tensor) -> tf.data.Dataset:
    """Uniform random permutation of each block of `size` consecutive elements.

    Used instead of `Dataset.shuffle`, whose seed must be a Python int once a global seed is
    set (it compares the seed pair in Python); here every block's permutation is a stateless
    function of (seed, block index). Memory: one block of serialized records.
    """

    def permute(index: tf.Tensor, block: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.stateless_shuffle(block, seed=_fold(seed, index))

    # The prefetch assembles the next block while the current one is consumed.
    blocks = ds.batch(size).enumerate().map(permute, num_parallel_calls=AUTOTUNE)
    return blocks.prefetch(1).unbatch()


_fold = augment.fold


def stream_files(files: tuple[str, ...], stream: int, streams: int) -> tuple[list[str], bool]:
    """Replica stream `stream`'s shards, and whether it also keeps only every `streams`-th
    record: with at least as many shards as streams each stream reads its own (every
    streams-th file); with fewer, every stream reads all files in one shared order and keeps
    its records by position, so the streams stay disjoint and together all records."""
    if len(files) >= streams:
        return list(files[stream::streams]), False
    return list(files), True


def replica_ids(ctx: tf.distribute.InputContext) -> range:
    """The replicas this host feeds: a contiguous block of num_replicas / num_hosts."""
    local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    return range(ctx.input_pipeline_id * local, (ctx.input_pipeline_id + 1) * local)


def _stream_seed(base: tf.Tensor, stream: int) -> tf.Tensor:
    # Stream 0 draws exactly what a one-replica run draws.
    return base if stream == 0 else _fold(base, 0x57EA0000 + stream)


def _epoch_records(files: list[str], order_seed: tf.Tensor, epoch_seed: tf.Tensor,
                   spec: TrainInput, keep: tuple[int, int] | None) -> tf.data.Dataset:
    """Endless serialized records for one epoch of one stream: passes over the files, each in
    an order from `order_seed` and shuffled with `epoch_seed`; `keep` (stream, streams) takes
    every streams-th record of the read order (stream_files)."""
    names = tf.constant(files)
    cycle = min(len(files), _MAX_CYCLE)

    def one_pass(p: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(names, seed=_fold(order_seed, p))
        read = _read(order, cycle)
        if keep is not None:
            read = read.shard(keep[1], keep[0])
        s = _fold(epoch_seed, p)
        if spec.repeat_factors is None:
            if spec.batch_classes:  # class_groups shuffles its windows itself
                recs = read
            else:
                return shuffle_blocks(read, spec.shuffle_buffer, _fold(s, 2))
        else:
            # Resampling shuffles each window of shuffle_buffer records itself, spreading copies.
            recs = sampling.resample(read, spec.repeat_factors, _fold(s, 1), spec.shuffle_buffer)
        if not spec.batch_classes:
            return recs
        # Every pass is whole groups of batch_classes records, and the epoch's take and the
        # resume's skip are whole per-replica batches (multiples of batch_classes), so groups
        # stay in one replica's batch.
        return sampling.class_groups(recs, spec.batch_classes, _fold(s, 3), spec.shuffle_buffer)

    return tf.data.Dataset.range(_FOREVER).flat_map(one_pass)


def train_dataset(spec: TrainInput, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """This host's endless per-replica training batches from global step `spec.start_step`.

    Every replica r of the run reads its own stream (stream_files(files, r, replicas)), so the
    data a replica sees depends on the number of replicas, never on how they are spread over
    hosts: 1 host x 2 devices and 2 hosts x 1 device train on the same batches. The host
    yields its replicas' batches in turn (replica_ids): step t's batch of its i-th replica is
    element t * len(replica_ids) + i, the order tf.distribute hands batches to local replicas.
    """
    per_replica = ctx.get_per_replica_batch_size(spec.global_batch_size)
    check_batch_classes(per_replica, spec.batch_classes)
    streams = [_replica_stream(spec, r, ctx.num_replicas_in_sync, per_replica)
               for r in replica_ids(ctx)]
    ds = streams[0] if len(streams) == 1 else tf.data.Dataset.choose_from_datasets(
        streams, tf.data.Dataset.range(len(streams)).repeat())
    return _finish(ds)


def _replica_stream(spec: TrainInput, stream: int, streams: int,
                    per_replica: int) -> tf.data.Dataset:
    """Replica `stream`'s endless batches of `per_replica` examples."""
    files, by_record = stream_files(spec.files, stream, streams)
    keep = (stream, streams) if by_record else None
    start_epoch, start_offset = divmod(spec.start_step, spec.steps_per_epoch)
    shared = tf.constant([spec.seed, 0x5EED], tf.int64)
    base = _stream_seed(shared, stream)
    table = tf.constant(
        spec.class_weights if spec.class_weights is not None else [1.0], tf.float32
    )
    weighted = spec.class_weights is not None
    tag_table = (None if spec.tag_weights is None
                 else tf.constant(spec.tag_weights, tf.float32))
    crop = "crop" in spec.augment

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        # Streams that share files must read them in one order (stream_files).
        order = _fold(shared if by_record else base, e)
        recs = _epoch_records(files, order, _fold(base, e), spec, keep)
        recs = recs.take(spec.steps_per_epoch * per_replica)
        skip = tf.where(e == start_epoch, start_offset * per_replica, 0)
        epochs = tf.data.Dataset.from_tensors(e).repeat()
        return tf.data.Dataset.zip((epochs, recs.enumerate().skip(tf.cast(skip, tf.int64))))

    def decode(e: tf.Tensor, indexed: tuple) -> dict[str, tf.Tensor]:
        index, serialized = indexed
        crop_seed = augment.fold(_fold(base, e), index) if crop else None
        image, label, clean = augment.decode_example(serialized, spec.image_size, crop, crop_seed)
        if "color" not in spec.augment:  # else rounded once, after colour (finish_batch)
            image = to_infeed(image, spec.infeed_dtype)
        # (stream, epoch, index in epoch) names each example the same way after a resume, and
        # on any spread of the replicas over hosts.
        draws = augment.example_draws(augment.fold(_fold(base, e), index))
        if "flip" not in spec.augment:
            draws["flip"] = tf.zeros_like(draws["flip"])
        out = {"image": image, "label": label, "clean": clean, **draws}
        if spec.tag_width:
            out["tags"] = tag_targets.parse_tags(serialized, spec.tag_width)
        return out

    def finish_batch(b: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = b["image"]
        if "color" in spec.augment:
            image = to_infeed(augment.color_batch(image, b["delta"], b["factor"]),
                              spec.infeed_dtype)
        index = b["label"] if weighted else tf.zeros_like(b["label"])
        if spec.tag_width:
            w = tag_targets.tag_weights(b["tags"], tag_table)
            return {"image": image, "label": b["tags"], "weight": w, "flip": b["flip"]}
        w = losses.example_weights(index, b["clean"], table, spec.not_clean_weight)
        return {"image": image, "label": b["label"], "weight": w, "flip": b["flip"]}

    ds = tf.data.Dataset.range(start_epoch, _FOREVER).flat_map(epoch)
    # Serialized records read ahead in the background: a new epoch or shuffle block must be
    # read whole before its first record comes out, which would otherwise stall decoding.
    ds = ds.prefetch(spec.shuffle_buffer)
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(per_replica, drop_remainder=True)
    return ds.map(finish_batch, num_parallel_calls=AUTOTUNE, deterministic=True)


def eval_dataset(spec: EvalInput, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """This host's `num_steps` eval batches in file order; padding has label -1 and weight 0."""
    files = host_files(spec.files, ctx)
    per_replica, host_batch = _host_batch(spec.global_batch_size, ctx)

    def decode(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        image, label, _ = augment.decode_example(serialized, spec.image_size)
        return {"image": to_infeed(image, spec.infeed_dtype), "label": label,
                "weight": tf.cast(label >= 0, tf.float32)}

    pad = {
        "image": tf.zeros([spec.image_size, spec.image_size, 3], spec.infeed_dtype),
        "label": tf.constant(-1, tf.int32),
        "weight": tf.constant(0.0, tf.float32),
    }
    real = _read(tf.constant(files), min(len(files), _MAX_CYCLE))
    real = real.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = real.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(spec.num_steps * host_batch)
    return _finish(ds.batch(per_replica, drop_remainder=True))


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(AUTOTUNE)


def distribute(strategy: tf.distribute.Strategy, spec: TrainInput | EvalInput):
    """The distributed dataset of `spec` (each host builds its own pipeline)."""
    fn = train_dataset if isinstance(spec, TrainInput) else eval_dataset
    return strategy.distribute_datasets_from_function(lambda ctx: fn(spec, ctx))
