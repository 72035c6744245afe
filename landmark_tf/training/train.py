"""Training: a hand-written `strategy.run` loop inside a tf.function, not `Model.fit`.

Why: (1) step-exact resume — model, optimizer and a step counter form one tf.train.Checkpoint
and the data order is a function of (seed, step) (see input_pipeline), whereas fit's
BackupAndRestore resumes at epoch starts only; (2) steps_per_execution is our own `tf.range` loop
of `strategy.run` (the TF custom-loop pattern that TPUStrategy compiles), not Keras's multi-step
loop that breaks with several replicas (keras-team/keras#19246), and it is still probed
(distribute.multi_step_supported) with a fallback to 1; (3) gradient accumulation is a loop over
micro-batches inside the (XLA-compiled) step with one optimizer update; (4) the same loop runs on
CPU, GPUs and TPUs with TF 2.20 and 2.21.

`train(model_cfg, cfg)` returns the closing JSON dict: step, loss, accuracy, images_per_second,
learning_rate, val_accuracy (when a validation split exists), ...
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from landmark_tf import fileio
from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.data import records
from landmark_tf.errors import UserError
from landmark_tf.modeling import losses, model
from landmark_tf.training import (
    checkpointing,
    distribute,
    input_pipeline,
    sampling,
    train_loop,
    train_step,
)
from landmark_tf.training.schedules import WarmupSchedule


@dataclasses.dataclass
class Plan:
    """Facts about the data that fix the run: read from dataset_info.json."""

    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    val_examples: int
    num_classes: int
    class_counts: list[int]
    steps_per_epoch: int
    train_steps: int


def make_plan(cfg: TrainConfig) -> Plan:
    """Reads dataset_info.json of cfg.data_dir; UserError for anything that cannot train."""
    info = records.load_dataset_info(cfg.data_dir)
    num_classes = int(info["num_classes"])
    where = fileio.join(cfg.data_dir, records.DATASET_INFO)
    if num_classes < 2:
        raise UserError(f"{where}: num_classes is {num_classes}; training needs a labelled split")
    train_files = tuple(records.split_files(cfg.data_dir, info, cfg.train_split))
    split = info["splits"][cfg.train_split]
    counts = split.get("class_counts") or info.get("class_counts") or []
    if len(counts) != num_classes:
        raise UserError(f"{where}: {len(counts)} class_counts for {num_classes} classes")
    steps_per_epoch = int(split["examples"]) // cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"--batch_size {cfg.batch_size} exceeds the {split['examples']} "
                        f"examples of split '{cfg.train_split}'")
    train_steps = cfg.train_steps or math.ceil(cfg.epochs * steps_per_epoch)
    val_files, val_examples = (), 0
    val = info["splits"].get(cfg.val_split) if cfg.val_split else None
    if val and int(val.get("examples", 0)) > 0:
        val_files = tuple(records.split_files(cfg.data_dir, info, cfg.val_split))
        val_examples = int(val["examples"])
    return Plan(train_files, val_files, val_examples, num_classes, [int(c) for c in counts],
                steps_per_epoch, train_steps)


def make_optimizer(cfg: TrainConfig, train_steps: int, variables, policy: str):
    """SGD + momentum + decoupled weight decay (not on biases, norms, GeM p), lr schedule,
    loss scaling under float16. Call under the strategy scope."""
    schedule = WarmupSchedule(cfg.learning_rate, train_steps, cfg.warmup_steps, cfg.schedule)
    sgd = keras.optimizers.SGD(
        schedule, momentum=cfg.momentum, weight_decay=cfg.weight_decay or None
    )
    sgd.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
    optimizer = keras.optimizers.LossScaleOptimizer(sgd) if policy == "mixed_float16" else sgd
    optimizer.build(variables)
    return optimizer


def set_bn_momentum(net: keras.Model, momentum: float) -> None:
    """Sets the moving-statistics momentum of every BatchNormalization in `net` (not saved in
    checkpoints: a property of the run). Call before the train step is traced."""
    for layer in net._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def seed_states(net: keras.Model) -> list:
    """The state variables of the model's Keras SeedGenerators (dropout / stochastic depth).

    They are model variables but not children in the tf.train.Checkpoint object graph, so they
    are checkpointed explicitly: without them a resumed run draws other dropout masks.
    """
    return [g.state for layer in net._flatten_layers() for g in getattr(
        layer, "_seed_generators", [])]


def train(model_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) into cfg.workdir; returns the closing JSON dict."""
    cfg.validate()
    plan = make_plan(cfg)
    model_cfg = dataclasses.replace(model_cfg, num_classes=plan.num_classes).validate()
    strategy = distribute.resolve_strategy(cfg.strategy, cfg.tpu)
    previous = keras.mixed_precision.global_policy()
    try:
        return Trainer(model_cfg, cfg, plan, strategy).run()
    finally:
        keras.mixed_precision.set_global_policy(previous)


class Trainer:
    """One run: builds models, optimizer, checkpoint and pipelines, then loops."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, plan: Plan, strategy):
        self.cfg, self.plan, self.strategy = cfg, plan, strategy
        self.kind = distribute.device_kind(strategy)
        self.replicas = strategy.num_replicas_in_sync
        self.micro = distribute.per_replica_batch(
            cfg.batch_size, self.replicas, cfg.grad_accum_steps)
        self.chief = distribute.is_chief(strategy)
        config = checkpointing.workdir_config(model_cfg, cfg, plan.num_classes)
        checkpointing.check_and_write_config(cfg.workdir, config, self.chief)
        self.policy = distribute.precision_policy(cfg.mixed_precision, self.kind)
        self.jit = distribute.use_jit(cfg.jit_compile, self.kind)
        keras.mixed_precision.set_global_policy(self.policy)
        keras.utils.set_random_seed(cfg.seed)  # same initial weights for the same seed
        with strategy.scope():
            self.models = model.build_models(model_cfg, cfg.pretrained_weights or None)
            set_bn_momentum(self.models.train_model, cfg.bn_momentum)
            variables = self.models.train_model.trainable_variables
            self.optimizer = make_optimizer(cfg, plan.train_steps, variables, self.policy)
        with tf.device("/cpu:0"):
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = model.make_checkpoint(
            self.models, optimizer=self.optimizer, step=self.step,
            rng=seed_states(self.models.train_model))
        self.manager = checkpointing.manager(
            self.checkpoint, cfg.workdir, cfg.keep_checkpoints, self.chief,
            getattr(getattr(strategy, "cluster_resolver", None), "task_id", 0) or 0)
        self.start_info = self._restore_or_init()
        self.start_step = int(self.step.numpy())
        self.steps_per_execution = self._steps_per_execution()

    def _restore_or_init(self) -> dict[str, Any]:
        path = checkpointing.restore_latest(self.checkpoint, self.cfg.workdir, self.models)
        if path:
            return {"resumed_from": path}
        if self.cfg.init_from:
            return {"init_from": model.restore_for_stage(self.models, self.cfg.init_from)}
        return {}

    def _steps_per_execution(self) -> int:
        n = self.cfg.steps_per_execution
        if n > 1 and self.replicas > 1 and not distribute.multi_step_supported(self.strategy):
            logging.warning("steps_per_execution=%d fails with %d replicas here; using 1",
                            n, self.replicas)
            return 1
        return n

    def train_function(self):
        cfg, plan = self.cfg, self.plan
        weights = None
        if cfg.class_weighting != "none":
            weights = losses.class_weights(plan.class_counts, cfg.class_weighting)
        factors = None
        if cfg.sampling != "uniform":
            factors = sampling.repeat_factors(plan.class_counts, cfg.sampling)
        spec = input_pipeline.TrainInput(
            files=plan.train_files, image_size=self.models.config.image_size,
            global_batch_size=cfg.batch_size, steps_per_epoch=plan.steps_per_epoch,
            seed=cfg.seed, start_step=self.start_step, shuffle_buffer=cfg.shuffle_buffer,
            augment=tuple(cfg.augment), repeat_factors=factors, class_weights=weights,
            not_clean_weight=cfg.not_clean_weight,
        )
        iterator = iter(input_pipeline.distribute(self.strategy, spec))
        replica_fn = train_step.make_train_step(
            self.models, self.optimizer, global_batch=cfg.batch_size, replicas=self.replicas,
            accum_steps=cfg.grad_accum_steps,
            jit=self.jit and self.kind != "tpu")  # TPUStrategy compiles the whole step anyway
        multi = distribute.multi_step_function(
            self.strategy, replica_fn, train_step.TRAIN_KEYS, self.steps_per_execution)

        @tf.function
        def run(iterator, n):
            totals = multi(iterator, n)
            self.step.assign_add(tf.cast(n, tf.int64))
            return totals

        return lambda n: run(iterator, n)

    def eval_function(self):
        if not self.plan.val_files:
            return None
        eval_batch = self.micro * self.replicas
        # With several hosts each reads its own shards; one spare step absorbs uneven shards.
        spare = 1 if distribute.num_hosts(self.strategy) > 1 else 0
        steps = math.ceil(self.plan.val_examples / eval_batch) + spare
        spec = input_pipeline.EvalInput(self.plan.val_files, self.models.config.image_size,
                                        eval_batch, steps)
        dataset = input_pipeline.distribute(self.strategy, spec)
        replica_fn = train_step.make_eval_step(self.models)
        multi = distribute.multi_step_function(self.strategy, replica_fn, train_step.EVAL_KEYS)
        return lambda: multi(iter(dataset), tf.constant(steps))

    def run(self) -> dict[str, Any]:
        """Trains to plan.train_steps; SIGTERM / Ctrl-C save a checkpoint, then re-raise."""
        loop = train_loop.Loop(self)
        with train_loop.sigterm_as_interrupt():
            try:
                loop.run()
            except KeyboardInterrupt:
                loop.save(int(self.step.numpy()))
                raise
        return loop.result()
