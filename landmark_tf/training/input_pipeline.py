"""TFRecord shards -> per-replica batches for `strategy.distribute_datasets_from_function`.

Each host reads its own files (`InputContext.input_pipeline_id`), interleaved in parallel, and
emits batches of the per-replica size with static shapes (`drop_remainder=True`):
  {"image": uint8[b, S, S, 3], "label": int32[b], "weight": float32[b],
   "flip": bool[b]}   # images to mirror; the train step applies it (step_math.prepare_images)
Images cross host -> device as uint8 (`infeed_dtype`), a quarter of float32's bytes (403 MB ->
101 MB per step at 128 x 512^2); the resized pixels are rounded to integers on the host and the
step casts them to float32 on the device. infeed_dtype="float32" keeps the unrounded floats.

Data order is a pure function of (seed, step), which is how training resumes step-exactly:
training is cut into epochs of `steps_per_epoch` steps; epoch e reads the host's files in an
order shuffled with seed (seed, e), interleaving 16 at a time, permutes blocks of
`shuffle_buffer` serialized records with seeds from (seed, e) (when resampling classes, the
resampler's windows of that size are the shuffle, with a record's copies spread), and takes exactly
steps_per_epoch * host_batch records (passing over the files again if resampling came up
short). With `batch_classes` = K > 0 each window is then regrouped into runs of K records of
one class in a random order (sampling.class_groups), so every per-replica batch of B = P * K
examples is P classes x K images, for pair losses (n-pairs). Resuming at step s rebuilds
epoch s // steps_per_epoch and skips the records of its first s % steps_per_epoch steps
*before* parsing and decoding, so a resume costs reading, not decoding, at most one epoch of
records. Augmentation draws are stateless functions of
(seed, e, position in epoch) of each example, whatever the batch split. Batches never straddle
epochs.

Evaluation reads the files in listed order without shuffling and pads with label -1 / weight 0
examples up to a fixed number of steps, so every host runs the same number of steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from landmark_tf.errors import UserError
from landmark_tf.modeling import losses
from landmark_tf.training import augment, sampling

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


def _epoch_records(files: list[str], epoch_seed: tf.Tensor, spec: TrainInput) -> tf.data.Dataset:
    """Endless serialized records for one epoch: passes over the files, each freshly shuffled."""
    names = tf.constant(files)
    cycle = min(len(files), _MAX_CYCLE)

    def one_pass(p: tf.Tensor) -> tf.data.Dataset:
        s = _fold(epoch_seed, p)
        order = tf.random.experimental.stateless_shuffle(names, seed=s)
        if spec.repeat_factors is None:
            if spec.batch_classes:  # class_groups shuffles its windows itself
                recs = _read(order, cycle)
            else:
                return shuffle_blocks(_read(order, cycle), spec.shuffle_buffer, _fold(s, 2))
        else:
            # Resampling shuffles each window of shuffle_buffer records itself, spreading copies.
            recs = sampling.resample(_read(order, cycle), spec.repeat_factors, _fold(s, 1),
                                     spec.shuffle_buffer)
        if not spec.batch_classes:
            return recs
        # Every pass is whole groups of batch_classes records, and the epoch's take and the
        # resume's skip are whole per-replica batches (multiples of batch_classes), so groups
        # stay in one replica's batch.
        return sampling.class_groups(recs, spec.batch_classes, _fold(s, 3), spec.shuffle_buffer)

    return tf.data.Dataset.range(_FOREVER).flat_map(one_pass)


def train_dataset(spec: TrainInput, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    """This host's endless training batches, starting at global step `spec.start_step`."""
    files = host_files(spec.files, ctx)
    per_replica, host_batch = _host_batch(spec.global_batch_size, ctx)
    check_batch_classes(per_replica, spec.batch_classes)
    start_epoch, start_offset = divmod(spec.start_step, spec.steps_per_epoch)
    base = tf.constant([spec.seed, 0x5EED], tf.int64)
    table = tf.constant(
        spec.class_weights if spec.class_weights is not None else [1.0], tf.float32
    )
    weighted = spec.class_weights is not None
    crop = "crop" in spec.augment

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        recs = _epoch_records(files, _fold(base, e), spec).take(spec.steps_per_epoch * host_batch)
        skip = tf.where(e == start_epoch, start_offset * host_batch, 0)
        epochs = tf.data.Dataset.from_tensors(e).repeat()
        return tf.data.Dataset.zip((epochs, recs.enumerate().skip(tf.cast(skip, tf.int64))))

    def decode(e: tf.Tensor, indexed: tuple) -> dict[str, tf.Tensor]:
        index, serialized = indexed
        crop_seed = augment.fold(_fold(base, e), index) if crop else None
        image, label, clean = augment.decode_example(serialized, spec.image_size, crop, crop_seed)
        if "color" not in spec.augment:  # else rounded once, after colour (finish_batch)
            image = to_infeed(image, spec.infeed_dtype)
        # (epoch, index in epoch) names each example the same way after a resume, and on any
        # split of the global batch over replicas and hosts.
        draws = augment.example_draws(augment.fold(_fold(base, e), index))
        if "flip" not in spec.augment:
            draws["flip"] = tf.zeros_like(draws["flip"])
        return {"image": image, "label": label, "clean": clean, **draws}

    def finish_batch(b: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = b["image"]
        if "color" in spec.augment:
            image = to_infeed(augment.color_batch(image, b["delta"], b["factor"]),
                              spec.infeed_dtype)
        index = b["label"] if weighted else tf.zeros_like(b["label"])
        w = losses.example_weights(index, b["clean"], table, spec.not_clean_weight)
        return {"image": image, "label": b["label"], "weight": w, "flip": b["flip"]}

    ds = tf.data.Dataset.range(start_epoch, _FOREVER).flat_map(epoch)
    # Serialized records read ahead in the background: a new epoch or shuffle block must be
    # read whole before its first record comes out, which would otherwise stall decoding.
    ds = ds.prefetch(spec.shuffle_buffer)
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(per_replica, drop_remainder=True)
    return _finish(ds.map(finish_batch, num_parallel_calls=AUTOTUNE, deterministic=True))


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
