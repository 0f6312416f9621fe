"""The run folder: one owner for its layout, its rows and what happens when a run is written into again.

Layout (every path stored inside is relative to the folder, so a run can be moved, copied or archived
and used from any directory)::

    RUN/leaderboard.json|.csv   the rows (``Row``), best first within each task
    RUN/protocols/<task>.json   each task's evaluation protocol (:mod:`pipeline.evaluation.protocol`)
    RUN/heads/<name>.skops      fitted heads, each with <name>.json (its card: classes, feature specs)
                                and <name>.predictions.csv (the scored samples: id, true, predicted),
                                <name>.scores.npy (their scores: class probabilities; what calibrates
                                ``predict --coverage``); a knn head that read its rows by chunks, with
                                <name>.faiss (its index)
    RUN/heads/<source>.ood.json  per cache, tap and task: its training images' nearest-neighbour
                                distances (what ``predict``'s ``ood_score`` is a percentile of)
    RUN/finetune/<name>.predictions.csv|.scores.npy   the same for rows of fine-tuned networks (the model folder
                                is wherever ``finetune --out`` put it; the row points at it)
    RUN/run.json                every stage that wrote here: command, parameters, versions, machine
                                (an ``audit --run RUN`` too, with where its page is)

    RUN/leaderboard.md, report.html, confusion_*.png, fewshot*   renderings (``ARTIFACTS`` names them all)

Writing rows into a run that has some merges by row key (a row of the same backbone, feature spec,
tap, task and head is replaced; the others stay) and ranks and tests every task again. Every stage takes
a task's protocol through ``open_task``: fit's rows only under the same protocol (a task evaluated on
other images is refused unless the run is overwritten); finetune and audit on the protocol's images they
have, a row scored on fewer of them shown apart.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import PipelineError
from ..files import atomic_path
from ..validation import one_of, unknown, validate_params
from ..kinds import get_kind
from .protocol import Protocol, check_same, decide, join_groups, rank_and_test
from .rows import Row, best_row, columns, score_row

# Every file and folder a run owns, by name: stages ask ``RunFolder.artifact(name, task=..., row=...)``
# and never spell a path; ``--overwrite`` removes exactly these.
ARTIFACTS = {
    "leaderboard": "leaderboard.json", "leaderboard_csv": "leaderboard.csv", "leaderboard_md": "leaderboard.md",
    "run": "run.json", "report": "report.html", "fewshot_csv": "fewshot.csv", "fewshot_json": "fewshot.json",
    "fewshot_plot": "fewshot_{task}.png", "confusion": "confusion_{task}.png", "confusion_row": "confusion_row{row}.png",
    "scatter_row": "scatter_row{row}.png",
}
ROW_PLOTS = ("confusion_row", "scatter_row")  # named by the row's number, which a new leaderboard may give another row
HEADS, PROTOCOLS, FINETUNE = "heads", "protocols", "finetune"
# Beside the artifacts above, inside HEADS and FINETUNE (removed with them): a row's predictions, their
# scores, and each source's out-of-distribution reference.
PREDICTIONS, SCORES, OOD_REFERENCE = ".predictions.csv", ".scores.npy", ".ood.json"
INDEX = ".faiss"  # beside a knn head that read its rows by chunks: its index (see ``RunFolder.save_model``)

# How a stage takes a task's protocol from a run (see ``open_task``).
POLICIES = {
    "exact": "the run's protocol, which the data must give exactly: the same images, labels, folds and seed "
             "(fit: its rows are ranked with the run's)",
    "within": "the run's protocol on those of its images the data has, labelled as the run labels them "
              "(finetune and audit read images or features of their own)",
    "replace": "decided anew from the data (fit --overwrite)",
}


@dataclass
class Labelled:
    """A task's labelled samples as a stage sees them: what a protocol is decided on. ``groups``: each
    sample's group from the label file (``""``: none), None without a group column."""

    task: str
    kind: str
    ids: np.ndarray
    y: np.ndarray
    splits: np.ndarray
    groups: np.ndarray | None = None

    def decide(self, cv: int, seed: int, groups: np.ndarray | None = None) -> Protocol:
        """The protocol decided from these samples, each of their groups and of ``groups`` in one fold."""
        return decide(self.task, get_kind(self.kind), self.ids, self.y, self.splits, cv, seed,
                      join_groups(self.groups, groups))


@validate_params(dict(policy=one_of(*POLICIES)), spell=str)
def open_task(labelled: Labelled, cv: int, seed: int, run: "RunFolder | None" = None,
              policy: str = "exact", groups: np.ndarray | None = None) -> tuple[Protocol, str]:
    """The protocol a stage evaluates ``labelled`` under, and a note when it is not the whole of the run's
    or its held-out split trains on groups it scores (``Protocol.group_note``): the one policy by which
    every stage reuses a run's protocol (``POLICIES``). A run without the task (or no run) gets one
    decided from the data (``val``/``test`` split, else ``cv`` seeded folds).

    ``groups`` are groups found beside the label file's (one integer per sample of ``labelled``, ``-1``:
    none; confirmed near-copies): a decided protocol keeps each in one fold and records them, so ``exact``
    refuses a run whose groups differ as it refuses other folds or seed; ``within`` keeps the run's."""
    stored = run.protocol(labelled.task) if run is not None and policy != "replace" else None
    if stored is None:
        decided = labelled.decide(cv, seed, groups)
        return decided, decided.group_note()
    if policy == "exact":
        proposed = labelled.decide(cv, seed, groups)
        check_same(stored, proposed, str(run.path))
        if stored.aside is not None:  # what an audit set aside (suspected label errors) stays aside
            proposed.set_aside(stored.aside)
        return proposed, proposed.group_note()
    return _within(stored, labelled, run)


def _within(stored: Protocol, labelled: Labelled, run: "RunFolder") -> tuple[Protocol, str]:
    kind = stored.task_kind
    given = dict(zip(labelled.ids, kind.format(labelled.y)))
    cells = dict(zip(stored.ids, kind.format(stored.y)))
    differ = next((i for i in stored.ids if i in given and given[i] != cells[i]), None)
    if differ is not None:
        raise PipelineError(f"{run.path}: task {stored.task!r} labels {differ!r} {cells[differ]!r}, the data "
                            f"{given[differ]!r}")
    keep = np.array([i in given for i in stored.ids], bool)
    if keep.all():
        return stored, ""
    return stored.restricted(keep), (f"{int((~keep).sum())} of the {len(keep)} images of {run.path}'s protocol of "
                                     f"{stored.task!r} are not among these; evaluated on the rest")


class RunFolder:
    """A run folder on disk (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._protocols: dict[str, Protocol | None] = {}

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def exists(self) -> bool:
        return self.artifact("leaderboard").is_file()

    def artifact(self, name: str, task: str = "", row: int | None = None) -> Path:
        """Where the run keeps ``name`` (a key of ``ARTIFACTS``), for ``task`` or leaderboard row ``row``."""
        if name not in ARTIFACTS:
            raise unknown("run folder artifact", name, ARTIFACTS)
        return self.path / ARTIFACTS[name].format(task=slug(task), row=row)

    def rows(self) -> list[Row]:
        path = self.artifact("leaderboard")
        if not path.is_file():
            return []
        return [Row.from_dict(d) for d in json.loads(path.read_text())]

    def protocol(self, task: str) -> Protocol | None:
        if task not in self._protocols:
            path = self._protocol_path(task)
            self._protocols[task] = Protocol.load(path) if path.is_file() else None
        return self._protocols[task]

    def protocols(self) -> dict[str, Protocol]:
        """Every task's stored protocol; those held already are not read again (ten million ids are 3 GB)."""
        folder = self.path / PROTOCOLS
        held = {self._protocol_path(t) for t, p in self._protocols.items() if p is not None}
        found = (Protocol.load(p) for p in sorted(folder.glob("*.json")) if p not in held) if folder.is_dir() else ()
        self._protocols.update({p.task: p for p in found})
        return {t: p for t, p in self._protocols.items() if p is not None}

    def save_protocol(self, protocol: Protocol) -> None:
        protocol.save(self._protocol_path(protocol.task))
        self._protocols[protocol.task] = protocol

    def head_path(self, name: str) -> Path:
        return self.path / HEADS / f"{slug(name)}.skops"

    def save_model(self, estimator, name: str, training_ids: np.ndarray | None) -> Path:
        """Save a fitted head as ``heads/<name>.skops``; its path. Given ``training_ids`` (the images it was
        fitted on), a knn head is saved without what is elsewhere: one holding its rows, with those ids
        instead of their features (``predict`` reads them from the cache); one that read them by chunks,
        with its index in a file of its own beside it (skops builds a head's file in memory, and held a
        1.3 GB index of 10^6 rows x 1,280 features four times over). Without them, the head is one file."""
        from ..heads import save_head

        path = self.head_path(name)
        if training_ids is not None and hasattr(estimator, "without_rows"):
            estimator = estimator.without_rows(training_ids)
        if training_ids is not None and hasattr(estimator, "without_index"):
            estimator = estimator.without_index(path.with_suffix(INDEX))
        with atomic_path(path) as tmp:
            save_head(estimator, tmp)
        return path

    def score(self, protocol: Protocol, y_pred: np.ndarray | None, scores: np.ndarray | None = None,
              **identity) -> Row:
        """The row of a model (``identity``: backbone, head, ``head_file``, ...) scored by ``protocol`` on its
        predictions (and ``scores``) of the scored samples (see ``score_row``), its predictions and scores
        saved into the run."""
        row = score_row(protocol, y_pred, scores, **identity)
        if y_pred is not None:
            scored = protocol.scored
            self.write_predictions(row, protocol.ids[scored], protocol.y[scored], y_pred)
            if scores is not None:
                self.write_scores(row, scores)
            else:  # a head refit without scores leaves none of its predecessor's
                self.scores_path(row).unlink(missing_ok=True)
        return row

    def predictions_path(self, row: Row) -> Path:
        if row.stage == "finetune":
            return self.path / FINETUNE / f"{slug(f'{row.task}__{Path(row.head_file).name}__{row.head}')}{PREDICTIONS}"
        return self.resolve(row.head_file).with_suffix(PREDICTIONS)

    def scores_path(self, row: Row) -> Path:
        """Where a row's scores are: beside its predictions."""
        path = self.resolve(row.predictions) if row.predictions else self.predictions_path(row)
        return path.with_name(path.name.removesuffix(PREDICTIONS) + SCORES)

    def ood_path(self, source: str) -> Path:
        """Where the out-of-distribution reference of ``source`` (``<caches>__<tap>__<task>``) is."""
        return self.path / HEADS / f"{slug(source)}{OOD_REFERENCE}"

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

    def write_scores(self, row: Row, scores: np.ndarray) -> None:
        """The scores of ``row``'s scored samples (in its predictions' order), beside its predictions."""
        with atomic_path(self.scores_path(row)) as tmp, tmp.open("wb") as fh:
            np.save(fh, np.asarray(scores, dtype=np.float32))  # float32: a row of 10^6 images x 100 classes is 400 MB

    def read_scores(self, row: Row) -> np.ndarray:
        """A row's saved scores (class probabilities), in its predictions' order."""
        path = self.scores_path(row)
        if not path.is_file():
            raise PipelineError(f"row {row.head} of task {row.task!r} has no saved scores ({path}): its head gives "
                                "none, or the run was fit before scores were saved; fit it again")
        return np.load(path)

    def add_rows(self, new: Sequence[Row]) -> list[Row]:
        """Merge ``new`` into the run's rows by key (a row replaced keeps its place, so the tasks keep their
        order), rank and test every task again, write the leaderboard."""
        before = self.rows()
        by_key = {r.key: r for r in new}
        rows = [by_key.pop(r.key, r) for r in before] + list(by_key.values())
        rows = rank_and_test(rows, self.protocols(), self.read_predictions)
        if [r.key for r in rows] != [r.key for r in before]:  # rows renumbered: a row's plot would name another row
            for name in ROW_PLOTS:
                for p in self.path.glob(ARTIFACTS[name].format(row="*")):
                    p.unlink()
        self._write_leaderboard(rows)
        return rows

    def set_aside(self, task: str, samples: np.ndarray) -> list[Row]:
        """Set ``samples`` (indices into the task's protocol) aside too, and score each of the task's rows
        again without them from its saved predictions; the run's rows, ranked again."""
        protocol = self.protocol(task)
        protocol.set_aside(samples)
        self.save_protocol(protocol)
        rows = [r for r in self.rows() if r.task == task and r.scored and r.protocol == protocol.id and r.predictions]
        expected = list(map(str, protocol.ids[protocol.scored]))
        for r in rows:
            ids, _, predicted = self.read_predictions(r)
            if ids == expected:
                r.metrics.update(protocol.clean_columns(predicted))
        return self.add_rows(rows)

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
        for pattern in ARTIFACTS.values():
            for p in self.path.glob(pattern.format(task="*", row="*")):
                p.unlink()

    def record(self, stage: str, parameters: dict, seconds: float, timings: dict | None = None,
               notes: Sequence[str] = ()) -> Path:
        """Add to ``run.json`` the command line, parameters, library versions and machine of a stage, and
        where its time went (``timings``) and what it said beside its rows (``notes``: what it left out
        and why), when it says."""
        from ..cache import library_versions

        path = self.artifact("run")
        old = json.loads(path.read_text()) if path.is_file() else []
        entry = dict(stage=stage, command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), parameters=parameters,
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(seconds, 2),
                     versions={**library_versions(), "python": platform.python_version()},
                     machine=f"{platform.node()} ({platform.platform()}, {os.cpu_count()} cores)",
                     **({"timings": timings} if timings else {}), **({"notes": list(notes)} if notes else {}))
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(old + [entry], indent=1, default=str))
        return path

    def history(self) -> list[dict]:
        path = self.artifact("run")
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
        with atomic_path(self.artifact("leaderboard_csv")) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(dicts)
        with atomic_path(self.artifact("leaderboard")) as tmp:
            tmp.write_text(json.dumps(dicts, indent=1, default=_jsonable))


def slug(text: str) -> str:
    """``text`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v)}")
