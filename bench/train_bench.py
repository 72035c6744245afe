"""landmark-train's step and input pipeline against bare TensorFlow, measured side by side.

  .venv/bin/python bench/train_bench.py [--image_size 128] [--batch 16] [--steps 20]

1. Train step: `tf_step.make_train_step` run through `distribute.multi_step_function` (what
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

--backend jax: the JAX trainer's jit-compiled stateless step (training/jax_step.py, data
parallel over all local devices) on synthetic in-memory batches. It needs only jax, keras and
numpy (no TensorFlow, no records), so a GPU host without TensorFlow measures e.g.
  KERAS_BACKEND=jax python bench/train_bench.py --backend jax --image_size 512 --batch 32 \
      --backbones efficientnet-b0,efficientnet-b3,efficientnet-b7
--backend both: the TF train step (as in 1., "ours") in this process and the JAX step in a
KERAS_BACKEND=jax subprocess on the same model, batch and weights-initialisation seed; prints
both images/s and the ratio jax/tensorflow (the backend is fixed per process, so the two run one
after the other, not interleaved).

--parts trainer (with --backend tensorflow, jax or both): landmark-train's trainer of the
process's backend (tf_trainer.TFTrainer / jax_trainer.JaxTrainer: `train(n)` as the training
loop calls it, with its per-step host work, device transfer and metrics) fed one in-memory batch,
vs a bare step of the same model and batch (TF: a tf.function; JAX: one jax.jit of forward,
float32 cross-entropy, gradient and the same SGD update, the batch already on the device),
alternating over --rounds. Target: trainer >= 0.9x bare. Also the number of compilations of the
trainer's step over the whole run (1 = no recompilation).
--parts ops: where XLA:CPU loses to TensorFlow's oneDNN kernels. One process runs each of
EfficientNet's convolution kinds (3x3 depthwise, 1x1 pointwise, 3x3 dense), forward + gradients,
as a jax.jit and as a tf.function, on the same shapes, alternating; ratio jax/tensorflow per op.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# TensorFlow, PIL and Keras load inside the functions: --backend jax must run without
# TensorFlow, and Keras must see KERAS_BACKEND before its first import.


def write_records(folder: str, count: int, shards: int, classes: int) -> list[str]:
    """`count` random-content 320x240 JPEGs (about GLDv2's resized size), spread over shards."""
    import tensorflow as tf
    from PIL import Image

    from landmark_tf.data import records

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
    import keras
    import tensorflow as tf

    from landmark_tf.config import ModelConfig
    from landmark_tf.modeling import model
    from landmark_tf.training import distribute, tf_step

    cfg = ModelConfig(backbone=args.backbones.split(",")[0], image_size=args.image_size,
                      embedding_dim=512, num_classes=args.classes)
    models = model.build_models(cfg)
    net, variables = models.train_model, models.train_model.trainable_variables
    batch = {"image": tf.random.uniform([args.batch, args.image_size, args.image_size, 3], 0, 255),
             "label": tf.range(args.batch, dtype=tf.int32) % args.classes,
             "weight": tf.ones([args.batch])}
    our_opt = keras.optimizers.SGD(0.01, momentum=0.9)
    our_opt.build(variables)
    bare = _bare_tf_step(net, batch)

    strategy = tf.distribute.get_strategy()
    replica_fn = tf_step.make_train_step(models, our_opt, global_batch=args.batch, replicas=1,
                                            accum_steps=1, jit=False)
    ours = distribute.multi_step_function(strategy, replica_fn, tf_step.TRAIN_KEYS)
    data = strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors(batch).repeat())
    iterator = iter(data)
    n = tf.constant(args.steps_per_execution)
    executions = max(args.steps // args.steps_per_execution, 1)
    contenders = {
        "bare": (lambda: bare(1), args.steps),
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
    import tensorflow as tf

    from landmark_tf import preprocess
    from landmark_tf.data import records
    from landmark_tf.training import input_pipeline

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
    import tensorflow as tf

    from landmark_tf.training import input_pipeline

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


def bench_jax(args) -> dict:
    """images/s of the JAX train step per backbone on one synthetic in-memory batch."""
    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("--backend jax needs KERAS_BACKEND=jax")
    from landmark_tf.config import ModelConfig
    from landmark_tf.modeling import model
    from landmark_tf.training import jax_step

    devices = jax.devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
    keras.distribution.set_distribution(keras.distribution.DataParallel(device_mesh=mesh))
    if args.mixed_precision != "float32":
        keras.mixed_precision.set_global_policy(f"mixed_{args.mixed_precision}")
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("batch",)),
                                          jax.sharding.PartitionSpec("batch"))
    rng = np.random.default_rng(0)
    size = args.image_size
    batch = {"image": rng.uniform(0, 255, (args.batch, size, size, 3)).astype(np.float32),
             "label": (np.arange(args.batch) % args.classes).astype(np.int32),
             "weight": np.ones(args.batch, np.float32)}
    batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    out = {"jax_devices": f"{len(devices)} x {devices[0].device_kind}"}
    for backbone in args.backbones.split(","):
        keras.utils.set_random_seed(0)
        cfg = ModelConfig(backbone=backbone, image_size=size, embedding_dim=512,
                          num_classes=args.classes)
        net = model.build_models(cfg).train_model
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(net.trainable_variables)
        step = jax.jit(jax_step.make_train_step(net, optimizer, global_batch=args.batch,
                                                accum_steps=1), donate_argnums=(0,))
        state = ([v.value for v in net.trainable_variables],
                 [v.value for v in net.non_trainable_variables],
                 [v.value for v in optimizer.variables])
        start = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])
        compile_s = time.perf_counter() - start
        rates = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, batch)
            float(metrics["loss"])  # waits for the asynchronous steps
            rates.append(args.steps * args.batch / (time.perf_counter() - start))
        out[f"jax_{backbone}_images_per_second"] = statistics.median(rates)
        out[f"jax_{backbone}_first_step_seconds"] = compile_s
        del state, net, optimizer
    return out


def _trainer_batch(args) -> dict[str, np.ndarray]:
    """One global batch as the input pipeline delivers it (uint8 images, host-drawn flips)."""
    rng = np.random.default_rng(0)
    size = args.image_size
    return {"image": rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8),
            "label": (np.arange(args.batch) % args.classes).astype(np.int32),
            "weight": np.ones(args.batch, np.float32),
            "flip": rng.random(args.batch) < 0.5}


def _alternate(contenders: dict, rounds: int) -> dict[str, list]:
    """(wall, cpu) seconds per round for each contender (fn, repeats), order reversed every
    other round; each contender runs twice first (tracing, compilation, warm-up)."""
    for fn, _ in contenders.values():
        fn()
        fn()
    seconds = {k: [] for k in contenders}
    for r in range(rounds):
        order = list(contenders.items())
        for name, (fn, repeats) in order if r % 2 == 0 else order[::-1]:
            seconds[name].append(_timed(fn, repeats))
    return seconds


def bench_trainer(args) -> dict:
    """The backend's trainer (train(n) over an in-memory batch) vs a bare step, side by side."""
    import keras

    from landmark_tf.config import ModelConfig, TrainConfig
    from landmark_tf.modeling import model

    backend = keras.backend.backend()
    model_cfg = ModelConfig(backbone=args.backbones.split(",")[0], image_size=args.image_size,
                            embedding_dim=512, num_classes=args.classes)
    train_cfg = TrainConfig(batch_size=args.batch, backend=backend, mixed_precision="float32",
                            steps_per_execution=args.steps_per_execution)
    batch = _trainer_batch(args)
    if backend == "jax":
        from landmark_tf.training import jax_trainer

        class InMemory(jax_trainer.JaxTrainer):
            def train_batches(self, train_input):
                return iter(lambda: batch, None)
    else:
        import tensorflow as tf

        from landmark_tf.training import tf_trainer

        class InMemory(tf_trainer.TFTrainer):
            def train_batches(self, train_input):
                return self.strategy.distribute_datasets_from_function(
                    lambda ctx: tf.data.Dataset.from_tensors(batch).repeat())
    trainer = InMemory(train_cfg)
    with trainer.placement():
        models = model.build_models(model_cfg)
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(models.train_model.trainable_variables)
    trainer.start(models, optimizer, 0, None, None, [])
    bare = (_bare_jax_step if backend == "jax" else _bare_tf_step)(models.train_model, batch)
    n = args.steps_per_execution
    executions = max(args.steps // n, 1)
    contenders = {"bare": (functools.partial(bare, n), executions),
                  "trainer": (lambda: trainer.train(n, lambda: False), executions)}
    seconds = _alternate(contenders, args.rounds)
    images = {k: executions * n * args.batch for k in contenders}
    out = _summary(f"trainer_{backend}", images, seconds, pair=("trainer", "bare"))
    out[f"trainer_{backend}_step_compilations"] = trainer.compilations()
    trainer.close()
    return out


def _bare_tf_step(net, batch):
    """run(n): n calls of a plain tf.function train step of `net` (own SGD); the last loss."""
    import keras
    import tensorflow as tf

    variables = net.trainable_variables
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    opt.build(variables)
    image, label = tf.cast(batch["image"], tf.float32), tf.constant(batch["label"])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = net({"image": image, "label": label}, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                label, tf.cast(logits, tf.float32)))
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    def run(n: int) -> float:
        for _ in range(n):
            loss = step()
        return float(loss)

    return run


def _bare_jax_step(net, batch):
    """run(n): n steps of one jax.jit of forward, float32 cross-entropy, gradient and SGD
    (Keras's, stateless) on a batch already on the device; reading the last loss waits for
    them, as the trainer's train(n) does."""
    import jax
    import jax.numpy as jnp
    import keras

    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    opt.build(net.trainable_variables)
    image = jax.device_put(batch["image"].astype(np.float32))
    label = jax.device_put(batch["label"])

    def loss_fn(trainable, non_trainable):
        logits, non_trainable = net.stateless_call(
            trainable, non_trainable, {"image": image, "label": label}, training=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, label[:, None], axis=1)), non_trainable

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable)
        trainable, opt_vars = opt.stateless_apply(opt_vars, grads, trainable)
        return (trainable, non_trainable, opt_vars), loss

    # Copies: the step donates its state, and the trainer's holds the variables' own buffers.
    state = [[jnp.array(v.value) for v in group] for group in
             (net.trainable_variables, net.non_trainable_variables, opt.variables)]

    def run(n: int) -> float:
        for _ in range(n):
            state[:], loss = step(tuple(state))
        return float(loss)

    return run


def bench_ops(args) -> dict:
    """EfficientNet's convolution kinds, forward + gradients, jax.jit vs tf.function."""
    import jax
    import tensorflow as tf

    size, b = args.image_size // 2, args.batch  # the stem's stride: the first blocks' maps
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, size, size, 96)).astype(np.float32)
    shapes = {"depthwise3x3": (3, 3, 1, 96), "pointwise1x1": (1, 1, 96, 24),
              "dense3x3": (3, 3, 96, 96)}
    out = {}
    for op, wshape in shapes.items():
        w = (rng.standard_normal(wshape) * 0.1).astype(np.float32)
        groups = 96 if op == "depthwise3x3" else 1

        def jax_loss(x, w, groups=groups):
            y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return (y * y).sum()

        jax_grad = jax.jit(jax.grad(jax_loss, argnums=(0, 1)))
        jx, jw = jax.device_put(x), jax.device_put(w)
        tx, tw = tf.constant(x), tf.constant(np.transpose(w, (0, 1, 3, 2)) if groups > 1 else w)

        @tf.function
        def tf_grad(x, w, depthwise=groups > 1):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = (tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME") if depthwise
                     else tf.nn.conv2d(x, w, 1, "SAME"))
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, w])

        contenders = {
            "jax": (functools.partial(lambda f, *a: jax.block_until_ready(f(*a)),
                                      jax_grad, jx, jw), args.steps),
            "tensorflow": (functools.partial(lambda f, *a: [g.numpy() for g in f(*a)],
                                             tf_grad, tx, tw), args.steps),
        }
        seconds = _alternate(contenders, args.rounds)
        images = {k: args.steps * b for k in contenders}
        out.update(_summary(f"ops_{op}", images, seconds, pair=("jax", "tensorflow")))
    return out


def bench_both(args) -> dict:
    """TF parts here, the JAX parts (step, trainer) in a KERAS_BACKEND=jax subprocess; with
    "step", the ratio of the two steps."""
    parts = args.parts.split(",")
    result = run_parts(args, parts)
    jax_parts = [p for p in parts if p in JAX_PARTS]
    if jax_parts:
        argv = [sys.executable, os.path.abspath(__file__), "--backend", "jax", "--parts",
                ",".join(jax_parts), "--backbones", args.backbones.split(",")[0],
                *_shared_args(args)]
        proc = subprocess.run(argv, env={**os.environ, "KERAS_BACKEND": "jax"},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        jax_result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update({k: v for k, v in jax_result.items() if k.startswith(("jax_", "trainer_"))})
    if "step" in parts:
        backbone = args.backbones.split(",")[0]
        result["jax_over_tensorflow_wall"] = (result[f"jax_{backbone}_images_per_second"]
                                              / result["step_ours_images_per_wall_second"])
    return result


TF_PARTS = ("pipeline", "step", "infeed", "trainer", "ops")
JAX_PARTS = ("step", "trainer")


def run_parts(args, parts: list[str]) -> dict:
    """The parts this process's backend measures (step under JAX is bench_jax's sweep)."""
    allowed = JAX_PARTS if args.backend == "jax" else TF_PARTS
    unknown = set(parts) - set(allowed)
    if unknown:
        raise SystemExit(f"--parts {sorted(unknown)}: --backend {args.backend} measures "
                         f"{', '.join(allowed)}")
    result = {}
    if args.backend == "jax":
        if "step" in parts:
            result.update(bench_jax(args))
        if "trainer" in parts:
            result.update(bench_trainer(args))
        return result
    if {"pipeline", "infeed"} & set(parts):
        with tempfile.TemporaryDirectory() as folder:
            files = write_records(folder, args.records, shards=8, classes=args.classes)
            if "pipeline" in parts:
                result.update(bench_pipeline(args, files))
            if "infeed" in parts:
                result.update(bench_infeed(args, files))
    if "step" in parts:
        result.update(bench_step(args))
    if "trainer" in parts:
        result.update(bench_trainer(args))
    if "ops" in parts:
        result.update(bench_ops(args))
    return result


def _shared_args(args) -> list[str]:
    names = ("image_size", "batch", "steps", "steps_per_execution", "classes", "rounds",
             "mixed_precision")
    return [x for n in names for x in (f"--{n}", str(getattr(args, n)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tensorflow",
                        choices=("tensorflow", "jax", "both"))
    parser.add_argument("--backbones", default="efficientnet-b0",
                        help="comma list (jax: each measured; tensorflow/both: the first)")
    parser.add_argument("--mixed_precision", default="float32",
                        choices=("float32", "bfloat16", "float16"), help="jax only")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="train steps per timed round")
    parser.add_argument("--steps_per_execution", type=int, default=4)
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default=None, help=f"comma list: tensorflow/both "
                        f"{','.join(TF_PARTS)} (default pipeline,step); jax "
                        f"{','.join(JAX_PARTS)} (default step)")
    args = parser.parse_args()
    if args.parts is None:
        args.parts = "step" if args.backend != "tensorflow" else "pipeline,step"
    os.environ["KERAS_BACKEND"] = "jax" if args.backend == "jax" else "tensorflow"
    import keras

    keras.utils.set_random_seed(0)
    result = {**vars(args), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    parts = args.parts.split(",")
    result.update(bench_both(args) if args.backend == "both" else run_parts(args, parts))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
