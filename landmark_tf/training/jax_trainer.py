"""The JAX backend trainer (Keras 3 on JAX): `landmark-train --backend=jax`, for TPU runtimes
without TensorFlow (Colab's since 2025, Kaggle's v5e-8, newer Cloud TPU generations) and
JAX-only GPU hosts.

Weights are replicated and the batch sharded over all devices by
`keras.distribution.DataParallel` (TPU cores, GPUs, CPU devices), of every process when several
train together (training/processes.py: each process feeds its own devices the streams of its
replicas, and the global batch is assembled from process-local data); the step is a jit-compiled
pure function of (state, batch) (jax_step) whose state lives as device arrays between steps and
is written back into the Keras variables (`sync`) for checkpoints and validation. tf.data stays
the host input pipeline; its batches reach the devices as NumPy.

steps_per_execution is the number of steps between two returns to the loop (logs, progress):
each step is its own jit call, dispatched asynchronously, without stacking n batches in device
memory. The next batch is put on the devices before the step that reads it is dispatched (flax's
prefetch_to_device pattern): its host->device copy overlaps the running step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import jax
import keras
import numpy as np
import tensorflow as tf

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.training import distribute, input_pipeline, jax_step
from landmark_tf.training.embedder import JaxEmbedder

# Batches on the devices at once (flax's prefetch_to_device size): the step's and the next.
PREFETCH = 2


def precision_policy(setting: str, kind: str) -> str:
    """auto: bfloat16 on TPU and GPU (no loss scaling needed), float32 on CPU."""
    if setting == "float16":
        raise UserError("--mixed_precision=float16 needs loss scaling, which the JAX trainer "
                        "does not do: use bfloat16 (or --backend=tensorflow)")
    if setting == "auto":
        setting = "bfloat16" if kind in ("tpu", "gpu") else "float32"
    return distribute.precision_policy(setting, kind)


class JaxTrainer:
    """trainer.BackendTrainer on JAX (data parallel over jax.devices())."""

    backend = "jax"

    def __init__(self, cfg: TrainConfig):
        if keras.backend.backend() != "jax":
            raise UserError(f"the JAX trainer needs KERAS_BACKEND=jax; Keras runs on "
                            f"{keras.backend.backend()}")
        # The host pipeline's TensorFlow must not take GPU memory from JAX (RuntimeError: TF's
        # devices are already initialised, as in a test process; harmless there).
        with contextlib.suppress(RuntimeError):
            tf.config.set_visible_devices([], "GPU")
        self.cfg = cfg
        # Each process's devices are one contiguous block of the batch axis, in the order of
        # input_pipeline.replica_ids, so process-local rows are its replicas' streams.
        self.devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.local_replicas = jax.local_device_count()
        platform = self.devices[0].platform
        self.kind = platform if platform in ("tpu", "gpu") else "cpu"
        self.replicas = len(self.devices)
        self.hosts = jax.process_count()
        self.chief = jax.process_index() == 0
        self.policy = precision_policy(cfg.mixed_precision, self.kind)
        self.jit = True
        self.steps_per_execution = cfg.steps_per_execution
        mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
        self.data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._step = 0

    def plan_accumulation(self, model_cfg: ModelConfig) -> TrainConfig:
        """cfg with grad_accum_steps=auto (0) resolved on these devices (jax_memory.plan over
        the device's memory; 1 on CPU, which has no fixed limit); prints the plan."""
        if self.kind == "cpu":
            print("--grad_accum_steps=auto: 1 on CPU (no device memory limit)", flush=True)
            self.cfg = dataclasses.replace(self.cfg, grad_accum_steps=1)
            return self.cfg
        from landmark_tf.training import jax_memory

        stats = self.devices[0].memory_stats() or {}
        if not stats.get("bytes_limit"):
            raise UserError(f"--grad_accum_steps=auto: {self.devices[0].device_kind} reports no "
                            "memory limit; give --grad_accum_steps=N")
        hbm_gib = stats["bytes_limit"] / jax_memory.GIB
        result = jax_memory.plan(jax_memory.StepCompiler(model_cfg, self.cfg, self.replicas),
                                 hbm_gib, f"{self.replicas} x {self.devices[0].device_kind}",
                                 self.devices[0].platform)
        print(result["message"], flush=True)
        if result["memory_check"] == "does not fit":
            raise UserError(result["message"])
        self.cfg = dataclasses.replace(self.cfg, grad_accum_steps=result["grad_accum_steps"])
        return self.cfg

    def check(self, model_cfg: ModelConfig) -> None:
        if model_cfg.neck == "dense_syncbn":
            raise UserError("--neck=dense_syncbn is TensorFlow's synchronised BatchNorm; under "
                            "JAX use --neck=dense_bn with --bn_statistics=global (the same "
                            "statistics)")

    @contextlib.contextmanager
    def placement(self):
        """keras.distribution.DataParallel over the devices while variables are created (and
        kept for the run: the step's sharding follows it)."""
        mesh = keras.distribution.DeviceMesh((self.replicas,), ["batch"], self.devices)
        self._previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(device_mesh=mesh))
        yield

    def set_step(self, step: int) -> None:
        self._step = int(step)

    @property
    def step(self) -> int:
        return self._step

    def _input_context(self) -> tf.distribute.InputContext:
        return tf.distribute.InputContext(num_input_pipelines=self.hosts,
                                          input_pipeline_id=jax.process_index(),
                                          num_replicas_in_sync=self.replicas)

    def _host_batches(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """The host's per-replica batches (its replicas in turn) -> one host batch per step:
        [local_replicas * b, ...], the rows of its devices in mesh order (to_device)."""
        n = self.local_replicas
        if n == 1:
            return ds
        merge = lambda b: {k: tf.reshape(v, [v.shape[0] * v.shape[1], *v.shape[2:]])
                           for k, v in b.items()}
        return ds.batch(n, drop_remainder=True).map(merge).prefetch(tf.data.AUTOTUNE)

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.data_sharding, v)
                for k, v in batch.items()}

    def train_batches(self, train_input) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of each global batch, as NumPy (input_pipeline's stream)."""
        return self._host_batches(input_pipeline.train_dataset(
            train_input, self._input_context())).as_numpy_iterator()

    def _device_batches(self, host: Iterator) -> Iterator[dict[str, jax.Array]]:
        """`host`'s batches on the devices, PREFETCH - 1 ahead of the one returned. Reading
        ahead does not move the resume point: a checkpoint records the step, and the input
        restarts from it."""
        queue = collections.deque()
        for batch in host:
            queue.append(self.to_device(batch))
            if len(queue) >= PREFETCH:
                yield queue.popleft()
        yield from queue

    def start(self, models, optimizer, start_step, train_input, eval_input,
              replica_mean) -> None:
        # replica_mean is done inside the step: batch_stats' per-replica BatchNorm already
        # moves the one copy of the moving statistics by the replicas' mean.
        del replica_mean
        if self.hosts > 1:
            from jax.experimental import multihost_utils

            # Each process found the latest checkpoint itself: a checkpoint written between
            # their looks would start them at different steps.
            multihost_utils.assert_equal(np.int64(start_step),
                                         "processes restored different checkpoints")
        self.models, self.optimizer = models, optimizer
        net = models.train_model
        self.state = self._read_variables()
        self._batches = self._device_batches(self.train_batches(train_input))
        self._train_step = jax.jit(jax_step.make_train_step(
            net, optimizer, global_batch=self.cfg.batch_size,
            accum_steps=self.cfg.grad_accum_steps, replicas=self.replicas), donate_argnums=(0,))
        self._eval = None
        if eval_input is not None:
            self._eval_dataset = self._host_batches(
                input_pipeline.eval_dataset(eval_input, self._input_context()))
            self._eval = jax.jit(jax_step.make_eval_step(models.eval_logits_model, net))

    def _read_variables(self):
        """The state, replicated on the step's mesh. The step's outputs are typed with that
        mesh; state typed otherwise (Keras's own placement) would compile the step a second
        time at the second call (minutes for a large backbone on a TPU)."""
        net = self.models.train_model
        return jax.device_put(([v.value for v in net.trainable_variables],
                               [v.value for v in net.non_trainable_variables],
                               [v.value for v in self.optimizer.variables]), self.replicated)

    def train(self, n: int, should_stop: Callable[[], bool]) -> dict[str, float]:
        totals = None
        for _ in range(int(n)):
            batch = next(self._batches)
            # Buffers of the old state are donated: state and step change together, and a
            # signal only sets the flag that should_stop reads.
            self.state, metrics = self._train_step(self.state, batch)
            self._step += 1
            totals = metrics if totals is None else jax.tree_util.tree_map(
                lambda a, b: a + b, totals, metrics)
            if should_stop():
                break
        return {k: float(v) for k, v in totals.items()}

    def compilations(self) -> int | None:
        cache_size = getattr(self._train_step, "_cache_size", None)  # a private jit API
        return cache_size() if cache_size else None

    def evaluate(self) -> dict[str, float] | None:
        if self._eval is None:
            return None
        totals = {"correct": 0.0, "count": 0.0}
        for batch in self._eval_dataset.as_numpy_iterator():
            out = self._eval(self.state, self.to_device(batch))
            totals = {k: totals[k] + out[k] for k in totals}
        return {k: float(v) for k, v in totals.items()}

    def sync(self) -> None:
        """Writes the jit state back into the Keras variables."""
        net = self.models.train_model
        trainable, non_trainable, opt_vars = self.state
        for group, values in ((net.trainable_variables, trainable),
                              (net.non_trainable_variables, non_trainable),
                              (self.optimizer.variables, opt_vars)):
            for v, value in zip(group, values, strict=True):
                v.assign(value)

    def learning_rate(self) -> float:
        # The Keras optimizer's iteration count is written back only by sync: ask the
        # schedule at the trainer's step (as TensorFlow's, read after the step).
        rate = self.optimizer._learning_rate
        value = rate(self._step) if callable(rate) else rate
        return float(keras.ops.convert_to_numpy(value))

    def embedder(self, sizes: list[int], batch_size: int) -> JaxEmbedder:
        net, part = self.models.train_model, self.models.embedding_model
        t_pick, n_pick = jax_step.subset_indices(net, part)

        def state():
            trainable, non_trainable, _ = self.state
            return [trainable[i] for i in t_pick], [non_trainable[i] for i in n_pick]

        return JaxEmbedder(part, state, self.to_device, sizes, batch_size, self.replicas)

    def close(self) -> None:
        """Restores the distribution that was set before `placement`."""
        keras.distribution.set_distribution(getattr(self, "_previous", None))
