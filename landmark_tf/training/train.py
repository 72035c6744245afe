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

import contextlib
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
from landmark_tf.modeling import lever_heads, losses, model
from landmark_tf.training import (
    checkpointing,
    distribute,
    input_pipeline,
    retrieval_validation,
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
    # Per class, how many train examples have image/is_clean 0; None for datasets written
    # before landmark-tfrecords recorded it.
    not_clean_counts: list[int] | None = None


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
    not_clean = split.get("not_clean_class_counts")
    if not_clean is not None and len(not_clean) != num_classes:
        raise UserError(f"{where}: {len(not_clean)} not_clean_class_counts for {num_classes} "
                        "classes")
    return Plan(train_files, val_files, val_examples, num_classes, [int(c) for c in counts],
                steps_per_epoch, train_steps,
                None if not_clean is None else [int(c) for c in not_clean])


def loss_weights(cfg: TrainConfig, plan: Plan):
    """float32[C] class weights (see losses.class_weights), or None when every weight is 1."""
    if cfg.class_weighting == "none" and cfg.not_clean_weight == 1.0:
        return None
    if cfg.not_clean_weight != 1.0 and plan.not_clean_counts is None:
        where = fileio.join(cfg.data_dir, records.DATASET_INFO)
        raise UserError(
            f"{where} has no not_clean_class_counts for split '{cfg.train_split}' (written by an "
            f"older landmark-tfrecords), needed to normalise the loss weights of "
            f"--not_clean_weight={cfg.not_clean_weight} to mean 1; rewrite the records "
            "with this version's landmark-tfrecords")
    try:
        return losses.class_weights(plan.class_counts, cfg.class_weighting,
                                    plan.not_clean_counts, cfg.not_clean_weight)
    except ValueError as e:
        raise UserError(f"--class_weighting={cfg.class_weighting}: {e}") from None


def make_optimizer(cfg: TrainConfig, train_steps: int, variables, policy: str):
    """SGD + momentum + decoupled weight decay (not on biases, norms, GeM p), lr schedule,
    loss scaling under float16. Call under the strategy scope."""
    schedule = WarmupSchedule(cfg.learning_rate, train_steps, cfg.warmup_steps, cfg.schedule,
                              cfg.lr_decay)
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


def train(model_cfg: ModelConfig, cfg: TrainConfig, retrieval_val=None) -> dict[str, Any]:
    """Trains (or resumes) into cfg.workdir; returns the closing JSON dict.

    retrieval_val: optional retrieval_validation.RetrievalValConfig (held-out mAP@100).
    cfg.backend "jax" (or "auto" resolving to it, see training/backend.py) hands the run to
    jax_train.train; the Keras backend of this process must match (KERAS_BACKEND).
    """
    from landmark_tf.training import backend

    cfg = dataclasses.replace(cfg.validate(), backend=backend.select(cfg.backend, cfg.tpu,
                                                                cfg.strategy))
    if cfg.backend == "jax":
        if retrieval_val is not None:
            raise UserError("--retrieval_queries/--retrieval_index run under the TensorFlow "
                            "backend only (not yet under --backend=jax)")
        from landmark_tf.training import jax_train

        with _out_of_memory_is_a_user_error(cfg, model_cfg.image_size):
            return jax_train.train(model_cfg, cfg)
    plan = make_plan(cfg)
    loss_weights(cfg, plan)  # a dataset that cannot be weighted fails before any model is built
    model_cfg = dataclasses.replace(model_cfg, num_classes=plan.num_classes).validate()
    strategy = distribute.resolve_strategy(cfg.strategy, cfg.tpu)
    previous = keras.mixed_precision.global_policy()
    try:
        with _out_of_memory_is_a_user_error(cfg, model_cfg.image_size):
            return Trainer(model_cfg, cfg, plan, strategy, retrieval_val).run()
    finally:
        keras.mixed_precision.set_global_policy(previous)


def train_input(cfg: TrainConfig, plan: Plan, image_size: int,
                start_step: int) -> input_pipeline.TrainInput:
    """The training input of a run (both backends): files, sampling, loss weights, position."""
    factors = None
    if cfg.sampling != "uniform":
        factors = sampling.repeat_factors(plan.class_counts, cfg.sampling)
    return input_pipeline.TrainInput(
        files=plan.train_files, image_size=image_size, global_batch_size=cfg.batch_size,
        steps_per_epoch=plan.steps_per_epoch, seed=cfg.seed, start_step=start_step,
        shuffle_buffer=cfg.shuffle_buffer, augment=tuple(cfg.augment), repeat_factors=factors,
        class_weights=loss_weights(cfg, plan), not_clean_weight=cfg.not_clean_weight,
    )


@contextlib.contextmanager
def _out_of_memory_is_a_user_error(cfg: TrainConfig, image_size: int):
    """An accelerator or host out-of-memory (TF ResourceExhaustedError, XLA/JAX
    RESOURCE_EXHAUSTED) becomes one line naming the settings that size the step; the last
    checkpoint stays, so a rerun with other settings of the same run resumes."""
    try:
        yield
    except Exception as e:
        if not (isinstance(e, tf.errors.ResourceExhaustedError)
                or "RESOURCE_EXHAUSTED" in str(e)[:300]):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"out of memory with --batch_size={cfg.batch_size}, --grad_accum_steps="
            f"{cfg.grad_accum_steps}, --image_size={image_size} ({first}); lower the batch or "
            "image size, raise --grad_accum_steps, or check a setting first with "
            "--memory_check --tpu_type=...") from None


def _check_sync_bn(model_cfg: ModelConfig, cfg: TrainConfig, replicas: int, kind: str,
                   jit: str) -> None:
    """--neck=dense_syncbn all-reduces batch statistics inside the forward pass. TensorFlow
    cannot do that inside the accumulation loop, nor inside the nested XLA function on CPU
    replicas (merge_call in a nested graph; GPUs and TPUs reduce without merge_call)."""
    if model_cfg.neck != "dense_syncbn" or replicas == 1:
        return
    if cfg.grad_accum_steps > 1:
        raise UserError(f"--neck=dense_syncbn with --grad_accum_steps={cfg.grad_accum_steps} "
                        f"over {replicas} replicas: the statistics cannot be synchronised "
                        "inside the accumulation loop; use --grad_accum_steps=1 or dense_bn")
    if kind == "cpu" and jit == "on":
        raise UserError("--neck=dense_syncbn with --jit_compile=on on CPU replicas: TensorFlow "
                        "cannot all-reduce there inside XLA; use --jit_compile=off")


def report_head_memory(model_cfg: ModelConfig) -> dict[str, int]:
    """Prints the float32 bytes of the class matrix for this run and for GLDv2's 203,094
    classes, full (D x C x K) and as configured (factorised when head_rank > 0); returns them
    for the closing JSON. SGD momentum doubles each figure, Adam triples it."""
    if model_cfg.head == "softmax":
        return {}
    k = model_cfg.subcenters if model_cfg.head in ("subcenter_arcface", "dynamic_arcface") else 1
    size = {}
    for where, c in (("", model_cfg.num_classes), ("_gldv2", lever_heads.GLDV2_CLASSES)):
        for kind, rank in (("full", 0), ("this", model_cfg.head_rank)):
            size[f"head_bytes_{kind}{where}"] = 4 * lever_heads.head_parameters(
                c, model_cfg.embedding_dim, k, rank)
    gldv2 = lever_heads.GLDV2_CLASSES
    print(f"head memory (float32 weights): {size['head_bytes_this'] / 1e6:.2f} MB here; at "
          f"{gldv2:,} classes {size['head_bytes_full_gldv2'] / 1e6:.1f} MB full, "
          f"{size['head_bytes_this_gldv2'] / 1e6:.1f} MB as configured "
          f"(head_rank={model_cfg.head_rank})", flush=True)
    return size


class Trainer:
    """One run: builds models, optimizer, checkpoint and pipelines, then loops."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, plan: Plan, strategy,
                 retrieval_val=None):
        self.cfg, self.plan, self.strategy = cfg, plan, strategy
        self.kind = distribute.device_kind(strategy)
        self.replicas = strategy.num_replicas_in_sync
        self.micro = distribute.per_replica_batch(
            cfg.batch_size, self.replicas, cfg.grad_accum_steps)
        self.chief = distribute.is_chief(strategy)
        _check_sync_bn(model_cfg, cfg, self.replicas, self.kind, cfg.jit_compile)
        config = checkpointing.workdir_config(model_cfg, cfg, plan.num_classes)
        checkpointing.check_and_write_config(cfg.workdir, config, self.chief)
        self.policy = distribute.precision_policy(cfg.mixed_precision, self.kind)
        self.jit = distribute.use_jit(cfg.jit_compile, self.kind)
        keras.mixed_precision.set_global_policy(self.policy)
        keras.utils.set_random_seed(cfg.seed)  # same initial weights for the same seed
        with strategy.scope():
            self.models = model.build_models(model_cfg, cfg.pretrained_weights or None,
                                             class_counts=plan.class_counts)
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
        self.start_info = {**self._restore_or_init(), **report_head_memory(model_cfg)}
        self.start_step = int(self.step.numpy())
        self.steps_per_execution = self._steps_per_execution()
        # Called after each execution as hook(step, n, total, writer) -> closing-JSON facts.
        self.step_hooks = [] if retrieval_val is None else [
            retrieval_validation.Hook(retrieval_val, self)]

    def _restore_or_init(self) -> dict[str, Any]:
        path = checkpointing.restore_latest(self.checkpoint, self.cfg.workdir, self.models)
        if path:
            return {"resumed_from": path}
        if self.cfg.init_from:
            info = model.restore_for_stage(self.models, self.cfg.init_from)
            if "head" in info["restored"]:
                info["label_map"] = checkpointing.check_head_labels(
                    self.cfg.init_from, checkpointing.label_map_digest(self.cfg.data_dir))
            return {"init_from": info}
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
        spec = train_input(cfg, plan, self.models.config.image_size, self.start_step)
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
                loop.save(int(self.step.numpy()), wait=True)
                raise
        return loop.result()
