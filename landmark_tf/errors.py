"""Errors that mean "the user's input is wrong", as opposed to a bug.

`UserError` is what library code raises for bad input; `BadFile` is one naming a path that cannot
be read as what it should be. `bad_input_errors()` names the standard exceptions (OS, decoding,
format) that also mean bad input when they escape from reading a user-given path: the CLI layer
turns those into the same one-line message (`describe`) instead of a traceback.
"""

from __future__ import annotations

import json
import pickle
import sys
import zipfile


class UserError(Exception):
    """Bad input, named precisely (file, line, flag): the CLI prints it on one line and exits 2."""


class BadFile(UserError):
    """A user-given path that cannot be read as it should be (a folder for a file, binary for
    text, not JSON...). `reason` is the message without the path, for callers that skip the file
    and list why (an image) instead of stopping."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


_STDLIB_BAD_INPUT = (
    UnicodeDecodeError,
    IsADirectoryError,
    NotADirectoryError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    json.JSONDecodeError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


# Optional dependencies by top-level module: the pyproject extra that installs each.
EXTRAS = {"matplotlib": "report", "apache_beam": "beam", "jax": "jax"}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The line to print for an optional dependency that is not installed; None for any other
    missing module (a broken install or a bug, which keeps its traceback)."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return f"{top} is not installed; it comes with pip install 'landmark-tf[{EXTRAS[top]}]'"


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exception kinds that mean "this file is not what it should be".

    TensorFlow's kinds are added only once TensorFlow is imported (nothing else can raise them),
    so this module stays importable before TensorFlow, which the CLIs load late.
    """
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    if errors is None:
        return _STDLIB_BAD_INPUT
    return _STDLIB_BAD_INPUT + (
        errors.NotFoundError,
        errors.FailedPreconditionError,
        errors.PermissionDeniedError,
        errors.DataLossError,
    )


def reason(error: BaseException) -> str:
    """What is wrong with the input, in a few words and without the path: for messages that
    name the path themselves."""
    if isinstance(error, UnicodeDecodeError):
        bad = error.object[error.start : error.start + 1].hex()
        return f"not UTF-8 text (byte 0x{bad} at offset {error.start})"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
    if isinstance(error, zipfile.BadZipFile):
        return f"not a zip (.npz) file ({_first_line(error)})"
    text = _first_line(error).lower()
    name = type(error).__name__
    if isinstance(error, IsADirectoryError) or "is a directory" in text:
        return "is a folder, expected a file"
    if isinstance(error, NotADirectoryError) or "not a directory" in text:
        return "a part of this path is a file, expected a folder"
    if isinstance(error, FileExistsError):
        return "is a file, expected a folder"
    if isinstance(error, FileNotFoundError) or name == "NotFoundError":
        return "not found"
    if isinstance(error, PermissionError) or name == "PermissionDeniedError":
        return "permission denied"
    if name == "DataLossError":
        return f"corrupt or truncated ({_first_line(error)})"
    return _first_line(error)


def describe(error: BaseException) -> str:
    """One line for an error that escaped without naming its path: the path where the error
    carries one, then `reason`; TensorFlow's messages already start with the path."""
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {reason(error)}"
    if type(error).__module__.startswith("tensorflow"):
        return _first_line(error)
    return reason(error)


def _first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]
