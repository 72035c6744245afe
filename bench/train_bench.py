"""landmark-train's step and input pipeline against bare TensorFlow, measured side by side.

  .venv/bin/python bench/train_bench.py [--image_size 128] [--batch 16] [--steps 20]

1. Train step: `train_step.make_train_step` run through `distribute.multi_step_function` (what
   landmark-train executes) vs a bare `tf.function` doing forward, float32 cross-entropy,
   backward and the same SGD update on the same model and the same in-memory batch.
   Target: ours >= 0.9x the bare images/s (overhead at most 10%).
2. Input pipeline: `input_pipeline.train_dataset` (file-order shuffle, block shuffle, seeds,
   flip, weights) vs a bare TFRecordDataset -> parse -> decode -> resize -> batch loop over the
   same records with the same parallelism. Target: ours >= 0.9x the bare images/s.
3. Infeed dtype (--parts=infeed): `input_pipeline.train_dataset` producing uint8 batches (the
   default; the device casts) vs float32 batches, same records; also the bytes per batch that
   cross host -> device.
Contenders alternate over --rounds (order reversed every other round); reported are median
images/s and the median of the per-round ratios, by wall clock and by process CPU time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from landmark_tf import preprocess
from landmark_tf.config import ModelConfig
from landmark_tf.data import records
from landmark_tf.modeling import model
from landmark_tf.training import distribute, input_pipeline, train_step


def write_records(folder: str, count: int, shards: int, classes: int) -> list[str]:
    """`count` random-content 320x240 JPEGs (about GLDv2's resized size), spread over shards."""
    rng = np.random.default_rng(0)
    paths = [os.path.join(folder, records.shard_name("train", i, shards)) for i in range(shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i in range(count):
        low = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((320, 240), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        writers[i % shards].write(records.make_example(
            encoded=buf.getvalue(), image_id=f"{i:08x}", label=i % classes, landmark_id=i,
            height=240, width=320, is_clean=True))
    for w in writers:
        w.close()
    return paths


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all its threads) for `repeats` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(prefix: str, images: dict[str, int], seconds: dict[str, list],
             pair: tuple[str, str] = ("ours", "bare")) -> dict:
    """Median images/s per contender, and the median over rounds of the paired ratio
    pair[0]/pair[1], by wall clock and by CPU time (steadier when other jobs share the CPUs)."""
    out = {}
    for clock, i in (("wall", 0), ("cpu", 1)):
        rate = {k: [images[k] / t[i] for t in v] for k, v in seconds.items()}
        for k, v in rate.items():
            out[f"{prefix}_{k}_images_per_{clock}_second"] = statistics.median(v)
        out[f"{prefix}_ratio_{clock}"] = statistics.median(
            o / b for o, b in zip(rate[pair[0]], rate[pair[1]], strict=True))
    return out


def bench_step(args) -> dict:
    cfg = ModelConfig(image_size=args.image_size, embedding_dim=512, num_classes=args.classes)
    models = model.build_models(cfg)
    net, variables = models.train_model, models.train_model.trainable_variables
    batch = {"image": tf.random.uniform([args.batch, args.image_size, args.image_size, 3], 0, 255),
             "label": tf.range(args.batch, dtype=tf.int32) % args.classes,
             "weight": tf.ones([args.batch])}
    bare_opt, our_opt = (keras.optimizers.SGD(0.01, momentum=0.9) for _ in range(2))
    bare_opt.build(variables)
    our_opt.build(variables)

    @tf.function
    def bare(image, label):
        with tf.GradientTape() as tape:
            logits = net({"image": image, "label": label}, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                label, tf.cast(logits, tf.float32)))
        bare_opt.apply(tape.gradient(loss, variables), variables)
        return loss

    strategy = tf.distribute.get_strategy()
    replica_fn = train_step.make_train_step(models, our_opt, global_batch=args.batch, replicas=1,
                                            accum_steps=1, jit=False)
    ours = distribute.multi_step_function(strategy, replica_fn, train_step.TRAIN_KEYS)
    data = strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors(batch).repeat())
    iterator = iter(data)
    n = tf.constant(args.steps_per_execution)
    executions = max(args.steps // args.steps_per_execution, 1)
    contenders = {
        "bare": (lambda: float(bare(batch["image"], batch["label"])), args.steps),
        "ours": (lambda: float(ours(iterator, n)["loss"]), executions),
    }
    for fn, _ in contenders.values():  # trace and warm up
        fn()
        fn()
    images = {"bare": args.steps * args.batch,
              "ours": executions * args.steps_per_execution * args.batch}
    seconds = {k: [] for k in contenders}
    for r in range(args.rounds):
        order = list(contenders.items())
        for name, (fn, repeats) in order if r % 2 == 0 else order[::-1]:
            seconds[name].append(_timed(fn, repeats))
    return _summary("step", images, seconds)


def bench_pipeline(args, files: list[str]) -> dict:
    spec = input_pipeline.TrainInput(
        files=tuple(files), image_size=args.image_size, global_batch_size=args.batch,
        steps_per_epoch=args.records // args.batch, shuffle_buffer=1024, augment=("flip",))
    ours = input_pipeline.train_dataset(spec, tf.distribute.InputContext())

    def decode(serialized):
        ex = records.parse_example(serialized)
        image = tf.io.decode_jpeg(ex["image/encoded"], channels=3)
        return preprocess.resize_for_model(image, args.image_size), ex["image/class/label"]

    bare = (tf.data.Dataset.from_tensor_slices(files)
            .interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                        num_parallel_calls=tf.data.AUTOTUNE)
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(args.batch, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE))
    batches = args.records // args.batch
    seconds = {"bare": [], "ours": []}
    for r in range(args.rounds):
        order = (("bare", bare), ("ours", ours))
        for name, dataset in order if r % 2 == 0 else order[::-1]:
            # A fresh iterator per round, deleted after: no other pipeline's prefetch threads
            # compete with the one being timed.
            it = iter(dataset)
            for _ in range(batches // 2):  # warm up: fill buffers, let autotune settle
                next(it)
            seconds[name].append(_timed(lambda it=it: next(it), batches))
            del it
    images = {k: batches * args.batch for k in seconds}
    return _summary("pipeline", images, seconds)


def bench_infeed(args, files: list[str]) -> dict:
    """Our pipeline with uint8 vs float32 batches (what crosses host -> device)."""
    datasets = {}
    for dtype in ("uint8", "float32"):
        spec = input_pipeline.TrainInput(
            files=tuple(files), image_size=args.image_size, global_batch_size=args.batch,
            steps_per_epoch=args.records // args.batch, shuffle_buffer=1024, augment=("flip",),
            infeed_dtype=dtype)
        datasets[dtype] = input_pipeline.train_dataset(spec, tf.distribute.InputContext())
    batches = args.records // args.batch
    seconds = {k: [] for k in datasets}
    for r in range(args.rounds):
        order = list(datasets.items())
        for name, dataset in order if r % 2 == 0 else order[::-1]:
            it = iter(dataset)
            for _ in range(batches // 2):
                next(it)
            seconds[name].append(_timed(lambda it=it: next(it), batches))
            del it
    images = {k: batches * args.batch for k in seconds}
    out = _summary("infeed", images, seconds, pair=("uint8", "float32"))
    for name, dataset in datasets.items():
        image = dataset.element_spec["image"]
        out[f"infeed_{name}_bytes_per_batch"] = image.shape.num_elements() * image.dtype.size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="train steps per timed round")
    parser.add_argument("--steps_per_execution", type=int, default=4)
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default="pipeline,step", help="what to measure")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        files = write_records(folder, args.records, shards=8, classes=args.classes)
        parts = args.parts.split(",")
        result = {**vars(args), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
        if "pipeline" in parts:
            result.update(bench_pipeline(args, files))
        if "step" in parts:
            result.update(bench_step(args))
        if "infeed" in parts:
            result.update(bench_infeed(args, files))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
