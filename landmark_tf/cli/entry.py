"""The console scripts' entry points (pyproject `[project.scripts]`).

Each filters TensorFlow's native start-up lines out of stderr (`native_log`) before the CLI
module, and with it TensorFlow, is imported, then runs that CLI's `run()`.
"""

from __future__ import annotations

import importlib
import sys

from landmark_tf.cli import native_log


def launch(module: str) -> None:
    """Imports `module` (a CLI module, e.g. `landmark_tf.cli.train`) behind the filter; runs it."""
    native_log.install(sys.argv)
    importlib.import_module(module).run()


def synth() -> None:
    launch("landmark_tf.cli.synth")


def tfrecords() -> None:
    launch("landmark_tf.cli.tfrecords")


def train() -> None:
    launch("landmark_tf.cli.train")


def export() -> None:
    launch("landmark_tf.cli.export")


def ensemble() -> None:
    launch("landmark_tf.cli.ensemble")


def embed() -> None:
    launch("landmark_tf.cli.embed")


def evaluate() -> None:
    launch("landmark_tf.cli.evaluate")


def clean() -> None:
    launch("landmark_tf.cli.clean")


def pseudolabel() -> None:
    launch("landmark_tf.cli.pseudolabel")


def report() -> None:
    launch("landmark_tf.cli.report")
