"""Heads: scikit-learn estimators picked by name from a registry, each with the preprocessing it needs.

Every head is a plain scikit-learn estimator (often a ``Pipeline``), so a user can put it in their own
``cross_val_score`` or ``GridSearchCV``. Fitted heads are saved with skops; loading checks the file's
types against the list this project trusts instead of passing everything through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .errors import PipelineError


class StratifiedKFoldUpTo(StratifiedKFold):
    """Stratified k-fold with at most ``n_splits`` folds: fewer when the rarest class is smaller.

    Lets an inner cross-validation (e.g. choosing C) run on few-shot data instead of failing.
    """

    def split(self, X, y, groups=None):
        _, counts = np.unique(y, return_counts=True)
        folds = max(2, min(self.n_splits, int(counts.min())))
        return StratifiedKFold(folds, shuffle=self.shuffle, random_state=self.random_state).split(X, y, groups)


# What skops may rebuild when loading a head: scikit-learn internals its own check flags, plus ours.
TRUSTED_TYPES = (
    "sklearn.metrics._classification.log_loss",
    "sklearn.metrics._scorer._Scorer",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    f"{__name__}.StratifiedKFoldUpTo",
)


@dataclass(frozen=True)
class HeadSpec:
    name: str
    build: Callable[[int], BaseEstimator]
    doc: str
    linear: bool = False
    chunked: bool = False  # trains by row chunks (``fit_by_chunks``), so the features need not fit in memory


_REGISTRY: dict[str, HeadSpec] = {}


def register_head(name: str, doc: str, linear: bool = False, chunked: bool = False):
    """Register ``build(random_state) -> estimator`` under ``name`` (decorator). A ``chunked`` head is
    a ``Pipeline`` of a scaler and a classifier that both have ``partial_fit``."""

    def wrap(build: Callable[[int], BaseEstimator]) -> Callable[[int], BaseEstimator]:
        _REGISTRY[name] = HeadSpec(name, build, doc, linear, chunked)
        return build

    return wrap


def list_heads() -> dict[str, str]:
    """Registered head names and their one-line descriptions."""
    return {name: spec.doc for name, spec in _REGISTRY.items()}


def head_spec(name: str) -> HeadSpec:
    if name not in _REGISTRY:
        raise PipelineError(f"unknown head {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create_head(name: str, random_state: int = 0) -> BaseEstimator:
    """A new, unfitted head by registry name."""
    return head_spec(name).build(random_state)


@register_head("logreg", "standardise + L2 logistic regression, C chosen by 5-fold CV (log loss) on the training data", linear=True)
def _logreg(random_state: int) -> BaseEstimator:
    return GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        {"logisticregression__C": np.logspace(-4, 2, 13)},
        cv=StratifiedKFoldUpTo(5, shuffle=True, random_state=random_state),
        scoring="neg_log_loss",
    )


@register_head("mlp", "standardise + one hidden layer of 512 ReLU units (Adam, L2 1e-3)")
def _mlp(random_state: int) -> BaseEstimator:
    return make_pipeline(
        StandardScaler(),
        MLPClassifier((512,), alpha=1e-3, max_iter=500, random_state=random_state),
    )


@register_head("knn", "k=10 nearest neighbours on cosine distance, distance-weighted votes")
def _knn(random_state: int) -> BaseEstimator:
    return KNeighborsClassifier(n_neighbors=10, metric="cosine", weights="distance")


SGD_EPOCHS = 10


@register_head("sgd", f"standardise + logistic regression by SGD (log loss, L2 1e-4, {SGD_EPOCHS} epochs); "
               "trains by row chunks, so the cache need not fit in memory", linear=True, chunked=True)
def _sgd(random_state: int) -> BaseEstimator:
    return make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", alpha=1e-4, random_state=random_state))


def fit_by_chunks(estimator: BaseEstimator, chunks: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
                  classes: np.ndarray, epochs: int = SGD_EPOCHS) -> BaseEstimator:
    """Fit a chunked head from ``chunks(epoch)``, which yields (X, y) row chunks covering the training
    rows (in a new order each epoch): one pass for the scaler's statistics, then ``epochs`` passes of the
    classifier's ``partial_fit``. Memory holds one chunk at a time."""
    scaler, clf = estimator[0], estimator[-1]
    for X, _ in chunks(-1):
        scaler.partial_fit(X)
    for epoch in range(epochs):
        for X, y in chunks(epoch):
            clf.partial_fit(scaler.transform(X), y, classes=classes)
    return estimator


def save_head(estimator: BaseEstimator, path: str | os.PathLike) -> Path:
    """Write a fitted head with skops (no code runs when it is loaded)."""
    import skops.io as sio  # imported here: it pulls in torch, which processes that only fit heads skip

    path = Path(path)
    sio.dump(estimator, path)
    return path


def load_head(path: str | os.PathLike) -> BaseEstimator:
    """Load a skops head, refusing any type outside :data:`TRUSTED_TYPES`."""
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"head file not found: {path}")
    untrusted = sio.get_untrusted_types(file=path)
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise PipelineError(f"{path} holds types this project does not trust: {', '.join(refused)}")
    return sio.load(path, trusted=untrusted)
