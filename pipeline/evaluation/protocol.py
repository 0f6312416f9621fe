"""The evaluation protocol: for one task, which images train and which are scored, and how rows are
scored, tested and ranked. Decided once per task, written into the run folder, and asked by every stage
that produces a row (``fit``, few-shot curves, ``finetune``), by ``audit`` for its out-of-fold plan, and
by ``predict`` when it picks a row.

- **Which images**: the task's ``val`` (else ``test``) split when it also has ``train`` rows; otherwise
  ``k`` seeded folds (stratified for classes) over every labelled image. Stored as one fold number per
  sample id (``-1``: trains only), so every stage scores exactly the same images.
- **Scores**: the task kind's metrics and interval on the out-of-sample predictions (out-of-fold for
  cross-validation), the chance baseline scored on the same images, a paired test against the task's
  best row and a test against chance, both decided at 5 % after a Benjamini-Hochberg adjustment.
- **Ranking**: only rows evaluated on the protocol's images are ranked against each other (their
  ``protocol`` is the task's); a row scored on other images is kept and shown apart, never picked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.stats import false_discovery_control

from ..errors import PipelineError
from ..files import atomic_path
from ..kinds import TaskKind, get_kind

HOLDOUT_SPLITS = ("val", "test")
TRAIN_ONLY = -1


def eval_split(splits: np.ndarray) -> str | None:
    """The split a task is scored on: ``val`` (else ``test``) when there are also ``train`` rows; None
    means cross-validation."""
    splits = np.asarray(splits)
    if not (splits == "train").any():
        return None
    return next((s for s in HOLDOUT_SPLITS if (splits == s).any()), None)


@dataclass
class Protocol:
    """One task's evaluation: its samples (``ids``, ``y``), the fold each is scored in (``-1``: trains
    only), how the folds were made (``eval``: ``val``, ``test`` or ``cv<k>``; ``seed``) and the kind."""

    task: str
    kind: str
    eval: str
    seed: int
    ids: np.ndarray
    y: np.ndarray
    folds: np.ndarray

    @property
    def id(self) -> str:
        """A fingerprint of everything above: rows with the same one were scored on the same images, folds
        and labels, and may be ranked against each other."""
        blob = json.dumps([self.task, self.kind, self.eval, self.seed, list(map(str, self.ids)),
                           self.task_kind.format(self.y), self.folds.tolist()])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def task_kind(self) -> TaskKind:
        return get_kind(self.kind)

    @property
    def names(self) -> list[str]:
        """The classes or tags a model of this task predicts over (none for regression)."""
        return self.task_kind.names(self.y)

    @property
    def cross_validated(self) -> bool:
        return self.eval.startswith("cv")

    @property
    def scored(self) -> np.ndarray:
        """Indices of the samples that are scored, in ``ids`` order."""
        return np.flatnonzero(self.folds != TRAIN_ONLY)

    def splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, scored) indices of each fold; one pair for a held-out split."""
        folds = range(int(self.folds.max()) + 1)
        if self.cross_validated:
            return [(np.flatnonzero(self.folds != f), np.flatnonzero(self.folds == f)) for f in folds]
        train = np.flatnonzero(self.folds == TRAIN_ONLY)
        return [(train, np.flatnonzero(self.folds == f)) for f in folds]

    def unseen(self) -> list[str]:
        """Classes or tags of scored samples that their fold's training samples never show: no model can
        predict them, so every row of the task misses those samples."""
        kind, unseen = self.task_kind, set()
        for train, scored in self.splits():
            unseen |= set(kind.names(self.y[scored])) - set(kind.names(self.y[train]))
        return sorted(unseen)

    def refit(self) -> np.ndarray:
        """Indices a saved model trains on: all samples after cross-validation, the train split otherwise."""
        return np.arange(len(self.ids)) if self.cross_validated else np.flatnonzero(self.folds == TRAIN_ONLY)

    def restricted(self, keep: np.ndarray) -> "Protocol":
        """The same protocol on the samples ``keep`` marks (images a cache could not decode are left out);
        its id differs unless every sample is kept."""
        keep = np.asarray(keep, bool)
        return Protocol(self.task, self.kind, self.eval, self.seed, self.ids[keep], self.y[keep], self.folds[keep])

    def score(self, y_pred: np.ndarray, scores: np.ndarray | None = None) -> dict:
        """The kind's metrics for predictions of the scored samples (in ``scored`` order; ``scores``, the
        kind's scores of them, for the metrics that rank), with the chance baseline of each fold predicted
        from that fold's training labels, ``p_above_chance``, and ``n_train``, ``n_test``."""
        kind, scored, names = self.task_kind, self.scored, self.names
        parts = {}
        for train, test in self.splits():
            for i, c in zip(test, kind.chance(self.y[train], len(test), names)):
                parts[i] = c
        chance = np.array([parts[i] for i in scored])
        metrics = kind.evaluate(self.y[scored], np.asarray(y_pred), chance, self.folds[scored], names, scores)
        return dict(n_train=int(len(self.refit())), n_test=int(len(scored)), **metrics)

    def primary_score(self, idx: np.ndarray, y_pred: np.ndarray) -> float:
        """The kind's primary metric of predictions of the samples ``idx`` (few-shot draws are scored so)."""
        return self.task_kind.primary_score(self.y[idx], np.asarray(y_pred), self.names)

    def fewshot_split(self) -> tuple[np.ndarray, np.ndarray, str]:
        """Where few-shot examples are drawn from and what scores them: the first split's training and
        scored samples (the held-out split, or fold 0), and its name."""
        pool, test = self.splits()[0]
        return pool, test, f"{self.eval} fold 0" if self.cross_validated else self.eval

    def oof_plan(self, cv: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, predict) index pairs that give every sample one prediction by a model that did not learn
        from it (an audit's out-of-fold probabilities): the protocol's splits, plus ``cv`` seeded folds over
        the training-only samples of a held-out protocol (fewer when a class is smaller)."""
        plan = self.splits()
        train_only = np.flatnonzero(self.folds == TRAIN_ONLY)
        if len(train_only):
            _, counts = np.unique(self.y[train_only], return_counts=True)
            n_folds = min(cv, int(counts.min()))
            if n_folds >= 2:
                folds = self.task_kind.folds(self.y[train_only], n_folds, seed)
                plan += [(train_only[folds != f], train_only[folds == f]) for f in range(n_folds)]
        return plan

    def subsplit(self, idx: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray] | None:
        """``idx`` split into (kept, held) with ``fraction`` held out by the kind's splitter (seeded), to
        choose something (a fine-tune's epoch) without looking at the scored images; None when too small."""
        parts = self.task_kind.subsplit(self.y[idx], fraction, self.seed)
        return None if parts is None else (idx[parts[0]], idx[parts[1]])

    def to_dict(self) -> dict:
        return dict(task=self.task, kind=self.kind, eval=self.eval, seed=self.seed, id=self.id,
                    ids=list(map(str, self.ids)), y=self.task_kind.format(self.y), folds=self.folds.tolist())

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        kind = get_kind(d["kind"])
        y = kind.parse(d["y"], [f"protocol of {d['task']!r}"] * len(d["y"]))
        return cls(d["task"], d["kind"], d["eval"], int(d["seed"]), np.array(d["ids"], dtype=object), y,
                   np.array(d["folds"], dtype=np.int64))

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict()))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Protocol":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def describe(self) -> str:
        return f"{self.eval} (seed {self.seed}) on {len(self.ids)} images, {len(self.scored)} scored"


def decide(task: str, kind: TaskKind, ids: Sequence[str], y: Sequence, splits: Sequence[str], cv: int,
           seed: int) -> Protocol:
    """The protocol of a task from its labelled samples: the ``val``/``test`` split when there is one
    beside ``train`` (other splits left out), else ``cv`` seeded folds over all of them."""
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    ids, splits = (np.asarray(a, dtype=object)[order] for a in (ids, splits))
    y = np.asarray(y)[order]
    split = eval_split(splits)
    if split is not None:
        keep = (splits == "train") | (splits == split)
        ids, y, splits = ids[keep], y[keep], splits[keep]
        kind.check(y[splits == "train"], task, None)
        kind.check(y, task, None)
        folds = np.where(splits == "train", TRAIN_ONLY, 0)
        return Protocol(task, kind.name, split, seed, ids, y, folds.astype(np.int64))
    kind.check(y, task, cv)
    return Protocol(task, kind.name, f"cv{cv}", seed, ids, y, kind.folds(y, cv, seed))


def rank_and_test(rows: list, protocols: dict[str, "Protocol"], predictions: Callable) -> list:
    """Rank each task's rows and run its tests, in place; returns the rows best first within each task.

    Rows whose ``protocol`` is their task's are ``comparable``: they are ranked and get ``p_vs_best`` (the
    kind's paired test against the task's best row, on the samples both scored) and ``same_as_best``.
    Every scored row gets ``above_chance`` from its ``p_above_chance``. Both decisions are at 5 % after a
    Benjamini-Hochberg adjustment over the task's rows. ``predictions(row)`` gives (ids, true, predicted)."""
    ordered = []
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        protocol = protocols.get(task)
        for r in mine:
            r.comparable = protocol is not None and r.protocol == protocol.id
            r.p_vs_best = r.same_as_best = r.above_chance = None
        scored = [r for r in mine if r.scored]
        if scored:
            adjusted = false_discovery_control([r.p_above_chance for r in scored])
            for r, p in zip(scored, adjusted):
                r.above_chance = bool(p < 0.05)
        ranked = sorted([r for r in scored if r.comparable], key=lambda r: r.rank_key(), reverse=True)
        if ranked:
            _test_against_best(ranked, protocol, predictions)
        apart = sorted([r for r in scored if not r.comparable], key=lambda r: r.rank_key(), reverse=True)
        ordered += ranked + apart + [r for r in mine if not r.scored]
    return ordered


def _test_against_best(ranked: list, protocol: Protocol, predictions: Callable) -> None:
    kind, names = protocol.task_kind, protocol.names
    ids, y_true, best = predictions(ranked[0])
    where = {i: k for k, i in enumerate(ids)}
    for r in ranked[1:]:
        got_ids, _, got = predictions(r)
        pairs = [(where[i], k) for k, i in enumerate(got_ids) if i in where]
        mine_rows, best_rows = [k for _, k in pairs], [j for j, _ in pairs]
        r.p_vs_best = kind.p_same(y_true[best_rows], got[mine_rows], best[best_rows], names)
    adjusted = false_discovery_control([r.p_vs_best for r in ranked[1:]]) if len(ranked) > 1 else []
    for r, p in zip(ranked[1:], adjusted):
        r.same_as_best = bool(p >= 0.05)
    ranked[0].same_as_best = True


def check_same(stored: Protocol, proposed: Protocol, where: str) -> None:
    """Refuse to score a task on other images or folds than the run already holds."""
    if stored.id == proposed.id:
        return
    reasons = [f"{name} {a} -> {b}" for name, a, b in (
        ("evaluation", stored.eval, proposed.eval), ("seed", stored.seed, proposed.seed),
        ("images", len(stored.ids), len(proposed.ids))) if a != b]
    if not reasons:
        reasons = ["the labels or the images differ"]
    raise PipelineError(
        f"{where} holds task {stored.task!r} evaluated as {stored.describe()}; this one would be "
        f"{proposed.describe()} ({', '.join(reasons)}), so its rows could not be compared; pass --overwrite "
        "to replace the run, or use another --out")
