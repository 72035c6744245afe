"""Keeps TensorFlow's native start-up lines off the user's stderr, whatever the CPU.

On CPUs with AVX-512, TF 2.21 writes `WARNING: All log messages before absl::InitializeLog() is
called are written to STDERR` and an `I0000 ... port.cc:153] oneDNN custom operations are on`
line to file descriptor 2 while it loads, whatever TF_CPP_MIN_LOG_LEVEL says. They break the
"one line on stderr" promise of every CLI and bury the package's own output.

`install()` points fd 2 at a pipe read by a small child process that copies everything to the
real stderr except those lines: native INFO-level log lines (`I<mmdd> <time> <tid> file:line] `,
which TF_CPP_MIN_LOG_LEVEL=2 means to hide) and absl's pre-initialisation banner. Warnings,
errors, fatal check failures, Python tracebacks and progress bars pass unchanged. A child rather
than a thread, so nothing is lost when the process dies abruptly (abort, kill -9): the child
drains the pipe to its end. It ignores SIGINT/SIGTERM so a preempted run can still report.
`--verbosity=1` (absl's debug level) or LANDMARK_TF_NATIVE_LOG=1 shows the native lines.

When stdout and stderr are one file or pipe (`>log 2>&1`, `2>&1 | tee`), stdout goes through the
same pipe: the child then writes both in the order the program wrote them, so the closing JSON
line stays last and no line is spliced into another. A terminal's stdout is left alone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import subprocess
import sys

_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# A native INFO line: I<mmdd> <hh:mm:ss.micros> <thread id> <file>:<line>] <message>
_INFO = re.compile(rb"I\d{4} [\d:.]+ +\d+ [\w./+-]+:\d+\] ")
# Every prefix of such a line, so a line that arrives in pieces is held until it is decided.
_INFO_PREFIX = re.compile(
    rb"I(\d{0,4}|\d{4} [\d:.]*|\d{4} [\d:.]+ +\d*|\d{4} [\d:.]+ +\d+ [\w./+-]*(:\d*\]?)?)")
HOLD_SECONDS = 0.5  # a held partial line that gets no more bytes for this long is written out
ENV = "LANDMARK_TF_NATIVE_LOG"


def is_noise(line: bytes) -> bool:
    """True for a whole line (newline optional) that the filter drops."""
    line = line.rstrip(b"\r\n")
    return line == _BANNER or _INFO.match(line) is not None


def may_become_noise(partial: bytes) -> bool:
    """True while an unfinished line could still turn out to be one that `is_noise` drops."""
    return (_BANNER.startswith(partial) or partial.startswith(_BANNER)
            or _INFO.match(partial) is not None or _INFO_PREFIX.fullmatch(partial) is not None)


class LineFilter:
    """Feeds bytes in, gets the bytes to write out; whole noise lines vanish, the rest passes as
    soon as it cannot be noise (so `\\r` progress bars update live)."""

    def __init__(self) -> None:
        self._held = b""  # start of the current line, undecided
        self._passing = False  # the current line is already known not to be noise

    def feed(self, data: bytes) -> bytes:
        out = []
        # Split on "\n" only: a "\r" (progress bars) continues the line it is in.
        pieces = [p + b"\n" for p in data.split(b"\n")]
        pieces[-1] = pieces[-1][:-1]
        for piece in filter(None, pieces):
            complete = piece.endswith(b"\n")
            if self._passing:
                out.append(piece)
            else:
                line = self._held + piece
                self._held = b""
                if complete:
                    out.append(b"" if is_noise(line) else line)
                elif may_become_noise(line):
                    self._held = line
                else:
                    out.append(line)
                    self._passing = True
            if complete:
                self._passing = False
        return b"".join(out)

    def flush(self) -> bytes:
        """Gives up on the held partial line (no more bytes came): it is written as it is."""
        held, self._held = self._held, b""
        self._passing = bool(held)
        return held


def _child_main() -> None:
    """The filter process: stdin is the pipe, stdout the user's real stderr."""
    import select
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    line_filter = LineFilter()
    while True:
        ready, _, _ = select.select([0], [], [], HOLD_SECONDS)
        data = os.read(0, 1 << 16) if ready else None
        if data == b"":
            os.write(1, line_filter.flush())
            return
        out = line_filter.feed(data) if data else line_filter.flush()
        while out:
            out = out[os.write(1, out):]


def wants_native_log(argv: list[str]) -> bool:
    """--verbosity/-v of 1 or more (absl's debug level), or LANDMARK_TF_NATIVE_LOG=1."""
    if os.environ.get(ENV, "") not in ("", "0"):
        return True
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--verbosity", "-v"):
            if not eq and i + 1 < len(argv):
                value = argv[i + 1]
            try:
                return int(value) >= 1
            except ValueError:
                return False
    return False


def _one_destination(a: int, b: int) -> bool:
    """fds `a` and `b` are the same file or pipe (and not a terminal)."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and not os.isatty(a)


def install(argv: list[str]) -> subprocess.Popen | None:
    """Routes this process's fd 2 (and fd 1 when it is the same destination) through the
    filter child; call before TensorFlow is imported.

    Returns the child (None when the user asked to see native lines, or fd 2 is not open).
    """
    if wants_native_log(argv):
        return None
    try:
        os.fstat(2)
    except OSError:
        return None
    merge_stdout = _one_destination(1, 2)
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-S", "-c", "from landmark_tf.cli.native_log import _child_main; "
         "_child_main()"],
        stdin=read_end, stdout=2, stderr=2, close_fds=True,
        env={**os.environ, "PYTHONPATH": _package_parent()})
    os.close(read_end)
    sys.stdout.flush()
    sys.stderr.flush()
    real = {fd: os.dup(fd) for fd in ((1, 2) if merge_stdout else (2,))}
    for fd in real:
        os.dup2(write_end, fd)
    os.close(write_end)
    atexit.register(_drain, child, real)
    return child


def _drain(child: subprocess.Popen, real: dict[int, int]) -> None:
    """At exit: close our ends of the pipe and let the child write the rest before we return, so
    the shell prompt never comes before the last line (worker processes may hold the pipe longer:
    the child then finishes on its own)."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, saved in real.items():
        os.dup2(saved, fd)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=2)


def _package_parent() -> str:
    """The folder holding `landmark_tf`, so the `-S` child imports this very module."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(os.path.dirname(here))
