"""The run folder: one owner for its layout, its rows and what happens when a run is written into again.

Layout (every path stored inside is relative to the folder, so a run can be moved, copied or archived
and used from any directory)::

    RUN/leaderboard.json|.csv   the rows (``Row``), best first within each task
    RUN/protocols/<task>.json   each task's evaluation protocol (pipeline.protocol)
    RUN/heads/<name>.skops      fitted heads, each with <name>.json (its card: classes, feature specs)
                                and <name>.predictions.csv (the scored samples: id, true, predicted)
    RUN/finetune/<name>.predictions.csv   the same for rows of fine-tuned networks (the model folder
                                is wherever ``finetune --out`` put it; the row points at it)
    RUN/run.json                every stage that wrote here: command, parameters, versions, machine
                                (an ``audit --run RUN`` too, with where its page is)

Writing rows into a run that has some merges by row key (a row of the same backbone, feature spec,
tap, task and head is replaced; the others stay) and ranks and tests every task again. Rows are only merged
under the same protocol: a task evaluated on other images is refused unless the run is overwritten.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PipelineError
from .files import atomic_path
from .kinds import get_kind
from .protocol import Protocol, check_same, rank_and_test

LEADERBOARD, RUN_FILE, REPORT_FILE = "leaderboard", "run.json", "report.html"
HEADS, PROTOCOLS, FINETUNE = "heads", "protocols", "finetune"


@dataclass
class Row:
    """One leaderboard row: a model of one task scored under a protocol.

    ``stage`` is ``fit`` (a scikit-learn head on cached features) or ``finetune`` (a fine-tuned network);
    ``head_file`` is the head, or the fine-tuned model's folder, relative to the run folder; ``metrics``
    are the task kind's columns (``accuracy``, ``acc_low``, ... for classification); ``protocol`` is the
    id of the protocol the row was scored under, and ``comparable`` says whether it is the task's;
    ``spec`` is the key of the feature spec the features came through (``+``-joined when concatenated).
    """

    backbone: str
    weights: str
    tap: str
    task: str
    head: str
    eval: str
    spec: str = ""
    protocol: str = ""
    stage: str = "fit"
    task_kind: str = "classification"
    n_train: int | None = None
    n_test: int | None = None
    metrics: dict = field(default_factory=dict)
    fit_seconds: float | None = None
    p_vs_best: float | None = None
    same_as_best: bool | None = None
    p_above_chance: float | None = None
    above_chance: bool | None = None
    comparable: bool = True
    head_file: str = ""
    predictions: str = ""
    cache: str = ""
    error: str = ""

    @property
    def key(self) -> tuple:
        """What a re-run replaces: the same model of the same task on the same features (a fine-tune: the
        same model folder)."""
        return (self.stage, self.backbone, self.spec, self.tap, self.task, self.head,
                self.head_file if self.stage == "finetune" else "")

    @property
    def scored(self) -> bool:
        return bool(self.metrics) and self.metrics.get(get_kind(self.task_kind).primary) is not None

    @property
    def score(self) -> float | None:
        """The kind's primary metric (accuracy for classification)."""
        return self.metrics.get(get_kind(self.task_kind).primary)

    def rank_key(self) -> tuple:
        return get_kind(self.task_kind).rank_key(self.metrics, self.fit_seconds)

    def to_dict(self) -> dict:
        """Flat: the metrics are columns beside the others, as in the CSV."""
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "metrics"}, **d["metrics"]}

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}, metrics={k: v for k, v in d.items() if k not in names})


def columns(kinds: Sequence[str]) -> list[str]:
    """The leaderboard's columns: identity, the kinds' metric columns, tests, files."""
    metric_cols = list(dict.fromkeys(c for k in kinds for c in get_kind(k).columns))
    return ["backbone", "weights", "spec", "tap", "task", "head", "eval", "n_train", "n_test", *metric_cols,
            "p_vs_best", "same_as_best", "p_above_chance", "above_chance", "fit_seconds", "comparable", "protocol",
            "stage", "task_kind", "head_file", "predictions", "cache", "error"]


class RunFolder:
    """A run folder on disk (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._protocols: dict[str, Protocol | None] = {}

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def exists(self) -> bool:
        return (self.path / f"{LEADERBOARD}.json").is_file()

    def rows(self) -> list[Row]:
        path = self.path / f"{LEADERBOARD}.json"
        if not path.is_file():
            return []
        return [Row.from_dict(d) for d in json.loads(path.read_text())]

    def protocol(self, task: str) -> Protocol | None:
        if task not in self._protocols:
            path = self._protocol_path(task)
            self._protocols[task] = Protocol.load(path) if path.is_file() else None
        return self._protocols[task]

    def protocols(self) -> dict[str, Protocol]:
        folder = self.path / PROTOCOLS
        found = (Protocol.load(p) for p in sorted(folder.glob("*.json"))) if folder.is_dir() else ()
        self._protocols.update({p.task: p for p in found})
        return {t: p for t, p in self._protocols.items() if p is not None}

    def check_protocol(self, proposed: Protocol) -> Protocol:
        """The run's protocol of ``proposed.task``: the stored one when it is the same, ``proposed`` when
        the run has none; a different one is refused (see ``check_same``)."""
        stored = self.protocol(proposed.task)
        if stored is not None:
            check_same(stored, proposed, str(self.path))
        return proposed

    def save_protocol(self, protocol: Protocol) -> None:
        protocol.save(self._protocol_path(protocol.task))
        self._protocols[protocol.task] = protocol

    def head_path(self, name: str) -> Path:
        return self.path / HEADS / f"{slug(name)}.skops"

    def predictions_path(self, row: Row) -> Path:
        if row.stage == "finetune":
            return self.path / FINETUNE / f"{slug(f'{row.task}__{Path(row.head_file).name}__{row.head}')}.predictions.csv"
        return self.resolve(row.head_file).with_suffix(".predictions.csv")

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` as stored in the run: relative to the run folder, with forward slashes."""
        return Path(os.path.relpath(Path(path).resolve(), self.path.resolve())).as_posix()

    def resolve(self, stored: str) -> Path:
        return self.path / stored

    def write_predictions(self, row: Row, ids: Sequence, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        """The scored samples of ``row`` (``id,true,predicted``, in the task kind's cells); sets
        ``row.predictions``."""
        kind, names = get_kind(row.task_kind), self._names(row)
        path = self.predictions_path(row)
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(("id", "true", "predicted"))
            writer.writerows(zip(ids, kind.format(y_true), kind.format_predictions(y_pred, names)))
        row.predictions = self.relative(path)

    def read_predictions(self, row: Row) -> tuple[list[str], np.ndarray, np.ndarray]:
        """A row's scored samples: ids, true values and predictions, in the task kind's form."""
        path = self.resolve(row.predictions)
        if not row.predictions or not path.is_file():
            raise PipelineError(f"row {row.head} of task {row.task!r} has no saved predictions ({path})")
        with open(path, newline="") as fh:
            saved = list(csv.DictReader(fh))
        kind = get_kind(row.task_kind)
        true = kind.parse([p["true"] for p in saved], [str(path)] * len(saved))
        return [p["id"] for p in saved], true, kind.parse_predictions([p["predicted"] for p in saved], self._names(row))

    def add_rows(self, new: Sequence[Row]) -> list[Row]:
        """Merge ``new`` into the run's rows by key, rank and test every task again, write the leaderboard."""
        keys = {r.key for r in new}
        rows = [r for r in self.rows() if r.key not in keys] + list(new)
        rows = rank_and_test(rows, self.protocols(), self.read_predictions)
        self._write_leaderboard(rows)
        return rows

    def best_row(self, task: str | None = None) -> Row:
        """The task's best comparable row (the first task's by default): what ``predict RUN`` uses."""
        rows = self.rows()
        task = task or (rows[0].task if rows else None)
        best = best_row(rows, task)
        if best is None:
            tasks = ", ".join(dict.fromkeys(r.task for r in rows)) or "none"
            raise PipelineError(f"{self.path}: no scored row for task {task!r} (tasks: {tasks})")
        return best

    def clear(self) -> None:
        """Remove what the run folder owns (``--overwrite``); files it does not own stay."""
        self._protocols.clear()
        for name in (HEADS, PROTOCOLS, FINETUNE):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for pattern in (f"{LEADERBOARD}.*", RUN_FILE, REPORT_FILE, "confusion_*.png", "fewshot*"):
            for p in self.path.glob(pattern):
                p.unlink()

    def record(self, stage: str, parameters: dict, seconds: float, timings: dict | None = None) -> Path:
        """Add to ``run.json`` the command line, parameters, library versions and machine of a stage, and
        where its time went (``timings``), when it says."""
        from .cache import library_versions

        path = self.path / RUN_FILE
        old = json.loads(path.read_text()) if path.is_file() else []
        entry = dict(stage=stage, command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), parameters=parameters,
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(seconds, 2),
                     versions={**library_versions(), "python": platform.python_version()},
                     machine=f"{platform.node()} ({platform.platform()}, {os.cpu_count()} cores)",
                     **({"timings": timings} if timings else {}))
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(old + [entry], indent=1, default=str))
        return path

    def history(self) -> list[dict]:
        path = self.path / RUN_FILE
        return json.loads(path.read_text()) if path.is_file() else []

    def _names(self, row: Row) -> list[str]:
        protocol = self.protocol(row.task)
        return protocol.names if protocol is not None else []

    def audit_page(self) -> Path | None:
        """The page of the last ``audit`` recorded into this run (``audit --run``), if it is still there."""
        pages = [self.resolve(h["parameters"]["page"]) for h in self.history() if h["stage"] == "audit"]
        return pages[-1] if pages and pages[-1].is_file() else None

    def _protocol_path(self, task: str) -> Path:
        return self.path / PROTOCOLS / f"{slug(task)}.json"

    def _write_leaderboard(self, rows: list[Row]) -> None:
        dicts = [r.to_dict() for r in rows]
        cols = columns(dict.fromkeys(r.task_kind for r in rows))
        with atomic_path(self.path / f"{LEADERBOARD}.csv") as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(dicts)
        with atomic_path(self.path / f"{LEADERBOARD}.json") as tmp:
            tmp.write_text(json.dumps(dicts, indent=1, default=_jsonable))


def best_row(rows: Sequence[Row], task: str | None = None, linear: bool = False, backbone: str | None = None,
             weights: str | None = None) -> Row | None:
    """The best row that is scored under its task's protocol and has a model, optionally of ``task``, of
    a linear head, of ``backbone``, of ``weights``. Rows are kept best first within each task, so it is
    the first that matches."""
    from .heads import is_linear

    return next((r for r in rows if r.comparable and r.scored and r.head_file
                 and (task is None or r.task == task) and (backbone is None or r.backbone == backbone)
                 and (weights is None or r.weights == weights) and (not linear or is_linear(r.head, r.task_kind))), None)


def slug(text: str) -> str:
    """``text`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v)}")
