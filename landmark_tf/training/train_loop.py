"""The Python side of a training run, the same for both backends: chunks of steps, logs,
checkpoints, evaluation, signals, the closing result.

Each chunk is one compiled execution of up to steps_per_execution steps, cut so that it ends
exactly at checkpoint and evaluation steps. TensorBoard gets loss, accuracy (top-1 of the margin
logits), learning_rate and images_per_second per chunk (and pair_anchors, the examples per step
with another of their class in their batch, with --npairs_weight or --batch_classes); the
closing result averages loss and accuracy (and pair_anchors) over the last ~20 steps and
measures images/s after the first (compiling) chunk.
A run of 0 steps (`--train_steps=0`) validates and checkpoints the initial weights at step 0.
SIGTERM (TPU preemption, `kill`) and Ctrl-C set a flag that is read between steps (JAX) or
executions (TensorFlow: a compiled execution cannot stop midway); then a checkpoint of the step
reached is written and KeyboardInterrupt raised. A flag, not an exception from the handler: one
raised between a jit call (whose input buffers are donated) and the state update would leave no
valid state to save.
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

from landmark_tf import fileio, workdir

_LOSS_WINDOW = 20  # steps averaged for the reported loss and accuracy


class Loop:
    """The Python side of training: chunks of steps, logging, checkpoints, evaluation."""

    def __init__(self, run):
        self.training_run, self.t, self.cfg, self.plan = run, run.trainer, run.cfg, run.plan
        self.has_eval = run.plan.val_files != ()
        self.eval_every = self.cfg.eval_every or run.plan.steps_per_epoch
        self.writers: dict[str, Any] = {}
        self.window = collections.deque()
        self.timed_images, self.timed_seconds, self.executions = 0, 0.0, 0
        self.val: dict[str, float] = {}
        self.saved_step = -1
        self.last_ips = 0.0
        self.saved_path: str | None = None
        self.hooked: dict[str, Any] = {}  # facts from the run's step_hooks
        self.stop_requested = False
        # Pair losses (n-pairs) need anchors with a positive in their batch: logged per step,
        # reported in the result, warned about once when a chunk of steps had none.
        self.pair_loss = run.models.config.npairs_weight > 0
        self.report_pairs = self.pair_loss or self.cfg.batch_classes > 0
        self.warned_no_pairs = False

    def writer(self, name: str):
        """TensorBoard writer for logs/<name>, created on first use (chief only)."""
        if name not in self.writers:
            logs = fileio.join(self.cfg.workdir, workdir.LOGS_DIR, name)
            self.writers[name] = (tf.summary.create_file_writer(logs) if self.t.chief
                                  else tf.summary.create_noop_writer())
        return self.writers[name]

    def chunk(self, step: int) -> int:
        cfg, total = self.cfg, self.plan.train_steps
        n = min(self.t.steps_per_execution, total - step,
                cfg.checkpoint_every - step % cfg.checkpoint_every)
        if self.has_eval:
            n = min(n, self.eval_every - step % self.eval_every)
        return n

    def run(self) -> dict[str, Any]:
        """Trains to the plan's last step; returns the closing JSON dict."""
        with _signals_set(self):
            try:
                self.train_to_end()
            except KeyboardInterrupt:
                self.save(self.t.step)
                raise
        return self.result()

    def train_to_end(self) -> None:
        step, total = self.t.step, self.plan.train_steps
        bar = tqdm(total=total, initial=min(step, total), unit="step", file=sys.stderr,
                   disable=not self.t.chief, dynamic_ncols=True, desc="train")
        with bar:
            while step < total:
                step = self.execute(step, total, bar)
                if self.stop_requested:
                    raise KeyboardInterrupt("signal")
        if step >= total and self.training_run.checkpoints.latest is None:
            # Nothing to train (train_steps=0): the initialisation is the run's checkpoint.
            if self.has_eval:
                self.evaluate(step)
            self.save(step)

    def execute(self, step: int, total: int, bar) -> int:
        """One execution of steps, then logs, evaluation, checkpoint; the new step."""
        n = self.chunk(step)
        start = time.perf_counter()
        totals = self.t.train(n, lambda: self.stop_requested)
        step_after = self.t.step
        n = step_after - step  # fewer when a signal stopped the execution early
        self.record(n, totals, time.perf_counter() - start)
        step = step_after
        self.log(step, n, totals)
        bar.update(n)
        bar.set_postfix(loss=f"{self.loss():.4f}", acc=f"{self.accuracy():.3f}")
        evaluate = self.has_eval and (step % self.eval_every == 0 or step == total)
        if evaluate:
            self.evaluate(step)
        for hook in self.training_run.step_hooks:
            self.hooked.update(hook(step, n, total, self.writer))
        if evaluate or step % self.cfg.checkpoint_every == 0 or step == total:
            self.save(step)
        return step

    def record(self, n: int, totals: dict[str, float], seconds: float) -> None:
        self.window.append((n, totals))
        while sum(k for k, _ in self.window) - self.window[0][0] >= _LOSS_WINDOW:
            self.window.popleft()
        self.executions += 1
        if self.executions == 2:  # the first execution includes tracing and compilation
            self.timed_images, self.timed_seconds = 0, 0.0
        self.timed_images += n * self.cfg.batch_size
        self.timed_seconds += seconds
        self.last_ips = n * self.cfg.batch_size / max(seconds, 1e-9)

    def loss(self) -> float:
        return sum(t["loss"] for _, t in self.window) / max(sum(n for n, _ in self.window), 1)

    def accuracy(self) -> float:
        return sum(t["correct"] for _, t in self.window) / max(
            sum(t["count"] for _, t in self.window), 1.0)

    def log(self, step: int, n: int, totals: dict[str, float]) -> None:
        with self.writer("train").as_default(step=step):
            tf.summary.scalar("loss", totals["loss"] / max(n, 1))
            tf.summary.scalar("accuracy", totals["correct"] / max(totals["count"], 1.0))
            tf.summary.scalar("learning_rate", self.learning_rate())
            tf.summary.scalar("images_per_second", self.last_ips)
            if self.report_pairs:
                tf.summary.scalar("pair_anchors", totals.get("pair_anchors", 0.0) / max(n, 1))
        if self.pair_loss and n > 0 and totals.get("pair_anchors", 1.0) == 0 and (
                not self.warned_no_pairs):
            self.warned_no_pairs = True
            logging.warning(
                "steps %d-%d: no example had another of its class in its batch, so the n-pairs "
                "loss (--npairs_weight) was only its L2 term; pass --batch_classes=K for "
                "batches of classes x K images", step - n + 1, step)

    def pair_anchors(self) -> float:
        """Mean anchors with a positive per step over the recent window (all replicas)."""
        return sum(t.get("pair_anchors", 0.0) for _, t in self.window) / max(
            sum(n for n, _ in self.window), 1)

    def learning_rate(self) -> float:
        return self.t.learning_rate()

    def evaluate(self, step: int) -> None:
        totals = self.t.evaluate()
        self.val = {"val_accuracy": totals["correct"] / max(totals["count"], 1.0),
                    "val_examples": int(totals["count"])}
        if self.val["val_examples"] < self.plan.val_examples:
            logging.warning("validation saw %d of %d examples (uneven shards over hosts)",
                            self.val["val_examples"], self.plan.val_examples)
        with self.writer("val").as_default(step=step):
            tf.summary.scalar("accuracy", self.val["val_accuracy"])

    def save(self, step: int) -> None:
        """Writes the checkpoint of `step` (once) and the summary beside it."""
        if step != self.saved_step:
            self.saved_path = self.training_run.checkpoints.save(step)
            self.saved_step = step
            self.write_summary()

    def write_summary(self) -> None:
        for w in self.writers.values():
            w.flush()
        if self.t.chief:
            workdir.write_summary(self.cfg.workdir, self.result())

    def result(self) -> dict[str, Any]:
        t, run = self.t, self.training_run
        step = t.step
        previous = {} if self.window else workdir.read_summary(self.cfg.workdir)
        if previous:  # nothing trained in this process: report the finished run
            return {"loss": None, "images_per_second": 0.0, **previous, "step": step,
                    "start_step": run.start_step}
        trained = bool(self.window)  # else a 0-step run: the initialisation, untrained
        return {
            "step": step, "loss": self.loss() if trained else None,
            "accuracy": self.accuracy() if trained else None,
            "images_per_second": self.timed_images / max(self.timed_seconds, 1e-9),
            "learning_rate": self.learning_rate(), "epoch": step / self.plan.steps_per_epoch,
            "start_step": run.start_step, "train_steps": self.plan.train_steps,
            "workdir": self.cfg.workdir,
            "checkpoint": self.saved_path or getattr(run.checkpoints.latest, "path", None),
            "backend": t.backend, "device": t.kind, "replicas": t.replicas,
            "bn_statistics": self.cfg.bn_statistics, "mixed_precision": t.policy,
            "jit_compile": t.jit, "steps_per_execution": t.steps_per_execution,
            "train_step_compilations": t.compilations() if trained else None,
            **({"pair_anchors": self.pair_anchors() if trained else None}
               if self.report_pairs else {}),
            **self.val, **self.hooked, **run.start_info,
        }


class _signals_set:
    """SIGTERM and SIGINT set loop.stop_requested while the loop runs (main thread only)."""

    def __init__(self, loop: Loop):
        self.loop, self.previous = loop, {}

    def _flag(self, signum, frame) -> None:
        logging.warning("signal %d: saving a checkpoint after this execution", signum)
        self.loop.stop_requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._flag)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
