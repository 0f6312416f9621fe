"""How rows are split: the fold each row is scored in for cross-validation (``folds``), and a seeded
hold-out of a training set (``subsplit``, for a head's own early stopping or search).

``folds`` takes ``groups``, one label per row (several photos of one object or patient, near-copies):
rows that share a label are scored in the same fold, so no fold trains on a copy of what it scores.
Without groups the folds are exactly those of the plain splitter."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold, train_test_split


class StratifiedSplits:
    """Every class in every fold and in the hold-out, in proportion (one class per image); with groups,
    as near proportion as whole groups allow (scikit-learn's ``StratifiedGroupKFold``)."""

    def folds(self, y: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
        if groups is None:
            splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
        else:
            splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
        return fold_index(len(y), splitter.split(np.zeros(len(y)), y, groups))

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        classes, counts = np.unique(y, return_counts=True)
        n_held = int(np.ceil(fraction * len(y)))
        if counts.min() < 2 or not len(classes) <= n_held <= len(y) - len(classes):
            return None
        keep, held = train_test_split(np.arange(len(y)), test_size=n_held, random_state=seed, stratify=y)
        return np.sort(keep), np.sort(held)


class TagStratifiedSplits:
    """Every tag in every fold, in proportion, by iterative stratification (the
    ``iterative-stratification`` package) of the 0/1 matrix ``target`` makes of the tags; with groups,
    of the groups, each carrying every tag of any of its rows."""

    def folds(self, y: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        Y = self.target(y, self.names(y))
        inverse = np.arange(len(y))
        if groups is not None:
            _, inverse = np.unique(groups, return_inverse=True)
            by_group = np.zeros((inverse.max() + 1, Y.shape[1]), Y.dtype)
            np.maximum.at(by_group, inverse, Y)
            Y = by_group
        splitter = MultilabelStratifiedKFold(n_folds, shuffle=True, random_state=seed)
        return fold_index(len(Y), splitter.split(Y, Y))[inverse]

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        if len(y) < 5:
            return None
        Y = self.target(y, self.names(y))
        keep, held = next(MultilabelStratifiedShuffleSplit(1, test_size=fraction, random_state=seed).split(Y, Y))
        return np.sort(keep), np.sort(held)


class ShuffledSplits:
    """Plain shuffled folds and hold-out, whatever the labels (numbers); with groups, scikit-learn's
    shuffled ``GroupKFold``."""

    def folds(self, y: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
        splitter = (KFold if groups is None else GroupKFold)(n_folds, shuffle=True, random_state=seed)
        return fold_index(len(y), splitter.split(np.zeros(len(y)), y, groups))

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        if len(y) < 5:
            return None
        keep, held = train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed)
        return np.sort(keep), np.sort(held)


def fold_index(n: int, splits: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A scikit-learn splitter's ``(train, test)`` pairs as the fold each of ``n`` rows is tested in."""
    fold = np.empty(n, np.int64)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    return fold
