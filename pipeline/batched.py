"""Many models of one head fitted side by side: the folds of a cross-validation and the refit on all
rows (or a few-shot curve's draws), as one batched problem instead of one fit after another. A head
takes part when it is an estimator with ``_fit_groups(X, y, groups, models)``, alone or after a
``StandardScaler`` (the torch heads of :mod:`pipeline.linear_probe` and :mod:`pipeline.mlp_probe`); the result is the
models fitting each clone on its own rows gives. The linear heads also fit on features too large to hold
(:class:`RowChunks`: read a chunk at a time, every pass). Also what those estimators share about classes."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, clone, is_classifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import assert_all_finite, column_or_1d, validate_data

from .validation import megabytes


CHUNK_BYTES = 32  # per value of a chunk: its float32 rows, a head's float64 and standardised copies, and as much spare
SLOW_CHUNK = 256  # rows per read under which a pass over chunks is mostly overhead


def rows_per_chunk(memory: int, dims: int) -> int:
    """The rows of ``dims`` features a chunk may hold while heads fit on it under ``memory`` bytes (one at least)."""
    return max(1, memory // (CHUNK_BYTES * dims))


def chunk_memory(rows: int, dims: int) -> int:
    """The bytes a chunk of ``rows`` rows costs while heads fit on it: the inverse of :func:`rows_per_chunk`."""
    return rows * CHUNK_BYTES * dims


def slow_reads(step: int, need: int, to_hold: int | None = None) -> str:
    """Where reads of ``step`` rows are fewer than :data:`SLOW_CHUNK`: that they cost, and the least
    ``--max-memory`` that avoids it: ``need`` bytes read :data:`SLOW_CHUNK` rows at a time, or
    ``to_hold`` bytes hold the features, where that is less."""
    if step >= SLOW_CHUNK:
        return ""
    need_mb = megabytes(need)
    better = (f"--max-memory {megabytes(to_hold)}MB holds the features in memory"
              if to_hold is not None and megabytes(to_hold) <= need_mb else f"--max-memory {need_mb}MB reads {SLOW_CHUNK} at a time")
    return f"; so few rows per read make every pass slow: {better}"


class RowChunks:
    """A feature matrix read ``step`` rows at a time by ``read(positions)`` (an array of row positions ->
    float32 rows), for features that do not fit in memory: the batched linear heads fit on it, one read
    of every chunk per pass, so memory holds one chunk. ``RowChunks[rows]`` reads those rows whole."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], n: int, d: int, step: int):
        self.read, self.shape, self.step = read, (n, d), step

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.read(np.asarray(rows))

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]:
        """``(positions, rows)`` of each chunk, in order."""
        for start in range(0, self.shape[0], self.step):
            where = slice(start, min(start + self.step, self.shape[0]))
            yield where, self.read(np.arange(where.start, where.stop))

    def take(self, rows: np.ndarray) -> "RowChunks":
        """The rows ``rows`` of this matrix, in that order, still read by chunks."""
        rows = np.asarray(rows)
        return RowChunks(lambda positions: self.read(rows[positions]), len(rows), self.shape[1], self.step)


class Group:
    """The rows one model is fitted on, its scaler (None: the features as they are) and, for a head that
    chooses its regularisation on held-out rows, the splits of those rows (filled in by the estimator)."""

    def __init__(self, rows: np.ndarray, scaler: StandardScaler | None = None):
        self.rows, self.scaler, self.splits = np.asarray(rows), scaler, []


class GroupFitMixin:
    """``fit`` of an estimator that fits groups side by side (``_fit_groups``): one group, all rows."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=(np.float32, np.float64), multi_output=True)
        if y.ndim == 2 and y.shape[1] == 1:  # one column of classes, as scikit-learn's classifiers take it
            y = column_or_1d(y, warn=True)
        self._fit_groups(X, y, [Group(np.arange(len(y)))], [self])
        return self


def batchable(estimator: BaseEstimator, chunks: bool = False) -> bool:
    """Whether ``fit_many`` fits clones of ``estimator`` as one batch (``chunks``: on :class:`RowChunks`):
    an estimator with ``_fit_groups``, alone or after a ``StandardScaler``."""
    piped = isinstance(estimator, Pipeline)
    clf = estimator[-1] if piped else estimator
    return ((not piped or (len(estimator.steps) == 2 and isinstance(estimator[0], StandardScaler)))
            and hasattr(clf, "_fit_groups") and (not chunks or getattr(clf, "_reads_chunks", False)))


def fit_many(estimator: BaseEstimator, X: np.ndarray | RowChunks, y: np.ndarray, subsets: list[np.ndarray],
             max_cells: int = 2 ** 26) -> list[BaseEstimator]:
    """Clones of ``estimator`` (see :func:`batchable`) fitted on each row subset of ``X``, ``y``: one
    batched fit per ``max_cells`` outputs (rows, or a chunk's rows, x problems x outputs, where a group's
    problems are its held-out splits and its own fit). Only the rows of some subset take part (so a class
    that only scored rows hold is no class of the models); a subset that lacks one of their classes is
    fitted alone (its rows read whole)."""
    if not isinstance(X, RowChunks):
        assert_all_finite(X, input_name="X")  # the batched solvers would train on a NaN silently (chunks: as read)
    used = np.unique(np.concatenate(subsets))
    if len(used) < len(y):
        X = X.take(used) if isinstance(X, RowChunks) else X[used]
        y, subsets = y[used], [np.searchsorted(used, s) for s in subsets]
    piped = isinstance(estimator, Pipeline)
    clf = estimator[-1] if piped else estimator
    models = [clone(estimator) for _ in subsets]
    classes = len(np.unique(y)) if is_classifier(clf) and np.ndim(y) == 1 else None  # tags: every subset has every column
    together = [i for i, rows in enumerate(subsets) if classes is None or len(np.unique(y[rows])) == classes]
    if piped:
        for i, scaled in zip(together, _scalers(estimator[0], X, [subsets[i] for i in together])):
            models[i].steps[0] = (models[i].steps[0][0], scaled)
    for i in sorted(set(range(len(subsets))) - set(together)):
        models[i].fit(X[subsets[i]], y[subsets[i]])
    groups = [Group(subsets[i], models[i][0] if piped else None) for i in together]
    rows = X.step if isinstance(X, RowChunks) else len(y)
    outputs = n_outputs(y) if is_classifier(clf) else 1
    per_batch = max(1, max_cells // (rows * clf._problems_per_group * outputs))
    for start in range(0, len(groups), per_batch):
        part = together[start:start + per_batch]
        clf._fit_groups(X, y, groups[start:start + per_batch], [models[i][-1] if piped else models[i] for i in part])
    return models


def _scalers(scaler: StandardScaler, X: np.ndarray | RowChunks, subsets: list[np.ndarray]) -> list[StandardScaler]:
    """Clones of ``scaler`` fitted on each subset's rows of ``X``: of :class:`RowChunks` in one pass."""
    if not isinstance(X, RowChunks):
        return [clone(scaler).fit(X[rows]) for rows in subsets]
    fitted, masks = [clone(scaler) for _ in subsets], [np.isin(np.arange(len(X)), rows) for rows in subsets]
    for where, chunk in X:
        assert_all_finite(chunk, input_name="X")
        for s, mask in zip(fitted, masks):
            if mask[where].any():
                s.partial_fit(chunk[mask[where]])
    return fitted


def encode_classes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes of ``y`` and each row's index among them; at least two classes, as scikit-learn's
    classifiers require. Tags (a 0/1 matrix, a column each) are their own codes, the columns' numbers
    their classes, as scikit-learn's multi-label classifiers have them."""
    check_classification_targets(y)
    if type_of_target(y) == "multilabel-indicator":
        return np.arange(y.shape[1]), np.asarray(y, dtype=np.int64)
    if np.ndim(y) == 2:
        raise ValueError(f"takes one class per row or a 0/1 matrix of tags, got targets of type {type_of_target(y)!r}")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"needs samples of at least 2 classes, but the data contains only one class: {classes[0]!r}")
    return classes, codes


def one_softmax(codes: np.ndarray, n_classes: int) -> bool:
    """Whether a head's outputs for :func:`encode_classes`' ``codes`` are one softmax over the classes
    (more than two, one per row), not a sigmoid each (the tags; two classes' one margin)."""
    return codes.ndim == 1 and n_classes > 2


def n_outputs(y: np.ndarray) -> int:
    """The outputs of a linear or mlp head of targets ``y``: one per tag, one for two classes (the
    second's margin), else one per class."""
    classes = y.shape[1] if np.ndim(y) == 2 else len(np.unique(y))
    return 1 if np.ndim(y) == 1 and classes == 2 else classes


def output_targets(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """The 0/1 matrix a head's outputs (:func:`n_outputs`) are trained against, from
    :func:`encode_classes`' codes."""
    if codes.ndim == 2:
        return codes.astype(np.float32)
    Y = np.eye(n_classes, dtype=np.float32)[codes]
    return Y[:, 1:] if n_classes == 2 else Y


def group_scaling(groups: list[Group], d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the mean and scale its scaler standardises with (0 and 1 without one), ``(d, groups)`` each."""
    means = np.stack([g.scaler.mean_ if g.scaler else np.zeros(d) for g in groups], 1)
    scales = np.stack([g.scaler.scale_ if g.scaler else np.ones(d) for g in groups], 1)
    return means, scales


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Class probabilities from margins: a sigmoid of the one margin of two classes (a 1-D array or one
    column), else a softmax over the classes."""
    if scores.ndim == 1 or scores.shape[1] == 1:
        p = expit(scores.reshape(-1))
        return np.stack([1 - p, p], axis=1)
    return softmax(scores, axis=1)
