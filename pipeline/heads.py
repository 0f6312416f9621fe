"""Heads: scikit-learn estimators picked by name from a registry, each with the preprocessing it needs.

Every head is a plain scikit-learn estimator (often a ``Pipeline``), so a user can put it in their own
``cross_val_score`` or ``GridSearchCV``. Fitted heads are saved with skops; loading checks the file's
types against the list this project trusts instead of passing everything through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
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


_REGISTRY: dict[str, HeadSpec] = {}


def register_head(name: str, doc: str, linear: bool = False):
    """Register ``build(random_state) -> estimator`` under ``name`` (decorator)."""

    def wrap(build: Callable[[int], BaseEstimator]) -> Callable[[int], BaseEstimator]:
        _REGISTRY[name] = HeadSpec(name, build, doc, linear)
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
