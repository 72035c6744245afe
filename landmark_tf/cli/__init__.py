"""Thin absl apps, one per stage: flags -> config object -> one library call -> one JSON line.

`python -m landmark_tf.cli.NAME` runs NAME exactly as its console script (`entry`) does: this
package is imported before the module runs, and before TensorFlow is, so the filter of TF's
start-up lines (`native_log`) goes in here.
"""

import os
import sys

# Before any CLI module imports TensorFlow: keep its C++ start-up chatter off the user's screen.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _module_run_args() -> list[str] | None:
    """The arguments after `-m landmark_tf.cli.NAME` while Python locates that module (sys.argv
    is then ["-m"]), else None."""
    if sys.argv[:1] != ["-m"]:
        return None
    argv = getattr(sys, "orig_argv", [])
    for i, arg in enumerate(argv):
        name, rest = (argv[i + 1], i + 2) if arg == "-m" and i + 1 < len(argv) else (
            (arg[2:], i + 1) if arg.startswith("-m") and len(arg) > 2 else (None, 0))
        if name is not None:
            return argv[rest:] if name.startswith(__name__ + ".") else None
    return None


if (_args := _module_run_args()) is not None:
    from landmark_tf.cli import native_log

    native_log.install(_args)
