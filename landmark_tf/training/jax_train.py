"""The JAX trainer (Keras 3 on JAX): `landmark-train --backend=jax`, for TPU runtimes without
TensorFlow (Colab's since 2025, newer Cloud TPU generations) and JAX-only GPU hosts.

Shares with the TF trainer: the model code (keras.ops), the tf.data input pipeline on the host
(its batches handed to JAX as NumPy), the workdir layout, config.json, TensorBoard logs and the
closing JSON (train_loop.Loop), SIGTERM handling and step-exact resume. Differs in: weights
replicated and the batch sharded over all local devices by `keras.distribution.DataParallel`
(TPU cores, GPUs, CPU devices), a jit-compiled stateless step (jax_step), and checkpoints in the
backend-neutral npz format (modeling/npz_checkpoint) that the TensorFlow-backend export reads.

steps_per_execution here is the number of steps between two host synchronisations (logs,
progress): each step is its own jit call, dispatched asynchronously, so the host prepares the
next batch while the device computes, without stacking n batches in device memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from typing import Any

import jax
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.modeling import model, npz_checkpoint
from landmark_tf.training import (
    checkpointing,
    distribute,
    input_pipeline,
    jax_step,
    train_loop,
)
from landmark_tf.training import train as tf_train


def precision_policy(setting: str, kind: str) -> str:
    """auto: bfloat16 on TPU and GPU (no loss scaling needed), float32 on CPU."""
    if setting == "float16":
        raise UserError("--mixed_precision=float16 needs loss scaling, which the JAX trainer "
                        "does not do: use bfloat16 (or --backend=tensorflow)")
    if setting == "auto":
        setting = "bfloat16" if kind in ("tpu", "gpu") else "float32"
    return distribute.precision_policy(setting, kind)


def train(model_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) into cfg.workdir with Keras on JAX; returns the closing JSON dict."""
    if keras.backend.backend() != "jax":
        raise UserError(f"the JAX trainer needs KERAS_BACKEND=jax; Keras runs on "
                        f"{keras.backend.backend()}")
    # The host pipeline's TensorFlow must not take GPU memory from JAX (RuntimeError: TF's
    # devices are already initialised, as in a test process; harmless there).
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    plan = tf_train.make_plan(cfg)
    model_cfg = dataclasses.replace(model_cfg, num_classes=plan.num_classes).validate()
    previous = keras.mixed_precision.global_policy(), keras.distribution.distribution()
    try:
        return Trainer(model_cfg, cfg, plan).run()
    finally:
        keras.mixed_precision.set_global_policy(previous[0])
        keras.distribution.set_distribution(previous[1])


class _Step:
    """The step counter, read as the TF trainer's tf.Variable is (`.numpy()`)."""

    def __init__(self, value: int = 0):
        self.value = int(value)

    def numpy(self) -> int:
        return self.value


class _Manager:
    """Saves and prunes npz checkpoints (the interface train_loop.Loop uses)."""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.directory = os.path.join(trainer.cfg.workdir, model.CHECKPOINT_DIR)
        self.latest_checkpoint = npz_checkpoint.latest(self.directory)

    def save(self, checkpoint_number: int, options=None) -> str:
        """Writes ckpt-<n>.npz synchronously (`options`, TF's save options, do not apply)."""
        del options
        t = self.t
        t.sync_variables()
        path = npz_checkpoint.checkpoint_path(self.directory, checkpoint_number)
        if t.chief:
            parts = {p: getattr(t.models, p).variables for p in npz_checkpoint.PARTS}
            parts["optimizer"] = t.optimizer.variables
            meta = {"step": int(checkpoint_number), "backend": "jax",
                    "data_position": {"step": int(checkpoint_number), "seed": t.cfg.seed}}
            npz_checkpoint.save(path, parts, meta)
            for _, old in npz_checkpoint.list_checkpoints(self.directory)[:-t.cfg.keep_checkpoints]:
                tf.io.gfile.remove(old)
        self.latest_checkpoint = path
        return path


class _Loop(train_loop.Loop):
    def learning_rate(self) -> float:
        # The Keras optimizer's iteration count is synced only at checkpoints: ask the
        # schedule at the trainer's step (as the TF trainer's read after the step).
        rate = self.t.optimizer._learning_rate
        value = rate(self.t.step.value) if callable(rate) else rate
        return float(keras.ops.convert_to_numpy(value))


class _Synchronous:
    """The TF trainer's `checkpoint.sync()` (waits for an async save): npz saves are synchronous."""

    @staticmethod
    def sync() -> None:
        return None


class Trainer:
    """One JAX run: models, optimizer, state, pipelines; driven by train_loop.Loop."""

    backend = "jax"
    strategy = None  # no tf.distribute strategy: keras.distribution shards the batch
    checkpoint = _Synchronous()

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, plan: tf_train.Plan):
        self.cfg, self.plan = cfg, plan
        devices = jax.devices()
        self.kind = devices[0].platform if devices[0].platform in ("tpu", "gpu") else "cpu"
        self.replicas = len(devices)
        self.micro = distribute.per_replica_batch(cfg.batch_size, self.replicas,
                                                  cfg.grad_accum_steps)
        self.chief = jax.process_index() == 0
        config = checkpointing.workdir_config(model_cfg, cfg, plan.num_classes)
        checkpointing.check_and_write_config(cfg.workdir, config, self.chief)
        self._refuse_tf_checkpoints()
        self.policy = precision_policy(cfg.mixed_precision, self.kind)
        self.jit = True
        keras.mixed_precision.set_global_policy(self.policy)
        mesh = keras.distribution.DeviceMesh((self.replicas,), ["batch"], devices)
        keras.distribution.set_distribution(keras.distribution.DataParallel(device_mesh=mesh))
        self.data_sharding = jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.array(devices), ("batch",)), jax.sharding.PartitionSpec("batch"))
        keras.utils.set_random_seed(cfg.seed)
        self.models = model.build_models(model_cfg, cfg.pretrained_weights or None,
                                         class_counts=plan.class_counts)
        net = self.models.train_model
        tf_train.set_bn_momentum(net, cfg.bn_momentum)
        self.optimizer = tf_train.make_optimizer(cfg, plan.train_steps, net.trainable_variables,
                                                 self.policy)
        self.step = _Step()
        self.start_info = {"backend": "jax", **self._restore_or_init(),
                           **tf_train.report_head_memory(model_cfg)}
        self.start_step = self.step.value
        self.manager = _Manager(self)
        self.steps_per_execution = cfg.steps_per_execution
        self.state = self.read_variables()
        self._stop = False

    def _refuse_tf_checkpoints(self) -> None:
        index = os.path.join(self.cfg.workdir, model.CHECKPOINT_DIR, "checkpoint")
        if tf.io.gfile.exists(index):
            raise UserError(f"{self.cfg.workdir} holds TensorFlow checkpoints: resume it with "
                            "--backend=tensorflow, or start a JAX stage from it with --init_from")

    def _restore_or_init(self) -> dict[str, Any]:
        path = npz_checkpoint.latest(os.path.join(self.cfg.workdir, model.CHECKPOINT_DIR))
        if path:
            with npz_checkpoint.Reader(path) as reader:
                for part in npz_checkpoint.PARTS:
                    reader.restore(part, getattr(self.models, part).variables)
                reader.restore("optimizer", self.optimizer.variables)
                self.step.value = reader.step
            from landmark_tf.modeling import backbones

            backbones.refresh_normalization(self.models.backbone)
            return {"resumed_from": path}
        if self.cfg.init_from:
            return {"init_from": model.restore_for_stage(self.models, self.cfg.init_from)}
        return {}

    def read_variables(self):
        net = self.models.train_model
        return ([v.value for v in net.trainable_variables],
                [v.value for v in net.non_trainable_variables],
                [v.value for v in self.optimizer.variables])

    def sync_variables(self) -> None:
        """Writes the jit state back into the Keras variables (for checkpoints)."""
        net = self.models.train_model
        trainable, non_trainable, opt_vars = self.state
        for group, values in ((net.trainable_variables, trainable),
                              (net.non_trainable_variables, non_trainable),
                              (self.optimizer.variables, opt_vars)):
            for v, value in zip(group, values, strict=True):
                v.assign(value)

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.data_sharding, v)
                for k, v in batch.items()}

    def _input_context(self) -> tf.distribute.InputContext:
        # One "replica" per host: each host's pipeline yields its whole share of the global
        # batch, which to_device shards over its devices.
        n = jax.process_count()
        return tf.distribute.InputContext(num_input_pipelines=n,
                                          input_pipeline_id=jax.process_index(),
                                          num_replicas_in_sync=n)

    def train_function(self):
        cfg, plan = self.cfg, self.plan
        # The TF trainer's own spec: same sampling and loss weights (normalised after the
        # not-clean factor) under both backends.
        spec = tf_train.train_input(cfg, plan, self.models.config.image_size, self.start_step)
        batches = input_pipeline.train_dataset(spec, self._input_context()).as_numpy_iterator()
        step = jax.jit(jax_step.make_train_step(
            self.models.train_model, self.optimizer, global_batch=cfg.batch_size,
            accum_steps=cfg.grad_accum_steps), donate_argnums=(0,))

        def run(n) -> dict[str, float]:
            totals = None
            for _ in range(int(n)):
                batch = self.to_device(next(batches))
                # State and step change together; a signal only sets a flag (see run()).
                self.state, metrics = step(self.state, batch)
                self.step.value += 1
                totals = metrics if totals is None else jax.tree_util.tree_map(
                    lambda a, b: a + b, totals, metrics)
                if self._stop:
                    raise KeyboardInterrupt("signal")
            return {k: float(v) for k, v in totals.items()}

        return run

    def eval_function(self):
        if not self.plan.val_files:
            return None
        eval_batch = self.micro * self.replicas
        spare = 1 if jax.process_count() > 1 else 0
        steps = -(-self.plan.val_examples // eval_batch) + spare
        spec = input_pipeline.EvalInput(self.plan.val_files, self.models.config.image_size,
                                        eval_batch, steps)
        dataset = input_pipeline.eval_dataset(spec, self._input_context())
        step = jax.jit(jax_step.make_eval_step(self.models.eval_logits_model,
                                               self.models.train_model))

        def run() -> dict[str, float]:
            totals = {"correct": 0.0, "count": 0.0}
            for batch in dataset.as_numpy_iterator():
                out = step(self.state, self.to_device(batch))
                totals = {k: totals[k] + out[k] for k in totals}
            return {k: float(v) for k, v in totals.items()}

        return run

    def run(self) -> dict[str, Any]:
        """Trains to plan.train_steps; SIGTERM / Ctrl-C save a checkpoint, then re-raise.

        The signal handlers only set a flag, checked after each step: a KeyboardInterrupt
        raised between a jit call (whose input buffers are donated) and the state update
        would leave no valid state to save.
        """
        loop = _Loop(self)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            loop.run()
        except KeyboardInterrupt:
            loop.save(self.step.value)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return loop.result()

    def _on_signal(self, signum, frame) -> None:
        logging.warning("signal %d: saving a checkpoint after this step", signum)
        self._stop = True
