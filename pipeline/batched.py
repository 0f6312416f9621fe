"""Many models of one head fitted side by side: the folds of a cross-validation and the refit on all
rows, as one batched problem instead of one fit after another. A head takes part when it is a
``StandardScaler`` then an estimator with ``_fit_groups(X, y, groups, models)`` (the torch heads of
:mod:`pipeline.linear_probe` and :mod:`pipeline.mlp_probe`); the result is the models fitting each
clone on its own rows gives."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


class Group:
    """The rows one model is fitted on, its scaler (None: the features as they are) and, for a head that
    chooses its regularisation on held-out rows, the splits of those rows (filled in by the estimator)."""

    def __init__(self, rows: np.ndarray, scaler: StandardScaler | None = None):
        self.rows, self.scaler, self.splits = np.asarray(rows), scaler, []


def batchable(estimator: BaseEstimator) -> bool:
    """Whether ``fit_many`` fits clones of ``estimator`` as one batch."""
    return (isinstance(estimator, Pipeline) and len(estimator.steps) == 2 and isinstance(estimator[0], StandardScaler)
            and hasattr(estimator[-1], "_fit_groups"))


def fit_many(estimator: Pipeline, X: np.ndarray, y: np.ndarray, subsets: list[np.ndarray],
             max_cells: int = 2 ** 26) -> list[Pipeline]:
    """Clones of ``estimator`` (see :func:`batchable`) fitted on each row subset of ``X``, ``y``: one
    batched fit per ``max_cells`` outputs (rows x problems x outputs, where a group's problems are its
    held-out splits and its own fit). A subset that lacks a class of ``y`` is fitted alone."""
    scaler, clf = estimator[0], estimator[-1]
    models = [clone(estimator) for _ in subsets]
    classes = len(np.unique(y))
    together = []
    for i, rows in enumerate(subsets):
        if len(np.unique(y[rows])) < classes:
            models[i].fit(X[rows], y[rows])
        else:
            together.append(i)
            models[i].steps[0] = (models[i].steps[0][0], clone(scaler).fit(X[rows]))
    groups = [Group(subsets[i], models[i][0]) for i in together]
    per_batch = max(1, max_cells // (len(y) * clf._problems_per_group * (1 if classes == 2 else classes)))
    for start in range(0, len(groups), per_batch):
        part = together[start:start + per_batch]
        clf._fit_groups(X, y, groups[start:start + per_batch], [models[i][-1] for i in part])
    return models
