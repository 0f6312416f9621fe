"""Task kinds: what a label column means, picked by name from a registry like timm's models.

A kind owns every decision that depends on what the labels are: how a label cell is read, how rows are
split into folds, which metrics score a prediction (with their interval), what chance scores and how a
row is tested against it and against the best row, how rows are ranked, and what ``predict`` writes.
The evaluation protocol (:mod:`pipeline.protocol`) asks the task's kind for each of them. Adding a kind
is one module with a :class:`TaskKind` subclass and ``@register_kind``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import PipelineError

_KINDS: dict[str, "TaskKind"] = {}


class TaskKind:
    """The interface of a task kind; see :class:`pipeline.kinds.classification.Classification`."""

    name: str
    column: str  # the label file's column that says a table is of this kind
    primary: str  # the metric rows are ranked by first
    columns: tuple[str, ...]  # the metric columns of a leaderboard row, in order

    def parse(self, values: Sequence[str], where: Sequence[str]) -> np.ndarray:
        """Label cells as the kind's values; ``where[i]`` names the cell (``file:line``) for errors."""
        raise NotImplementedError

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        """Raise when ``y`` cannot be evaluated (too few classes, a class smaller than the folds, ...)."""
        raise NotImplementedError

    def folds(self, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
        """The fold each row is evaluated in, for cross-validation."""
        raise NotImplementedError

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Row indices (keep, held) with ``fraction`` held out, or None when ``y`` is too small to split."""
        raise NotImplementedError

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, y_chance: np.ndarray, folds: np.ndarray) -> dict:
        """The metric columns of a row from its out-of-sample predictions; ``y_chance`` is what the chance
        baseline predicts for the same rows and ``folds`` the fold of each."""
        raise NotImplementedError

    def chance_prediction(self, y_train: np.ndarray, n: int) -> np.ndarray:
        """What the chance baseline predicts for ``n`` rows after seeing ``y_train``."""
        raise NotImplementedError

    def outcome(self, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        """A per-row outcome (correct or not, an error) that paired tests compare between rows."""
        raise NotImplementedError

    def p_same(self, mine: np.ndarray, best: np.ndarray) -> float:
        """Two-sided p-value that two rows' paired outcomes on the same samples are equally good."""
        raise NotImplementedError

    def p_above_chance(self, metrics: dict) -> float:
        """One-sided p-value that a row beats its chance baseline."""
        raise NotImplementedError

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        """Higher is better."""
        raise NotImplementedError

    def predict_columns(self, classes: Sequence[str], scores: np.ndarray) -> list[dict]:
        """``predict``'s columns for each row of ``scores`` (one column per class)."""
        raise NotImplementedError


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: register a task kind under its ``name``."""
    _KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> TaskKind:
    if name not in _KINDS:
        raise PipelineError(f"unknown task kind {name!r}; choose from {', '.join(_KINDS)}")
    return _KINDS[name]


def kind_of_columns(columns: Sequence[str], where: str) -> TaskKind:
    """The kind a label table's header names (``label`` -> classification, ...)."""
    found = [k for k in _KINDS.values() if k.column in columns]
    if not found:
        names = " or ".join(f"id,{k.column}[,split] ({k.name})" for k in _KINDS.values())
        raise PipelineError(f"{where}: missing column(s) {' or '.join(k.column for k in _KINDS.values())}; "
                            f"a label file is {names}")
    if len(found) > 1:
        raise PipelineError(f"{where}: columns {', '.join(k.column for k in found)} name different task kinds; keep one")
    return found[0]


from . import classification  # noqa: E402,F401  (registers the built-in kinds)
