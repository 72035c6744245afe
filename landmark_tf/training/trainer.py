"""The seam between a training run and a Keras backend: what the run and its loop need.

The run (train.Run) builds the models and the optimizer inside `placement()`, restores or
initialises them, then calls `start`; the loop (train_loop.Loop) calls `train(n)` and
`evaluate()` and asks `step`, `learning_rate()`; checkpoints call `sync()` first. Two
implementations: tf_trainer.TFTrainer (tf.distribute strategies, tf.function steps) and
jax_trainer.JaxTrainer (keras.distribution, jit-compiled stateless steps).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from landmark_tf.config import ModelConfig


class BackendTrainer(Protocol):
    backend: str  # "tensorflow" or "jax": config.json's train.backend
    kind: str  # "tpu", "gpu" or "cpu"
    replicas: int  # devices the global batch is split over
    hosts: int  # processes that each read their own shards
    chief: bool  # whether this process writes config, logs and checkpoints
    policy: str  # Keras dtype policy of the run
    jit: bool  # XLA-compiled steps
    steps_per_execution: int  # steps between two returns to Python

    def check(self, model_cfg: ModelConfig) -> None:
        """UserError for a model setting this backend cannot train here."""

    def placement(self) -> AbstractContextManager:
        """Where the models' and the optimizer's variables are created."""

    def set_step(self, step: int) -> None:
        """The step a restored checkpoint was at."""

    @property
    def step(self) -> int:
        """Optimizer steps taken."""

    def start(self, models, optimizer, start_step: int, train_input, eval_input,
              replica_mean: list) -> None:
        """Builds the input pipelines (input_pipeline.TrainInput/EvalInput specs; eval_input
        None without validation) and the compiled steps. replica_mean: variables averaged over
        replicas after each step (batch_stats `replica`)."""

    def train(self, n: int, should_stop: Callable[[], bool]) -> dict[str, float]:
        """Runs up to n steps (fewer when should_stop() turns true between steps, where the
        backend can stop there); returns step_math.TRAIN_KEYS summed over them."""

    def compilations(self) -> int | None:
        """How many times the train step was compiled (traced) so far: 1 in a healthy run,
        more when an input's type changed between steps; None where the backend cannot say."""

    def evaluate(self) -> dict[str, float] | None:
        """step_math.EVAL_KEYS summed over the validation split; None without one."""

    def sync(self) -> None:
        """Makes the Keras variables hold the current training state (before a checkpoint,
        an embedding pass or an export in this process)."""

    def learning_rate(self) -> float:
        """The learning rate of the last step."""

    def embedder(self, sizes: list[int], batch_size: int):
        """An embedder.BatchEmbedder of the models' embedding model on this placement."""

    def close(self) -> None:
        """Undoes process-wide settings the trainer made (JAX: the keras distribution)."""
