"""A small fork-first process pool for the converter.

* Workers are forked when the pool is entered: enter it before the parent opens any file (TF's
  GCS client keeps state that must not be copied mid-use) and before any TF op runs. Forking
  makes start-up instant; spawned workers would each import TensorFlow again (~6 s).
* No worker is ever re-forked later (multiprocessing.Pool would, from a parent that by then has
  threads and open files), and a worker that dies (e.g. killed for memory) fails the run with
  WorkerDied instead of leaving the parent waiting forever.
* Workers die with the parent (PR_SET_PDEATHSIG), so after a `kill -9` no orphan keeps writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

_TICK_EVERY = 8  # progress units per message from a worker
_POLL_SECONDS = 0.5


class WorkerDied(RuntimeError):
    """A worker process exited while it had work."""


class Workers:
    """`map` a module-level function over argument tuples, here (1 worker) or in N processes."""

    def __init__(self, num_workers: int):
        self.num_workers = max(1, int(num_workers))
        self._procs: list = []

    def __enter__(self) -> Workers:
        if self.num_workers > 1:
            ctx = multiprocessing.get_context("fork")
            self._jobs, self._results = ctx.Queue(), ctx.Queue()
            args = (self._jobs, self._results, os.getpid())
            self._procs = [ctx.Process(target=_loop, args=args, daemon=True)
                           for _ in range(self.num_workers)]
            with warnings.catch_warnings():  # 3.12+: "multi-threaded, fork() may deadlock"
                warnings.simplefilter("ignore", DeprecationWarning)
                for p in self._procs:
                    p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in self._procs:
            p.kill()
        for p in self._procs:
            p.join()
        if self._procs:
            for q in (self._jobs, self._results):
                q.cancel_join_thread()  # unsent jobs must not block the parent's exit
                q.close()
        self._procs = []

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple],
        on_progress: Callable[[int], Any] | None = None,
    ) -> list:
        """[fn(*item) for item in items], in order. With `on_progress`, fn is called as
        fn(*item, progress) and each progress() call (one unit) reaches on_progress(n)."""
        if not self._procs:
            extra = (lambda: on_progress(1),) if on_progress else ()
            return [fn(*item, *extra) for item in items]
        for i, item in enumerate(items):
            self._jobs.put((i, fn, tuple(item), on_progress is not None))
        done: dict[int, Any] = {}
        while len(done) < len(items):
            try:
                kind, key, value = self._results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                self._check_alive()
                continue
            if kind == "tick":
                on_progress(key)
            elif kind == "done":
                done[key] = value
            else:
                raise value
        return [done[i] for i in range(len(items))]

    def _check_alive(self) -> None:
        for p in self._procs:
            if p.exitcode is not None:
                raise WorkerDied(
                    f"worker process {p.pid} died (exit code {p.exitcode}; killed for memory?); "
                    "rerun the same command to resume"
                )


class _Ticker:
    def __init__(self, results):
        self.results, self.count = results, 0

    def __call__(self) -> None:
        self.count += 1
        if self.count == _TICK_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.count:
            self.results.put(("tick", self.count, None))
            self.count = 0


def _loop(jobs, results, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    while True:
        index, fn, args, with_progress = jobs.get()
        ticker = _Ticker(results)
        try:
            value = fn(*args, ticker) if with_progress else fn(*args)
            ticker.flush()
            results.put(("done", index, value))
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent
            results.put(("error", index, _portable(e)))


def _portable(e: Exception) -> Exception:
    """The exception itself when it survives pickling (e.g. UserError), else a RuntimeError with
    its type, message and traceback (TF's errors cannot be unpickled)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"in a worker: {type(e).__name__}: {e}\n{traceback.format_exc()}")


def _die_with_parent(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
