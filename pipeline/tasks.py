"""Tasks: label tables (``id,<kind column>[,split][,group]``) joined to a cache by sample id.

The cache's own labels (from the folder layout or the manifest) are the default task; every label file
is one more task over the same features, at no extraction cost. The header's label column names the
task's kind (``label``: classification; see :mod:`pipeline.kinds`), which reads the cells. An optional
``group`` column names the images that are not independent (several photos of one object or patient):
cross-validation keeps each group in one fold (an empty cell: a group of its own).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache import FeatureCache
from .data import check_split
from .errors import PipelineError
from .evaluation import Labelled, RunFolder, eval_split, open_task
from .kinds import get_kind, kind_of_columns


@dataclass
class Task:
    """A named label table of one kind; ``splits`` is None when the table has no split column (the
    cache's are used), ``groups`` when it has no group column."""

    name: str
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray | None = None
    kind: str = "classification"
    groups: np.ndarray | None = None


@dataclass
class TaskData:
    """A task's features and labels, valid rows only, ready for scikit-learn."""

    task: str
    ids: np.ndarray
    X: np.ndarray | None  # None when joined with ``load=False``
    y: np.ndarray
    splits: np.ndarray
    left_out: np.ndarray  # ids of labelled rows left out: their image failed, is not in the cache (yet) or is no longer listed
    rows: np.ndarray  # each sample's row in the cache
    kind: str = "classification"
    groups: np.ndarray | None = None  # each sample's group ("": none); None without a group column

    @property
    def dropped(self) -> int:
        """How many labelled rows were left out."""
        return len(self.left_out)

    def left_out_note(self, where: str) -> str:
        """``2 labelled image(s) have no features in WHERE (such as 'a.jpg')`` ("" where none was left out)."""
        if not self.dropped:
            return ""
        return f"{self.dropped} labelled image(s) have no features in {where} (such as {str(self.left_out[0])!r})"

    @property
    def holdout_split(self) -> str | None:
        """The split evaluated on (see :func:`pipeline.evaluation.eval_split`); None means cross-validation."""
        return eval_split(self.splits)

    def holdout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``X_train, y_train, X_test, y_test`` for the task's train and held-out split."""
        split = self.holdout_split
        if split is None:
            raise PipelineError(f"task {self.task!r} has no train and val/test splits; its cross-validation folds "
                                "are task.folds()")
        tr, te = self.splits == "train", self.splits == split
        return self.X[tr], self.y[tr], self.X[te], self.y[te]

    def folds(self, cv: int = 5, seed: int = 0, run: str | os.PathLike | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, test) indices into this task's rows as ``fit`` evaluates it (a run's protocol, when
        ``run`` holds the task): the held-out split, or ``cv`` seeded folds for data without one, each group
        in one fold. A scikit-learn ``cv=`` argument: ``cross_val_score(est, task.X, task.y, cv=task.folds())``."""
        labelled = Labelled(self.task, self.kind, self.ids, self.y, self.splits, self.groups)
        protocol, _ = open_task(labelled, cv, seed, RunFolder(run) if run is not None else None, "within")
        position = {sid: i for i, sid in enumerate(self.ids)}
        at = np.array([position[sid] for sid in protocol.ids], np.int64)
        return [(at[train], at[test]) for train, test in protocol.splits()]


def read_labels(path: str | os.PathLike) -> Task:
    """Read a label table: a CSV with an ``id`` column, the label column of its kind (``label``) and
    optional ``split`` and ``group`` columns. Read a row at a time into columns, each distinct label,
    split or group one object: ten million rows hold their ids and little else."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            columns = next(reader, [])
            if not columns:
                raise PipelineError(f"{path}: empty; a label file is a CSV with a header line id,label[,split][,group]")
            if "id" not in columns:
                raise PipelineError(f"{path}: missing column(s) id; a label file is id,label[,split][,group]")
            kind = kind_of_columns(columns, str(path))
            wanted = [c for c in ("id", kind.column, "split", "group") if c in columns]
            cells = _columns(reader, path, columns, wanted)
    except FileNotFoundError:
        raise PipelineError(f"label file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if not len(cells["id"]):
        raise PipelineError(f"{path}: no rows")
    col = lambda c: np.array(cells[c], dtype=object) if c in cells else None  # noqa: E731
    labels = kind.parse(cells.get(kind.column, [""] * len(cells["id"])), _Lines(path, len(cells["id"])))
    return Task(path.stem, col("id"), labels, col("split"), kind.name, col("group"))


def _columns(reader, path: Path, columns: list[str], wanted: list[str]) -> dict[str, list[str]]:
    """The ``wanted`` columns of a label file's rows (blank lines skipped, a missing cell empty, each
    cell stripped; labels, splits and groups shared): an error names a row with more fields than the
    header, an empty or duplicate id, or an unknown split."""
    at = [columns.index(c) for c in wanted]
    cells: dict[str, list[str]] = {c: [] for c in wanted}
    lists, shared, seen = [cells[c] for c in wanted], {}, set()
    split = wanted.index("split") if "split" in cells else None
    for line, row in enumerate(filter(None, reader), start=2):
        if len(row) > len(columns):
            raise PipelineError(f"{path}:{line}: {len(row)} fields, but the header has "
                                f"{len(columns)} ({','.join(columns)}); quote a value that holds a comma")
        values = [row[k].strip() if k < len(row) else "" for k in at]
        sid = values[0]
        if not sid:
            raise PipelineError(f"{path}:{line}: empty id")
        if sid in seen:
            raise PipelineError(f"{path}:{line}: duplicate id {sid!r} (first on line {cells['id'].index(sid) + 2})")
        seen.add(sid)
        if split is not None:
            check_split(values[split], f"{path}:{line}")
        lists[0].append(sid)
        for out, value in zip(lists[1:], values[1:]):
            out.append(shared.setdefault(value, value))
    return cells


class _Lines(Sequence[str]):
    """``path:line`` of each row of a label file, made where an error names one."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows = path, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> str:
        return f"{self.path}:{range(2, self.rows + 2)[i]}"


def label_files(labels: Sequence[str | os.PathLike]) -> list[Path]:
    """Label files, a folder standing for every ``*.csv`` in it."""
    files = []
    for item in map(Path, labels):
        if item.is_dir():
            found = sorted(item.glob("*.csv"))
            if not found:
                raise PipelineError(f"label folder {item} holds no *.csv label files")
            files += found
        else:
            files.append(item)
    return files


def cache_task(cache: FeatureCache) -> Task:
    """The default task: the labels and splits stored in the cache from its source."""
    ids, labels = cache.ids, cache.labels
    has = labels != ""
    name = str(cache.attrs.get("source") or "labels")
    kind = get_kind(str(cache.attrs.get("label_kind", "classification")))
    values = kind.parse(list(labels[has]), [f"{cache.path.name}: {i}" for i in ids[has]])
    return Task(name, ids[has], values, cache.splits[has], kind.name)


def join_task(cache: FeatureCache, task: Task, tap: str = "pooled", load: bool = True) -> TaskData:
    """Features of ``task``'s samples from ``cache`` (only their rows with ``load=False``). Samples the
    cache holds no current features of (failed, not extracted yet, or no longer listed) are left out and
    listed in ``left_out``; a task none of whose ids the cache knows is an error (ids of another form)."""
    rows = cache.find_rows(task.ids)
    if not (rows >= 0).any():
        try:
            cache.rows_of(task.ids)
        except PipelineError as e:
            raise PipelineError(f"task {task.name!r}: {e}") from None
    valid = rows >= 0
    valid[valid] = cache.current[rows[valid]]
    splits = task.splits if task.splits is not None else cache.splits[np.where(valid, rows, 0)]
    rows = rows[valid]
    return TaskData(
        task=task.name, ids=task.ids[valid], X=cache.features(tap, rows) if load else None, y=task.labels[valid],
        splits=np.asarray(splits)[valid], left_out=task.ids[~valid], rows=rows, kind=task.kind,
        groups=None if task.groups is None else task.groups[valid],
    )


def load_task(cache: str | os.PathLike | FeatureCache, labels: str | os.PathLike | None = None,
              tap: str = "pooled") -> TaskData:
    """Features and labels of one task from a cache: the stored labels, or a label file's."""
    c = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    try:
        return join_task(c, read_labels(labels) if labels is not None else cache_task(c), tap)
    finally:
        if c is not cache:
            c.close()
