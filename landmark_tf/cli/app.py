"""What every landmark-* entry point shares: error handling and the closing JSON line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from landmark_tf import errors
from landmark_tf.errors import UserError


def print_result(result: dict[str, Any]) -> None:
    """Prints the stage's results as one JSON line; it must be the last line on stdout."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True, default=_json_default), flush=True)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


_HELP_ARGS = ("-h", "-?", "--help", "--helpshort")


def _print_help(module_name: str) -> None:
    """absl's --help lists only flags of `__main__`, which for a console script is the wrapper:
    print the CLI module's docstring and its own flags instead."""
    module = sys.modules[module_name]
    print((module.__doc__ or "").strip() + "\n")
    print(flags.FLAGS.module_help(module_name))
    print("\n--flagfile=FILE reads flags from a file; --helpfull lists every flag.")


def _fail(prog: str, message: str) -> None:
    """One line on stderr (a message spread over lines is joined), exit 2."""
    line = " ".join(message.split()) or "bad input"
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_main(main: Callable[[list[str]], Any], prog: str) -> None:
    """Runs an absl `main`; a `UserError` becomes one line on stderr and exit code 2.

    Args:
      main: absl main taking argv; returns a dict printed as the closing JSON line, or None.
      prog: the console-script name, used as the message prefix.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if any(arg in _HELP_ARGS for arg in sys.argv[1:]):
        try:
            _print_help(main.__module__)
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            result = main(argv)
        except UserError as e:
            _fail(prog, str(e))
        except ModuleNotFoundError as e:
            if errors.missing_extra(e) is None:
                raise
            _fail(prog, errors.missing_extra(e))
        except errors.bad_input_errors() as e:
            # A reader that does not name its path yet: still one line, not a traceback.
            _fail(prog, errors.describe(e))
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
        if result is not None:
            print_result(result)

    def parse(argv: list[str]) -> list[str]:
        # absl's own parser prints two lines and exits 1 on a bad flag.
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            _fail(prog, str(e))

    app.run(wrapped, flags_parser=parse)
