"""The TensorFlow backend trainer: a tf.distribute strategy (TPUStrategy, MirroredStrategy,
MultiWorkerMirroredStrategy, one device) and `strategy.run` steps inside tf.functions.

steps_per_execution is our own `tf.range` loop of `strategy.run` (the TF custom-loop pattern
that TPUStrategy compiles), probed by distribute.multi_step_supported with a fallback to 1;
gradient accumulation is a loop over micro-batches inside the (XLA-compiled on GPU) step with one
optimizer update (tf_step). Runs on CPU, GPUs and TPUs with TF 2.20 and 2.21.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
from absl import logging

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.errors import UserError
from landmark_tf.training import distribute, input_pipeline, step_math, tf_step
from landmark_tf.training.embedder import StrategyEmbedder


class TFTrainer:
    """trainer.BackendTrainer on TensorFlow. strategy: use this one instead of cfg.strategy."""

    backend = "tensorflow"

    def __init__(self, cfg: TrainConfig, strategy: tf.distribute.Strategy | None = None):
        self.cfg = cfg
        self.strategy = strategy or distribute.resolve_strategy(cfg.strategy, cfg.tpu)
        self.kind = distribute.device_kind(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.hosts = distribute.num_hosts(self.strategy)
        self.chief = distribute.is_chief(self.strategy)
        self.policy = distribute.precision_policy(cfg.mixed_precision, self.kind)
        self.jit = distribute.use_jit(cfg.jit_compile, self.kind)
        self.steps_per_execution = self._steps_per_execution()
        with tf.device("/cpu:0"):
            self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")

    def check(self, model_cfg: ModelConfig) -> None:
        check_sync_bn(model_cfg, self.cfg, self.replicas, self.kind, self.cfg.jit_compile)

    def placement(self):
        return self.strategy.scope()

    def set_step(self, step: int) -> None:
        self._step.assign(step)

    @property
    def step(self) -> int:
        return int(self._step.numpy())

    def _steps_per_execution(self) -> int:
        n = self.cfg.steps_per_execution
        if n > 1 and self.replicas > 1 and not distribute.multi_step_supported(self.strategy):
            logging.warning("steps_per_execution=%d fails with %d replicas here; using 1",
                            n, self.replicas)
            return 1
        return n

    def start(self, models, optimizer, start_step, train_input, eval_input,
              replica_mean) -> None:
        self.models, self.optimizer = models, optimizer
        cfg = self.cfg
        iterator = iter(self.train_batches(train_input))
        replica_fn = tf_step.make_train_step(
            models, optimizer, global_batch=cfg.batch_size, replicas=self.replicas,
            accum_steps=cfg.grad_accum_steps,
            jit=self.jit and self.kind != "tpu",  # TPUStrategy compiles the whole step anyway
            replica_mean=replica_mean if self.replicas > 1 else None)
        multi = distribute.multi_step_function(
            self.strategy, replica_fn, step_math.TRAIN_KEYS, self.steps_per_execution)

        @tf.function
        def run(iterator, n):
            totals = multi(iterator, n)
            self._step.assign_add(tf.cast(n, tf.int64))
            return totals

        self._train = lambda n: run(iterator, tf.constant(n))
        self._run = run
        self._evaluate = None
        if eval_input is not None:
            dataset = input_pipeline.distribute(self.strategy, eval_input)
            eval_multi = distribute.multi_step_function(
                self.strategy, tf_step.make_eval_step(models), step_math.EVAL_KEYS)
            self._evaluate = lambda: eval_multi(iter(dataset), tf.constant(eval_input.num_steps))

    def train_batches(self, train_input) -> tf.distribute.DistributedDataset:
        """The replicas' training batches (input_pipeline's stream, each host its own)."""
        return input_pipeline.distribute(self.strategy, train_input)

    def train(self, n: int, should_stop: Callable[[], bool]) -> dict[str, float]:
        del should_stop  # one compiled execution cannot stop midway
        return {k: float(v) for k, v in self._train(n).items()}

    def compilations(self) -> int:
        return self._run.experimental_get_tracing_count()

    def evaluate(self) -> dict[str, float] | None:
        if self._evaluate is None:
            return None
        return {k: float(v) for k, v in self._evaluate().items()}

    def sync(self) -> None:
        """The variables are the state under TensorFlow: nothing to write back."""

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.numpy())

    def embedder(self, sizes: list[int], batch_size: int) -> StrategyEmbedder:
        return StrategyEmbedder(self.models.embedding_model, self.strategy, sizes, batch_size)

    def close(self) -> None:
        """Nothing to undo: the strategy is the run's own."""


def check_sync_bn(model_cfg: ModelConfig, cfg: TrainConfig, replicas: int, kind: str,
                  jit: str) -> None:
    """Synchronised BatchNorm (--neck=dense_syncbn, --bn_statistics=global) all-reduces batch
    statistics inside the forward pass. TensorFlow cannot do that inside the accumulation loop,
    nor inside the nested XLA function on CPU replicas (merge_call in a nested graph; GPUs and
    TPUs reduce without merge_call)."""
    what = ("--neck=dense_syncbn" if model_cfg.neck == "dense_syncbn"
            else "--bn_statistics=global" if cfg.bn_statistics == "global" else None)
    if what is None or replicas == 1:
        return
    if cfg.grad_accum_steps > 1:
        raise UserError(f"{what} with --grad_accum_steps={cfg.grad_accum_steps} over "
                        f"{replicas} replicas under TensorFlow: the statistics cannot be "
                        "synchronised inside the accumulation loop; use --grad_accum_steps=1, "
                        "--bn_statistics=replica, or --backend=jax")
    if kind == "cpu" and jit == "on":
        raise UserError(f"{what} with --jit_compile=on on CPU replicas: TensorFlow cannot "
                        "all-reduce there inside XLA; use --jit_compile=off")
