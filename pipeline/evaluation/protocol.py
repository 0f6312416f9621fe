"""The evaluation protocol: for one task, which images train and which are scored, and how rows are
scored, tested and ranked. Decided once per task, written into the run folder, and asked by every stage
that produces a row (``fit``, few-shot curves, ``finetune``), by ``audit`` for its out-of-fold plan, and
by ``predict`` when it picks a row.

- **Which images**: the task's ``val`` (else ``test``) split when it also has ``train`` rows; otherwise
  ``k`` seeded folds (stratified for classes) over every labelled image. Stored as one fold number per
  sample id (``-1``: trains only), so every stage scores exactly the same images.
- **Groups**: images of one object or patient (a label file's ``group`` column) and groups given when the
  protocol is decided (near-copies) are scored in one fold, never trained on beside themselves. Stored
  with the folds and part of the protocol's id; a task without groups gets exactly the folds it had
  before groups existed. A held-out split is the user's and kept: its scored images whose group also
  trains are set aside (below).
- **Set aside**: scored images a model has in effect seen (near-copies of training images) or whose label
  is suspect; each row also reports its primary metric without them (``<primary>_clean``,
  ``n_set_aside``), and the ranking says whether it holds without them (``rank_clean``).
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
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
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


def unused_split_note(task: str, splits: np.ndarray) -> str:
    """A note when some labelled images' splits are not used as given (``decide`` makes the choice): a task
    scored on a held-out split leaves out images in neither ``train`` nor that split; a task whose splits
    lack ``train`` rows, or ``val``/``test`` rows, is cross-validated over all its images instead. "" when
    every split is used as given."""
    splits = np.asarray(splits, dtype=object).astype(str)
    split = eval_split(splits)
    if split is None:
        named = sorted(map(str, set(splits) - {""}))
        if not named:
            return ""
        lacking = "val or test rows" if "train" in named else "train rows"
        return (f"task {task!r}: its splits ({', '.join(map(repr, named))}) have no {lacking}, so they are not used: "
                f"it is cross-validated over all its {len(splits)} labelled images, each trained on in the other folds")
    names, counts = np.unique(splits[(splits != "train") & (splits != split)], return_counts=True)
    if not len(names):
        return ""
    parts = ", ".join(f"{n} in split {str(name)!r}" if name else f"{n} with no split" for name, n in zip(names, counts))
    return (f"task {task!r}: {counts.sum()} labelled image(s) in neither train nor {split} ({parts}): left out, "
            f"as a task with train and {split} splits uses those two only")


@dataclass
class Protocol:
    """One task's evaluation: its samples (``ids``, ``y``), the fold each is scored in (``-1``: trains
    only), how the folds were made (``eval``: ``val``, ``test`` or ``cv<k>``; ``seed``; ``groups``, each
    sample's group, ``-1`` for none, None when no two samples share one) and the kind. ``aside`` marks
    the samples each row's clean score leaves out (None: nothing was checked); it is not part of ``id``."""

    task: str
    kind: str
    eval: str
    seed: int
    ids: np.ndarray
    y: np.ndarray
    folds: np.ndarray
    groups: np.ndarray | None = None
    aside: np.ndarray | None = None

    @property
    def id(self) -> str:
        """A fingerprint of the samples, labels, folds and groups: rows with the same one were scored on the
        same images and folds, and may be ranked against each other (a protocol without groups has the id
        it had before groups existed)."""
        parts = [self.task, self.kind, self.eval, self.seed, list(map(str, self.ids)), self.task_kind.format(self.y),
                 self.folds.tolist()]
        blob = json.dumps(parts if self.groups is None else [*parts, self.groups.tolist()])
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

    def unscored(self) -> list[str]:
        """Classes or tags no scored sample has: the scores say nothing of them (the mean AP of tags
        leaves such a tag out)."""
        kind = self.task_kind
        return sorted(set(kind.names(self.y)) - set(kind.names(self.y[self.scored])))

    @property
    def n_groups(self) -> int:
        """How many groups of two or more samples the protocol keeps together."""
        return 0 if self.groups is None else len(np.unique(self.groups[self.groups >= 0]))

    def across(self) -> np.ndarray:
        """Indices of the scored samples whose group also trains in their split: copies a held-out split
        lets leak (folds never split a group, so none under cross-validation)."""
        if self.groups is None:
            return np.zeros(0, np.int64)
        found = [scored[np.isin(self.groups[scored], self.groups[train]) & (self.groups[scored] >= 0)]
                 for train, scored in self.splits()]
        return np.sort(np.concatenate(found))

    def set_aside(self, samples: np.ndarray) -> None:
        """Leave ``samples`` (a mask over ``ids`` or indices into it) out of each row's clean score, beside
        those already set aside: scored images a model has in effect seen (near-copies of its training
        images) or whose label is suspect."""
        aside = np.zeros(len(self.ids), bool) if self.aside is None else self.aside.copy()
        aside[np.asarray(samples)] = True
        self.aside = aside

    def refit(self) -> np.ndarray:
        """Indices a saved model trains on: all samples after cross-validation, the train split otherwise."""
        return np.arange(len(self.ids)) if self.cross_validated else np.flatnonzero(self.folds == TRAIN_ONLY)

    def restricted(self, keep: np.ndarray) -> "Protocol":
        """The same protocol on the samples ``keep`` marks (images a cache could not decode are left out);
        its id differs unless every sample is kept."""
        keep = np.asarray(keep, bool)
        return Protocol(self.task, self.kind, self.eval, self.seed, self.ids[keep], self.y[keep], self.folds[keep],
                        None if self.groups is None else join_groups(self.groups[keep]),
                        None if self.aside is None else self.aside[keep])

    def score(self, y_pred: np.ndarray, scores: np.ndarray | None = None) -> dict:
        """The kind's metrics for predictions of the scored samples (in ``scored`` order; ``scores``, the
        kind's scores of them, for the metrics that rank), with the row's chance (its own predictions
        shuffled within each fold, see :mod:`pipeline.kinds.parts.scoring`), ``p_above_chance``, ``n_train``,
        ``n_test``, and the primary metric
        without the samples set aside with their number (``set_aside_columns``) when any were checked."""
        kind, scored, names = self.task_kind, self.scored, self.names
        y_pred = np.asarray(y_pred)
        metrics = kind.evaluate(self.y[scored], y_pred, self.folds[scored], names, scores)
        return dict(n_train=int(len(self.refit())), n_test=int(len(scored)), **metrics, **self.clean_columns(y_pred))

    def clean_columns(self, y_pred: np.ndarray) -> dict:
        """The primary metric of predictions of the scored samples without those set aside, and their
        number (``set_aside_columns``); nothing when nothing was checked."""
        if self.aside is None:
            return {}
        kind, scored, y_pred = self.task_kind, self.scored, np.asarray(y_pred)
        clean = ~self.aside[scored]
        value = kind.primary_score(self.y[scored][clean], y_pred[clean], self.names) if clean.any() else None
        return dict(zip(kind.set_aside_columns, (value, int((~clean).sum()))))

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
            groups = None if self.groups is None else join_groups(self.groups[train_only])
            n_folds = min(cv, _n_units(groups, len(train_only)))
            if self.task_kind.single_label:  # every fold holds every class: as many folds as the rarest has images
                n_folds = min(n_folds, int(np.unique(self.y[train_only], return_counts=True)[1].min()))
            if n_folds >= 2:
                folds = _kind_folds(self.task_kind, self.y[train_only], n_folds, seed, groups)
                plan += [(train_only[folds != f], train_only[folds == f]) for f in range(n_folds)]
        return plan

    def subsplit(self, idx: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray] | None:
        """``idx`` split into (kept, held) with ``fraction`` held out by the kind's splitter (seeded), to
        choose something (a fine-tune's epoch) without looking at the scored images; None when too small."""
        parts = self.task_kind.subsplit(self.y[idx], fraction, self.seed)
        return None if parts is None else (idx[parts[0]], idx[parts[1]])

    def to_dict(self) -> dict:
        """The protocol as saved in a run; ``groups`` and ``set_aside`` (ids) only when it has them."""
        d = dict(task=self.task, kind=self.kind, eval=self.eval, seed=self.seed, id=self.id,
                 ids=list(map(str, self.ids)), y=self.task_kind.format(self.y), folds=self.folds.tolist())
        if self.groups is not None:
            d["groups"] = self.groups.tolist()
        if self.aside is not None:
            d["set_aside"] = list(map(str, self.ids[self.aside]))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        kind = get_kind(d["kind"])
        y = kind.parse(d["y"], [f"protocol of {d['task']!r}"] * len(d["y"]))
        ids = np.array(d["ids"], dtype=object)
        groups = np.array(d["groups"], dtype=np.int64) if "groups" in d else None
        aside = np.isin(ids, d["set_aside"]) if "set_aside" in d else None
        return cls(d["task"], d["kind"], d["eval"], int(d["seed"]), ids, y, np.array(d["folds"], dtype=np.int64),
                   groups, aside)

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict()))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Protocol":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def describe(self) -> str:
        grouped = f", {self.n_groups} groups" if self.n_groups else ""
        return f"{self.eval} (seed {self.seed}) on {len(self.ids)} images, {len(self.scored)} scored{grouped}"

    def group_note(self) -> str:
        """A note when the task's held-out split trains on groups it also scores (the split is kept)."""
        across = self.across()
        if not len(across):
            return ""
        n, images = len(np.unique(self.groups[across])), f"{len(across)} {self.eval} image"
        return (f"task {self.task!r}: {n} group{'s' if n != 1 else ''} of images both train and are scored in the "
                f"{self.eval} split, which is kept as given; its {images}{'s' if len(across) != 1 else ''} of them "
                f"{'are' if len(across) != 1 else 'is'} set aside in each row's clean score")


def join_groups(*groupings: np.ndarray | None) -> np.ndarray | None:
    """One group per sample from groupings of the same samples (a label file's ``group`` column, groups of
    near-copies): samples that share a group in any of them share one here. Groups are numbered in sample
    order, ``-1`` for a sample that shares none; None when no two samples share one. A grouping marks a
    sample in no group with ``""`` (text) or a negative number; None stands for no grouping."""
    given = [np.asarray(g) for g in groupings if g is not None]
    if not given:
        return None
    n = len(given[0])
    samples, nodes, offset = [], [], n
    for g in given:
        if len(g) != n:
            raise PipelineError(f"groups of {len(g)} samples given for {n} samples")
        has = g != "" if g.dtype.kind in "OUS" else g >= 0
        names, inverse = np.unique(g[has], return_inverse=True)
        samples.append(np.flatnonzero(has))
        nodes.append(offset + inverse)
        offset += len(names)
    edges = np.concatenate(samples), np.concatenate(nodes)
    graph = coo_matrix((np.ones(len(edges[0])), edges), shape=(offset, offset))
    _, component = connected_components(graph, directed=False)
    _, first, inverse, counts = np.unique(component[:n], return_index=True, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts > 1)
    number = np.full(len(counts), -1, np.int64)
    number[shared[np.argsort(first[shared])]] = np.arange(len(shared))
    groups = number[inverse]
    return groups if (groups >= 0).any() else None


def _n_units(groups: np.ndarray | None, n: int) -> int:
    """How many units folds are made of: the groups and the samples in none (every sample without groups)."""
    if groups is None:
        return n
    return len(np.unique(groups[groups >= 0])) + int((groups < 0).sum())


def _kind_folds(kind: TaskKind, y: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None) -> np.ndarray:
    """The kind's folds, each group in one (a sample in none is a group of its own); the kind's plain folds
    without groups."""
    if groups is None:
        return kind.folds(y, n_folds, seed)
    alone = groups < 0
    units = groups.copy()
    units[alone] = groups.max() + 1 + np.arange(int(alone.sum()))
    return kind.folds(y, n_folds, seed, units)


def decide(task: str, kind: TaskKind, ids: Sequence[str], y: Sequence, splits: Sequence[str], cv: int,
           seed: int, groups: np.ndarray | None = None) -> Protocol:
    """The protocol of a task from its labelled samples: the ``val``/``test`` split when there is one
    beside ``train`` (other splits left out), else ``cv`` seeded folds over all of them, each group of
    ``groups`` (one per sample in ``ids`` order, see ``join_groups``) in one fold. A held-out split is
    kept as given: its scored samples whose group also trains are set aside (``group_note`` says so)."""
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    ids, splits = (np.asarray(a, dtype=object)[order] for a in (ids, splits))
    y = np.asarray(y)[order]
    groups = None if groups is None else np.asarray(groups)[order]
    split = eval_split(splits)
    if split is not None:
        keep = (splits == "train") | (splits == split)
        ids, y, splits = ids[keep], y[keep], splits[keep]
        kind.check(y[splits == "train"], task, None)
        kind.check(y, task, None)
        folds = np.where(splits == "train", TRAIN_ONLY, 0).astype(np.int64)
        groups = join_groups(None if groups is None else groups[keep])
        protocol = Protocol(task, kind.name, split, seed, ids, y, folds, groups)
        if protocol.groups is not None:
            protocol.set_aside(protocol.across())
        return protocol
    kind.check(y, task, cv)
    groups = join_groups(groups)
    if _n_units(groups, len(ids)) < cv:
        raise PipelineError(f"task {task!r}: its {_n_units(groups, len(ids))} groups of images (each kept in one "
                            f"fold) cannot fill {cv} folds; use fewer folds (--cv)")
    folds = _kind_folds(kind, y, cv, seed, groups)
    if len(np.unique(folds)) < cv:
        raise PipelineError(f"task {task!r}: its groups of images leave a fold of {cv} empty; use fewer folds (--cv)")
    return Protocol(task, kind.name, f"cv{cv}", seed, ids, y, folds, groups)


def rank_and_test(rows: list, protocols: dict[str, "Protocol"], predictions: Callable) -> list:
    """Rank each task's rows and run its tests, in place; returns the rows best first within each task.

    Rows whose ``protocol`` is their task's are ``comparable``: they are ranked and get ``p_vs_best`` (the
    kind's paired test against the task's best row, on the samples both scored) and ``same_as_best``.
    Every scored row gets ``above_chance`` from its ``p_above_chance``. Both decisions are at 5 % after a
    Benjamini-Hochberg adjustment over the task's rows. Ranked rows with a clean score (without the samples
    set aside) get ``rank_clean``, their rank by it. ``predictions(row)`` gives (ids, true, predicted)."""
    ordered = []
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        protocol = protocols.get(task)
        for r in mine:
            r.comparable = protocol is not None and r.protocol == protocol.id
            r.p_vs_best = r.same_as_best = r.above_chance = r.rank_clean = None
        scored = [r for r in mine if r.scored]
        if scored:
            adjusted = false_discovery_control([r.p_above_chance for r in scored])
            for r, p in zip(scored, adjusted):
                r.above_chance = bool(p < 0.05)
        ranked = sorted([r for r in scored if r.comparable], key=lambda r: r.rank_key(), reverse=True)
        if ranked:
            _test_against_best(ranked, protocol, predictions)
            _rank_clean(ranked)
        apart = sorted([r for r in scored if not r.comparable], key=lambda r: r.rank_key(), reverse=True)
        ordered += ranked + apart + [r for r in mine if not r.scored]
    return ordered


def _rank_clean(ranked: list) -> None:
    """``rank_clean`` (1: best) of the ranked rows that have a clean score, by it; ties keep their rank."""
    clean = [r for r in ranked if r.clean_score is not None and not np.isnan(r.clean_score)]
    for rank, r in enumerate(sorted(clean, key=lambda r: r.clean_score, reverse=True), start=1):
        r.rank_clean = rank


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
        ("images", len(stored.ids), len(proposed.ids)), ("groups", stored.n_groups, proposed.n_groups)) if a != b]
    if not reasons:
        reasons = ["the labels, the images or their groups differ"]
    raise PipelineError(
        f"{where} holds task {stored.task!r} evaluated as {stored.describe()}; this one would be "
        f"{proposed.describe()} ({', '.join(reasons)}), so its rows could not be compared; pass --overwrite "
        "to replace the run, or use another --out")
