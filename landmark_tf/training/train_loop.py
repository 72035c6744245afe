"""The Python side of a training run: chunks of steps, logs, checkpoints, evaluation, result.

Each chunk is one compiled execution of up to steps_per_execution steps, cut so that it ends
exactly at checkpoint and evaluation steps. TensorBoard gets loss, accuracy (top-1 of the margin
logits), learning_rate and images_per_second per chunk; the closing result averages loss and
accuracy over the last ~20 steps and measures images/s after the first (compiling) chunk.
A run of 0 steps (`--train_steps=0`) validates and checkpoints the initial weights at step 0.
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
import time
from typing import Any

import tensorflow as tf
from absl import logging
from tqdm import tqdm

from landmark_tf import fileio
from landmark_tf.training import checkpointing

_LOSS_WINDOW = 20  # steps averaged for the reported loss and accuracy


class Loop:
    """The Python side of training: chunks of steps, logging, checkpoints, evaluation."""

    def __init__(self, trainer):
        self.t, cfg = trainer, trainer.cfg
        self.train_fn = trainer.train_function()
        self.eval_fn = trainer.eval_function()
        self.eval_every = cfg.eval_every or trainer.plan.steps_per_epoch
        self.writers: dict[str, Any] = {}
        self.window = collections.deque()
        self.timed_images, self.timed_seconds, self.executions = 0, 0.0, 0
        self.val: dict[str, float] = {}
        self.saved_step = -1
        self.last_ips = 0.0
        self.save_options = checkpointing.save_options(trainer.strategy)
        self.saved_path: str | None = None
        self.hooked: dict[str, Any] = {}  # facts from the trainer's step_hooks

    def writer(self, name: str):
        """TensorBoard writer for logs/<name>, created on first use (chief only)."""
        if name not in self.writers:
            logs = fileio.join(self.t.cfg.workdir, checkpointing.LOGS_DIR, name)
            self.writers[name] = (tf.summary.create_file_writer(logs) if self.t.chief
                                  else tf.summary.create_noop_writer())
        return self.writers[name]

    def chunk(self, step: int) -> int:
        cfg, total = self.t.cfg, self.t.plan.train_steps
        n = min(self.t.steps_per_execution, total - step,
                cfg.checkpoint_every - step % cfg.checkpoint_every)
        if self.eval_fn is not None:
            n = min(n, self.eval_every - step % self.eval_every)
        return n

    def run(self) -> None:
        step, total = int(self.t.step.numpy()), self.t.plan.train_steps
        bar = tqdm(total=total, initial=min(step, total), unit="step", file=sys.stderr,
                   disable=not self.t.chief, dynamic_ncols=True, desc="train")
        with bar:
            while step < total:
                step = self.execute(step, total, bar)
        if step >= total and self.t.manager.latest_checkpoint is None:
            # Nothing to train (train_steps=0): the initialisation is the run's checkpoint.
            if self.eval_fn is not None:
                self.evaluate(step)
            self.save(step)
        self.t.checkpoint.sync()  # the last (async) checkpoint is on disk when the run returns

    def execute(self, step: int, total: int, bar) -> int:
        """One compiled execution of steps, then logs, evaluation, checkpoint; the new step."""
        n = self.chunk(step)
        start = time.perf_counter()
        totals = {k: float(v) for k, v in self.train_fn(tf.constant(n)).items()}
        self.record(n, totals, time.perf_counter() - start)
        step = int(self.t.step.numpy())
        self.log(step, n, totals)
        bar.update(n)
        bar.set_postfix(loss=f"{self.loss():.4f}", acc=f"{self.accuracy():.3f}")
        evaluate = self.eval_fn is not None and (step % self.eval_every == 0 or step == total)
        if evaluate:
            self.evaluate(step)
        for hook in getattr(self.t, "step_hooks", ()):
            self.hooked.update(hook(step, n, total, self.writer))
        if evaluate or step % self.t.cfg.checkpoint_every == 0 or step == total:
            self.save(step)
        return step

    def record(self, n: int, totals: dict[str, float], seconds: float) -> None:
        self.window.append((n, totals))
        while sum(k for k, _ in self.window) - self.window[0][0] >= _LOSS_WINDOW:
            self.window.popleft()
        self.executions += 1
        if self.executions == 2:  # the first execution includes tracing and compilation
            self.timed_images, self.timed_seconds = 0, 0.0
        self.timed_images += n * self.t.cfg.batch_size
        self.timed_seconds += seconds
        self.last_ips = n * self.t.cfg.batch_size / max(seconds, 1e-9)

    def loss(self) -> float:
        return sum(t["loss"] for _, t in self.window) / max(sum(n for n, _ in self.window), 1)

    def accuracy(self) -> float:
        return sum(t["correct"] for _, t in self.window) / max(
            sum(t["count"] for _, t in self.window), 1.0)

    def log(self, step: int, n: int, totals: dict[str, float]) -> None:
        with self.writer("train").as_default(step=step):
            tf.summary.scalar("loss", totals["loss"] / n)
            tf.summary.scalar("accuracy", totals["correct"] / max(totals["count"], 1.0))
            tf.summary.scalar("learning_rate", self.learning_rate())
            tf.summary.scalar("images_per_second", self.last_ips)

    def learning_rate(self) -> float:
        return float(self.t.optimizer.learning_rate.numpy())

    def evaluate(self, step: int) -> None:
        totals = {k: float(v) for k, v in self.eval_fn().items()}
        self.val = {"val_accuracy": totals["correct"] / max(totals["count"], 1.0),
                    "val_examples": int(totals["count"])}
        if self.val["val_examples"] < self.t.plan.val_examples:
            logging.warning("validation saw %d of %d examples (uneven shards over hosts)",
                            self.val["val_examples"], self.t.plan.val_examples)
        with self.writer("val").as_default(step=step):
            tf.summary.scalar("accuracy", self.val["val_accuracy"])

    def save(self, step: int, wait: bool = False) -> None:
        """Starts an (async) checkpoint of `step`; `wait` blocks until its files are written."""
        if step != self.saved_step:
            self.saved_path = self.t.manager.save(checkpoint_number=step,
                                                  options=self.save_options)
            self.saved_step = step
            self.write_summary()
        if wait:
            self.t.checkpoint.sync()

    def write_summary(self) -> None:
        for w in self.writers.values():
            w.flush()
        if self.t.chief:
            checkpointing.write_summary(self.t.cfg.workdir, self.result())

    def result(self) -> dict[str, Any]:
        t = self.t
        step = int(t.step.numpy())
        previous = {} if self.window else checkpointing.read_summary(t.cfg.workdir)
        if previous:  # nothing trained in this process: report the finished run
            return {"loss": None, "images_per_second": 0.0, **previous, "step": step,
                    "start_step": t.start_step}
        trained = bool(self.window)  # else a 0-step run: the initialisation, untrained
        return {
            "step": step, "loss": self.loss() if trained else None,
            "accuracy": self.accuracy() if trained else None,
            "images_per_second": self.timed_images / max(self.timed_seconds, 1e-9),
            "learning_rate": self.learning_rate(), "epoch": step / t.plan.steps_per_epoch,
            "start_step": t.start_step, "train_steps": t.plan.train_steps,
            "workdir": t.cfg.workdir, "checkpoint": self.saved_path or t.manager.latest_checkpoint,
            "async_checkpoint": self.save_options.experimental_enable_async_checkpoint,
            "backend": getattr(t, "backend", "tensorflow"),
            "device": t.kind, "replicas": t.replicas, "mixed_precision": t.policy,
            "jit_compile": t.jit, "steps_per_execution": t.steps_per_execution,
            **self.val, **self.hooked, **t.start_info,
        }


class sigterm_as_interrupt:
    """Turns SIGTERM (TPU preemption, `kill`) into KeyboardInterrupt, so a checkpoint is saved."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False
