"""Worker processes that can neither take the run down with them nor outlive it.

Decoding runs native code (libjpeg, libpng, libtiff, libwebp, giflib) on files nobody vouched for. A
decoder that segfaults, aborts, is killed by the out-of-memory killer or never returns must cost only
the images it was given. So the work is cut into tasks, each run by one worker process that the calling
process supervises:

- every worker has its own pipe, so a worker that dies mid-message breaks only its own (a queue shared
  by the workers can be left locked, or holding half a message, for all of them);
- a task whose worker dies, or that runs longer than ``timeout``, is lost: the worker is killed and
  replaced, and a lost task of several items is retried one item per task, so that only an item that
  loses its task again is given up (``Job.lost``, with the reason: the signal, or the timeout);
- workers die with the process that started them (``PR_SET_PDEATHSIG``), at once, instead of living
  on as orphans;
- file descriptors registered with :func:`private_fd` (an open cache and its lock) are closed in every
  process forked from this one, so a worker never holds a cache's locks.

This module knows nothing of images: ``pipeline.batches`` says what a task is.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Generic, Iterator, Sequence, TypeVar

T = TypeVar("T")  # a task
R = TypeVar("R")  # its result

DEFAULT_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_private: dict[int, tuple[int, int]] = {}  # fd -> (st_dev, st_ino) of the file it was registered for


def private_fd(fd: int) -> int:
    """Close ``fd`` in every process forked from this one from now on, until :func:`release_fd`.

    A forked child shares its parent's open files and so the locks on them: a child that outlives its
    parent (killed with SIGKILL) would keep a cache locked."""
    st = os.fstat(fd)
    _private[fd] = (st.st_dev, st.st_ino)
    return fd


def release_fd(fd: int) -> None:
    """Stop closing ``fd`` in forked children (call it before closing ``fd``)."""
    _private.pop(fd, None)


def _close_private_fds() -> None:
    for fd, identity in list(_private.items()):
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == identity:  # a number whose file was closed without release is left alone
                os.close(fd)
        except OSError:
            pass
    _private.clear()


os.register_at_fork(after_in_child=_close_private_fds)


@dataclass(frozen=True)
class Workers:
    """Where tasks run: in ``n`` worker processes, each task given ``timeout`` seconds; ``n=0`` runs them
    in this process, without isolation (a crash there ends the run, a hang hangs it)."""

    n: int
    timeout: float = DEFAULT_TIMEOUT


class Job(ABC, Generic[T, R]):
    """What the workers do with a task, and what becomes of a task that cannot be done."""

    def start(self) -> None:
        """Called once in each worker process before its first task."""

    @abstractmethod
    def run(self, task: T) -> R:
        """The result of ``task`` (in a worker process, or in this one with ``Workers(0)``)."""

    @abstractmethod
    def parts(self, task: T) -> list[T]:
        """``task`` cut into one-item tasks, each retried alone after ``task`` was lost; [] for a one-item task."""

    @abstractmethod
    def lost(self, task: T, reason: str) -> R:
        """The result of a one-item task that was lost, for ``reason``."""

    @abstractmethod
    def combine(self, results: list[R]) -> R:
        """One result from those of a task's parts, in order."""


def run_tasks(job: Job[T, R], tasks: Sequence[T], workers: Workers, window: int | None = None) -> Iterator[R]:
    """The result of every task, in order. ``window``: the tasks that may be given out at once, from the
    one the caller waits for on (default twice the workers); with as many as the workers, none runs ahead
    while the caller works on a result."""
    if workers.n == 0:
        yield from map(job.run, tasks)
        return
    pool = _Pool(job, workers, window or 2 * workers.n)
    try:
        yield from pool.results(tasks)
    finally:
        pool.close()


def describe_exit(code: int) -> str:
    """How a process ended, for people: the signal that killed it, or its exit code."""
    if code >= 0:
        return f"exited with code {code}"
    sig = signal.Signals(-code)
    oom = "; the out-of-memory killer sends it" if sig == signal.SIGKILL else ""
    return f"was killed by {sig.name} ({signal.strsignal(sig)}{oom})"


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process as soon as the thread that forked it exits (Linux), and exit now
    if the parent is already gone. Call it first thing in a child, with the parent's pid from before the fork."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the child finds its parent gone at its next message instead (EOF on its pipe)
    if os.getppid() != parent:
        os._exit(1)


@dataclass
class _Failed:
    """A task whose ``Job.run`` raised in the worker: lost, but the worker lives on."""

    reason: str


def _serve(job: Job, conn: Any, parent: int) -> None:
    """A worker: run each task received, send back its result, until the pipe closes."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle; it ends the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker does not take on the CLI's SIGTERM handler
    job.start()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        try:
            out: Any = job.run(task)
        except Exception as e:
            out = _Failed(f"{type(e).__name__}: {e}")
        try:
            conn.send(out)
        except OSError:  # the supervisor is gone
            return
        except Exception as e:  # a result that cannot be pickled
            conn.send(_Failed(f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any, job: Job):
        self.conn, child = ctx.Pipe()
        # Forked, not spawned: a worker starts in milliseconds with everything already imported.
        self.process = ctx.Process(target=_serve, args=(job, child, os.getpid()), daemon=True)
        self.process.start()
        child.close()
        self.key: Any = None  # what it is working on
        self.deadline = 0.0

    def stop(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


class _Pool:
    """Supervised workers running one task at a time each; results handed out in task order."""

    def __init__(self, job: Job, workers: Workers, window: int):
        self.job, self.timeout = job, workers.timeout
        self._ctx = multiprocessing.get_context("fork")
        self._workers = [_Worker(self._ctx, job) for _ in range(workers.n)]
        self._window = window  # tasks given out from the one the caller waits for on

    def close(self) -> None:
        for w in self._workers:
            w.stop()

    def results(self, tasks: Sequence[T]) -> Iterator[R]:
        self._todo: deque = deque(enumerate(tasks))  # (key, task): task k's key is k, its part j's (k, j)
        self._tasks: dict = {}  # key -> task, for the tasks being run
        self._done: dict[int, R] = {}
        self._parts: dict[int, list] = {}  # k -> the results of its parts (None until done)
        next_out = 0
        while next_out < len(tasks):
            self._assign(next_out)
            self._collect()
            while next_out in self._done:
                yield self._done.pop(next_out)
                next_out += 1

    def _assign(self, next_out: int) -> None:
        for i, w in enumerate(self._workers):
            if w.key is None and self._todo and self._ahead(self._todo[0][0], next_out):
                key, task = self._todo.popleft()
                try:
                    w.conn.send(task)
                except OSError:  # it died while idle (the out-of-memory killer picks any process)
                    w.stop()
                    w = self._workers[i] = _Worker(self._ctx, self.job)
                    w.conn.send(task)
                w.key, w.deadline = key, time.monotonic() + self.timeout
                self._tasks[key] = task

    def _ahead(self, key: Any, next_out: int) -> bool:
        return isinstance(key, tuple) or key < next_out + self._window

    def _collect(self) -> None:
        busy = [w for w in self._workers if w.key is not None]
        if not busy:
            return
        timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout))
        for w in busy:
            if w.conn in ready:
                try:
                    out = w.conn.recv()
                except Exception:  # EOF, or shared memory the dead worker can no longer hand over
                    self._replace(w, self._death(w))
                    continue
                key, w.key = w.key, None
                if isinstance(out, _Failed):
                    self._lose(key, out.reason)
                else:
                    self._finish(key, out)
            elif w.process.sentinel in ready:
                self._replace(w, self._death(w))
            elif time.monotonic() >= w.deadline:
                self._replace(w, f"took over {self.timeout:g} s; its worker process was killed")

    def _death(self, w: _Worker) -> str:
        w.process.join(1.0)  # a worker whose pipe broke is dead or dying
        code = w.process.exitcode
        return "crashed its worker process, which " + (describe_exit(code) if code is not None else "stopped answering")

    def _replace(self, w: _Worker, reason: str) -> None:
        key = w.key
        w.stop()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self.job)
        self._lose(key, reason)

    def _lose(self, key: Any, reason: str) -> None:
        task = self._tasks.pop(key)
        parts = [] if isinstance(key, tuple) else self.job.parts(task)
        if not parts:
            self._finish(key, self.job.lost(task, reason))
            return
        self._parts[key] = [None] * len(parts)
        self._todo.extendleft(reversed([((key, j), p) for j, p in enumerate(parts)]))

    def _finish(self, key: Any, result: R) -> None:
        self._tasks.pop(key, None)
        if not isinstance(key, tuple):
            self._done[key] = result
            return
        k, j = key
        parts = self._parts[k]
        parts[j] = result
        if all(p is not None for p in parts):
            self._done[k] = self.job.combine(self._parts.pop(k))
