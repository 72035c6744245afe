"""A training run, the same for both Keras backends: `train(model_cfg, cfg)`.

The run (`Run`, orbit's Controller) owns what does not depend on the backend: the data plan from
dataset_info.json, the input spec, loss weights, the optimizer and its schedule, BatchNorm
momentum and statistics, the head-memory report, config.json, the restore-or-init policy (resume
from the workdir's checkpoint, else `--init_from` with its label-map check), checkpoints
(modeling/checkpoint: one format for both backends) and the loop (train_loop). The backend
trainer it is handed (trainer.BackendTrainer: tf_trainer or jax_trainer) owns the placement of
variables, the compiled steps and their state.

Not `Model.fit`: step-exact resume (data order is a function of (seed, step), see
input_pipeline; fit's BackupAndRestore resumes at epoch starts), our own multi-step loop
(keras-team/keras#19246 breaks Keras's with several replicas), and gradient accumulation inside
the compiled step.

`train(model_cfg, cfg)` returns the closing JSON dict: step, loss, accuracy, images_per_second,
learning_rate, val_accuracy (when a validation split exists), ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import keras
from absl import logging

from landmark_tf import fileio
from landmark_tf.config import TAG_HEADS, ModelConfig, TrainConfig
from landmark_tf.data import records
from landmark_tf.errors import UserError
from landmark_tf.modeling import checkpoint, head_variants, losses, model
from landmark_tf.training import (
    batch_stats,
    checkpointing,
    distribute,
    input_pipeline,
    sampling,
    tag_targets,
    train_loop,
)
from landmark_tf.training.schedules import WarmupSchedule
from landmark_tf.training.trainer import BackendTrainer


@dataclasses.dataclass
class DataPlan:
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
    # Tag heads (tag_targets.for_head): tags per image in the batch (0: landmark labels) and
    # float32 [V] per-tag weights (label_weighted; None: every tag 1).
    tag_width: int = 0
    tag_weights: Any = None


def make_plan(cfg: TrainConfig) -> DataPlan:
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
    return DataPlan(train_files, val_files, val_examples, num_classes, [int(c) for c in counts],
                steps_per_epoch, train_steps,
                None if not_clean is None else [int(c) for c in not_clean])


def loss_weights(cfg: TrainConfig, plan: DataPlan):
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


def train(model_cfg: ModelConfig, cfg: TrainConfig, retrieval_val=None) -> dict[str, Any]:
    """Trains (or resumes) into cfg.workdir on cfg.backend; returns the closing JSON dict.

    retrieval_val: optional retrieval_validation.RetrievalValConfig (held-out mAP@100).
    cfg.backend "auto" resolves first (training/backend.py); the Keras backend of this process
    must be the one chosen (KERAS_BACKEND, fixed when Keras is first imported).
    """
    from landmark_tf.training import backend

    cfg = dataclasses.replace(cfg.validate(), backend=backend.select(cfg.backend, cfg.tpu,
                                                                cfg.strategy))
    plan = make_plan(cfg)
    if model_cfg.head in TAG_HEADS:
        plan = tag_targets.for_head(plan, cfg, model_cfg.head)
    loss_weights(cfg, plan)  # a dataset that cannot be weighted fails before any model is built
    model_cfg = dataclasses.replace(model_cfg, num_classes=plan.num_classes).validate()
    previous = keras.mixed_precision.global_policy()
    try:
        with _out_of_memory_is_a_user_error(cfg, model_cfg.image_size):
            return Run(model_cfg, cfg, plan, retrieval_val=retrieval_val).run()
    finally:
        keras.mixed_precision.set_global_policy(previous)


def make_trainer(cfg: TrainConfig, strategy=None) -> BackendTrainer:
    """The backend trainer for cfg.backend ("tensorflow" or "jax", resolved); `strategy`: a
    tf.distribute strategy to use instead of resolving cfg.strategy (TensorFlow only)."""
    if cfg.backend == "jax":
        from landmark_tf.training.jax_trainer import JaxTrainer

        return JaxTrainer(cfg)
    from landmark_tf.training.tf_trainer import TFTrainer

    return TFTrainer(cfg, strategy)


def train_input(cfg: TrainConfig, plan: DataPlan, image_size: int,
                start_step: int) -> input_pipeline.TrainInput:
    """The training input of a run (both backends): files, sampling, loss weights, position."""
    factors = None
    if cfg.sampling != "uniform":
        factors = sampling.repeat_factors(plan.class_counts, cfg.sampling)
    return input_pipeline.TrainInput(
        files=plan.train_files, image_size=image_size, global_batch_size=cfg.batch_size,
        steps_per_epoch=plan.steps_per_epoch, seed=cfg.seed, start_step=start_step,
        shuffle_buffer=cfg.shuffle_buffer, augment=tuple(cfg.augment), repeat_factors=factors,
        batch_classes=cfg.batch_classes,
        class_weights=loss_weights(cfg, plan), not_clean_weight=cfg.not_clean_weight,
        tag_width=plan.tag_width, tag_weights=plan.tag_weights,
    )


@contextlib.contextmanager
def _out_of_memory_is_a_user_error(cfg: TrainConfig, image_size: int):
    """An accelerator or host out-of-memory (TF ResourceExhaustedError, XLA/JAX
    RESOURCE_EXHAUSTED) becomes one line naming the settings that size the step; the last
    checkpoint stays, so a rerun with other settings of the same run resumes."""
    try:
        yield
    except Exception as e:
        if not (type(e).__name__ == "ResourceExhaustedError"
                or "RESOURCE_EXHAUSTED" in str(e)[:300]):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"out of memory with --batch_size={cfg.batch_size}, --grad_accum_steps="
            f"{cfg.grad_accum_steps}, --image_size={image_size} ({first}); lower the batch or "
            "image size, raise --grad_accum_steps, or check a setting first with "
            "--memory_check --tpu_type=...") from None


def report_head_memory(model_cfg: ModelConfig) -> dict[str, int]:
    """Prints the float32 bytes of the class matrix for this run and for GLDv2's 203,094
    classes, full (D x C x K) and as configured (factorised when head_rank > 0); returns them
    for the closing JSON. SGD momentum doubles each figure, Adam triples it."""
    if model_cfg.head in ("softmax", *TAG_HEADS):
        return {}
    k = model_cfg.subcenters if model_cfg.head in ("subcenter_arcface", "dynamic_arcface") else 1
    size = {}
    for where, c in (("", model_cfg.num_classes), ("_gldv2", head_variants.GLDV2_CLASSES)):
        for kind, rank in (("full", 0), ("this", model_cfg.head_rank)):
            size[f"head_bytes_{kind}{where}"] = 4 * head_variants.head_parameters(
                c, model_cfg.embedding_dim, k, rank)
    gldv2 = head_variants.GLDV2_CLASSES
    print(f"head memory (float32 weights): {size['head_bytes_this'] / 1e6:.2f} MB here; at "
          f"{gldv2:,} classes {size['head_bytes_full_gldv2'] / 1e6:.1f} MB full, "
          f"{size['head_bytes_this_gldv2'] / 1e6:.1f} MB as configured "
          f"(head_rank={model_cfg.head_rank})", flush=True)
    return size


def eval_input(plan: DataPlan, image_size: int, eval_batch: int,
               hosts: int) -> input_pipeline.EvalInput | None:
    """The validation input (None without a validation split): enough steps of `eval_batch`
    for every example; with several hosts, each reading its own shards, one spare step absorbs
    uneven shards."""
    if not plan.val_files:
        return None
    steps = math.ceil(plan.val_examples / eval_batch) + (1 if hosts > 1 else 0)
    return input_pipeline.EvalInput(plan.val_files, image_size, eval_batch, steps)


class Run:
    """One training run: a backend trainer, the models, checkpoints and the loop.

    Args:
      model_cfg: the model, num_classes already the data's.
      cfg: the run's TrainConfig, backend resolved ("tensorflow" or "jax").
      plan: make_plan(cfg).
      strategy: a tf.distribute strategy for the TensorFlow trainer (default: cfg.strategy).
      retrieval_val: optional retrieval_validation.RetrievalValConfig.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, plan: DataPlan, strategy=None,
                 retrieval_val=None):
        if cfg.grad_accum_steps == 0 and cfg.backend != "jax":
            raise UserError("--grad_accum_steps=auto plans from XLA's memory analysis of the "
                            "JAX step: use --backend=jax, or give a number (check one with "
                            "--memory_check --tpu_type=...)")
        self.plan = plan
        self.trainer = make_trainer(cfg, strategy)
        try:
            if cfg.grad_accum_steps == 0:
                cfg = self.trainer.plan_accumulation(model_cfg)
            self.cfg = cfg
            self._build(model_cfg, retrieval_val)
        except BaseException:
            self.trainer.close()
            raise

    def _build(self, model_cfg: ModelConfig, retrieval_val) -> None:
        cfg, plan, t = self.cfg, self.plan, self.trainer
        self.micro = distribute.per_replica_batch(cfg.batch_size, t.replicas,
                                                  cfg.grad_accum_steps)
        t.check(model_cfg)
        if retrieval_val is not None and t.backend == "jax" and t.hosts > 1:
            raise UserError("--retrieval_queries under JAX runs in one process: the embedding "
                            "pass does not gather over processes yet; validate with "
                            "--val_split, or embed a checkpoint with landmark-embed --workdir")
        # Groups of batch_classes images must not straddle replicas or micro-batches.
        input_pipeline.check_batch_classes(self.micro, cfg.batch_classes)
        if model_cfg.npairs_weight > 0 and cfg.batch_classes == 0:
            logging.warning(
                "--npairs_weight=%g with i.i.d. batches (--batch_classes=0): over %d classes a "
                "batch almost never holds two images of one class, so the n-pairs loss is "
                "only its L2 term; pass --batch_classes=2 (or more) for class-aware batches",
                model_cfg.npairs_weight, plan.num_classes)
        if cfg.bn_statistics == "replica" and t.replicas > 1 and self.micro < 4:
            logging.warning(
                "BatchNorm statistics over %d image(s) per replica and micro-step "
                "(--bn_statistics=replica): noisy, and at the last, 1x1 stages of a small input "
                "they can blow training up; consider --bn_statistics=global or a larger "
                "per-replica batch", self.micro)
        config = checkpointing.workdir_config(model_cfg, cfg, plan.num_classes)
        checkpointing.check_and_write_config(cfg.workdir, config, t.chief)
        keras.mixed_precision.set_global_policy(t.policy)
        keras.utils.set_random_seed(cfg.seed)  # same initial weights for the same seed
        with t.placement():
            self.models = model.build_models(model_cfg, cfg.pretrained_weights or None,
                                             class_counts=plan.class_counts,
                                             preset_weights=True)
            net = self.models.train_model
            set_bn_momentum(net, cfg.bn_momentum)
            batch_stats.configure(net, cfg.bn_statistics, t.replicas, t.backend)
            self.optimizer = make_optimizer(cfg, plan.train_steps, net.trainable_variables,
                                            t.policy)
        self.seeds = checkpoint.seed_states(net)
        self.checkpoints = checkpointing.CheckpointManager(
            cfg.workdir, cfg.keep_checkpoints, t, self.models, self.optimizer, self.seeds,
            {"backend": t.backend, "seed": cfg.seed})
        self.start_info = {"backend": t.backend, "grad_accum_steps": cfg.grad_accum_steps,
                           **self._restore_or_init(),
                           **report_head_memory(model_cfg)}
        self.start_step = t.step
        replica_mean = (batch_stats.replica_mean_state(net, self.seeds)
                        if cfg.bn_statistics == "replica" else [])
        t.start(self.models, self.optimizer, self.start_step,
                train_input(cfg, plan, model_cfg.image_size, self.start_step),
                eval_input(plan, model_cfg.image_size, self.micro * t.replicas, t.hosts),
                replica_mean)
        self.step_hooks = []  # hook(step, n, total, writer) -> closing-JSON facts
        if retrieval_val is not None:
            from landmark_tf.training import retrieval_validation

            self.step_hooks.append(retrieval_validation.Hook(retrieval_val, self))

    def _restore_or_init(self) -> dict[str, Any]:
        """Resume from this workdir's checkpoint; else start from --init_from (a kept head only
        when its label map is this data's); else the initialisation."""
        found = self.checkpoints.latest
        if found is not None:
            step = model.restore_train_state(self.models, found, self.optimizer, self.seeds)
            self.trainer.set_step(step)
            return {"resumed_from": found.path}
        if self.cfg.init_from:
            info = model.restore_for_stage(self.models, self.cfg.init_from)
            if "head" in info["restored"]:
                info["label_map"] = checkpointing.check_head_labels(
                    self.cfg.init_from, checkpointing.label_map_digest(self.cfg.data_dir))
            return {"init_from": info}
        return {}

    def run(self) -> dict[str, Any]:
        """Trains to plan.train_steps; SIGTERM / Ctrl-C save a checkpoint after the current
        execution, then raise KeyboardInterrupt."""
        try:
            return train_loop.Loop(self).run()
        finally:
            self.trainer.close()
