"""The console scripts' entry points (pyproject `[project.scripts]`).

Each filters TensorFlow's native start-up lines out of stderr (`native_log`) before the CLI
module, and with it TensorFlow, is imported, then runs that CLI's `run()`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from landmark_tf.cli import native_log


def launch(module: str) -> None:
    """Imports `module` (a CLI module, e.g. `landmark_tf.cli.train`) behind the filter; runs it."""
    native_log.install(sys.argv)
    importlib.import_module(module).run()


def _entry(name: str) -> Callable[[], None]:
    """The console-script function for landmark_tf/cli/<name>.py."""

    def run() -> None:
        launch(f"landmark_tf.cli.{name}")

    run.__name__ = run.__qualname__ = name
    return run


synth = _entry("synth")
tfrecords = _entry("tfrecords")
train = _entry("train")
export = _entry("export")
ensemble = _entry("ensemble")
embed = _entry("embed")
evaluate = _entry("evaluate")
clean = _entry("clean")
pseudolabel = _entry("pseudolabel")
report = _entry("report")
