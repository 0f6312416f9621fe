"""Cross-validation splitters of this project, below both the heads and the estimators they build."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold


class StratifiedKFoldUpTo(StratifiedKFold):
    """Stratified k-fold with at most ``n_splits`` folds: fewer when the rarest class is smaller.

    Lets an inner cross-validation (e.g. choosing C) run on few-shot data instead of failing. With a
    single example of some class there are no folds: the one split scores on the training rows themselves.
    """

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits if y is None else max(1, self._folds(y))

    def split(self, X, y, groups=None):
        folds = self._folds(y)
        if folds < 2:
            everything = np.arange(len(y))
            yield everything, everything
            return
        yield from StratifiedKFold(folds, shuffle=self.shuffle, random_state=self.random_state).split(X, y, groups)

    def _folds(self, y) -> int:
        _, counts = np.unique(y, return_counts=True)
        return min(self.n_splits, int(counts.min()))


def tag_folds(Y: np.ndarray, n_folds: int, seed) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` folds of the rows of a tag matrix ``Y`` (0/1, a column per tag), every tag in each in
    proportion by iterative stratification (the ``iterative-stratification`` package); none for fewer
    than five rows."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    return [] if len(Y) < max(5, n_folds) else list(MultilabelStratifiedKFold(n_folds, shuffle=True, random_state=seed).split(Y, Y))


def tag_holdout(Y: np.ndarray, fraction: float, seed) -> list[tuple[np.ndarray, np.ndarray]]:
    """One hold-out of ``fraction`` of the rows of a tag matrix, stratified as :func:`tag_folds`."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    return [] if len(Y) < 5 else list(MultilabelStratifiedShuffleSplit(1, test_size=fraction, random_state=seed).split(Y, Y))
