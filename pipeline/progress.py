"""The one owner of progress for every stage, on stderr so stdout stays clean for tables and CSV.

On a terminal it draws rich's bars. Anywhere else (a log file, a pipe, a job scheduler) a bar would be
drawn only when the command ends, so it writes a plain line instead, at most every
:data:`LOG_EVERY_SECONDS` and at the end: ``fit 3/18 (17 %) 41 s, about 3 min left``. The mode is set
once per process by :func:`set_progress_mode` (the CLI's ``--quiet`` and ``--log-json``):

- ``auto``: bars on a terminal, lines elsewhere;
- ``quiet``: nothing;
- ``json``: one JSON object per line (``{"task": "fit", "done": 3, "total": 18, "seconds": 41.0}``), for
  machines.

Stages also say single events through :func:`say` (a fold's kept epoch, a finished step), which follows
the same mode. Notes, warnings, errors and interruptions go through :func:`tell`: never silenced, and under
``json`` objects too, as are Python warnings and log records, so that a machine reading stderr reads
nothing but JSON lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

MODES = ("auto", "quiet", "json")
LOG_EVERY_SECONDS = 10.0
_mode = {"mode": "auto"}


def set_progress_mode(mode: str) -> None:
    """How every stage of this process reports progress: one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode["mode"] = mode
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonLogHandler)]:
        root.removeHandler(handler)
    if warnings.showwarning is _warning_as_json:
        warnings.showwarning = _warning_as_json.plain
    if mode == "json":
        _warning_as_json.plain, warnings.showwarning = warnings.showwarning, _warning_as_json
        root.addHandler(_JsonLogHandler())


def progress_mode() -> str:
    return _mode["mode"]


def progress_bar(enabled: bool = True) -> "Progress | LogProgress":
    """A progress display for a stage: rich's bars on a terminal, lines in a log (see the module)."""
    mode = progress_mode()
    if enabled and mode == "auto" and sys.stderr.isatty():
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True),
        )
    return LogProgress(enabled and mode != "quiet", as_json=mode == "json")


def say(message: str, **fields) -> None:
    """One event of a stage (``fold 2: kept epoch 3, selection accuracy 0.91``) on stderr, in the
    process's mode: nothing when quiet, a JSON object with ``fields`` under ``--log-json``."""
    mode = progress_mode()
    if mode == "quiet":
        return
    line = json.dumps({"event": message, **fields}) if mode == "json" else message
    print(line, file=sys.stderr, flush=True)


def tell(level: str, message: str, **fields) -> None:
    """A line for whoever reads stderr: ``level`` is ``note``, ``warning``, ``error`` or ``interrupted``
    (``note: ...``), or empty for a bare message. Printed in every mode, quiet too; under ``json`` as
    ``{"level": ..., "message": ...}`` with ``fields``."""
    if progress_mode() == "json":
        line = json.dumps({"level": level or "note", "message": message, **fields})
    else:
        line = f"{level}: {message}" if level else message
    print(line, file=sys.stderr, flush=True)


def _warning_as_json(message, category, filename, lineno, file=None, line=None) -> None:
    tell("warning", str(message), category=category.__name__, source=f"{filename}:{lineno}")


class _JsonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tell(record.levelname.lower(), record.getMessage(), logger=record.name)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    shown: float = field(default_factory=time.monotonic)


class LogProgress:
    """The subset of rich's ``Progress`` the stages use (``add_task``, ``advance``, ``update``), written
    as a line every :data:`LOG_EVERY_SECONDS` and when a task completes."""

    def __init__(self, enabled: bool = True, as_json: bool = False, every: float = LOG_EVERY_SECONDS):
        self.enabled, self.as_json, self.every = enabled, as_json, every
        self._tasks: list[_Task] = []

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        for i, task in enumerate(self._tasks):
            if task.completed < (task.total or 0) and task.completed > 0:
                self._show(i, force=True)  # where an interrupted or failed task stopped

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        self._tasks.append(_Task(description, total, completed))
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None,
               description: str | None = None, total: float | None = None, **_) -> None:
        task = self._tasks[task_id]
        task.completed = task.completed + advance if completed is None else completed
        task.description = description or task.description
        task.total = task.total if total is None else total
        self._show(task_id, force=task.total is not None and task.completed >= task.total)

    def _show(self, task_id: int, force: bool = False) -> None:
        task, now = self._tasks[task_id], time.monotonic()
        if not self.enabled or (not force and now - task.shown < self.every):
            return
        task.shown = now
        print(self._line(task, now - task.started), file=sys.stderr, flush=True)

    def _line(self, task: _Task, seconds: float) -> str:
        if self.as_json:
            return json.dumps(dict(task=task.description, done=task.completed, total=task.total,
                                   seconds=round(seconds, 1)))
        done, total = f"{task.completed:g}", task.total
        if not total:
            return f"{task.description} {done} {_duration(seconds)}"
        share = task.completed / total
        left = f", about {_duration(seconds * (1 - share) / share)} left" if 0 < share < 1 else ""
        return f"{task.description} {done}/{total:g} ({share:.0%}) {_duration(seconds)}{left}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
