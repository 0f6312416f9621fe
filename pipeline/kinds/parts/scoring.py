"""How a row is scored: its primary metric with a 95 % interval (``score``'s ``core_columns``), what the
chance baseline predicts, the one-sided test against chance, the primary metric alone (a fine-tune's
epoch is chosen by it) and the paired test of two rows' predictions of the same samples."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from .bootstrap import bootstrap, interval, p_greater, p_two_sided


class AccuracyScoring:
    """Accuracy with a Wilson interval and its spread over folds, the majority class as chance, exact
    binomial test against chance and exact McNemar test between rows."""

    primary = "accuracy"
    interval = ("acc_low", "acc_high")
    core_columns = ("accuracy", "acc_low", "acc_high", "acc_std", "chance")

    def chance(self, y_train: np.ndarray, n: int, names: list[str]) -> np.ndarray:
        classes, counts = np.unique(y_train, return_counts=True)
        return np.full(n, classes[np.argmax(counts)], dtype=object)

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, y_chance: np.ndarray, folds: np.ndarray,
              names: list[str]) -> dict:
        correct = y_true == y_pred
        n, right = len(y_true), int(correct.sum())
        low, high = binomtest(right, n).proportion_ci(0.95, method="wilson")
        per_fold = [correct[folds == f].mean() for f in np.unique(folds)]
        chance = float(np.mean(y_true == y_chance))
        return dict(
            accuracy=right / n, acc_low=float(low), acc_high=float(high),
            acc_std=float(np.std(per_fold)) if len(per_fold) > 1 else None, chance=chance,
            p_above_chance=float(binomtest(right, n, chance, alternative="greater").pvalue),
        )

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        """Exact McNemar test: of the samples exactly one of the two rows got right, is either side more
        often the one?"""
        a, b = mine == y_true, best == y_true
        only_best, only_mine = int((b & ~a).sum()), int((a & ~b).sum())
        return float(binomtest(only_best, only_best + only_mine).pvalue) if only_best + only_mine else 1.0


class BootstrapScoring:
    """A metric computed for many bootstrap resamples at once (``_metric(truth, predictions, draws)``):
    its 95 % percentile interval, and the tests against chance and between rows paired on the same
    resamples. A part built on it says how labels become ``_truth`` and which ``_metric``."""

    primary: str
    interval: tuple[str, str]

    def _truth(self, y_true: np.ndarray, names: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _metric(self, truth: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, y_chance: np.ndarray, folds: np.ndarray,
              names: list[str]) -> dict:
        truth = self._truth(y_true, names)
        draws = bootstrap(len(truth))
        mine, chance = self._metric(truth, y_pred, draws), self._metric(truth, y_chance, draws)
        low, high = interval(mine)
        return {self.primary: float(self._metric(truth, y_pred)[0]), self.interval[0]: low, self.interval[1]: high,
                "chance": float(self._metric(truth, y_chance)[0]), "p_above_chance": p_greater(mine - chance)}

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        return float(self._metric(self._truth(y_true, names), y_pred)[0])

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        truth = self._truth(y_true, names)
        draws = bootstrap(len(truth))
        return p_two_sided(self._metric(truth, mine, draws) - self._metric(truth, best, draws))


class MeanAPScoring(BootstrapScoring):
    """Mean average precision over tags (``map``) of score matrices, each tag's training prevalence as
    chance, paired bootstrap interval and tests. Reads the tags as ``target``'s 0/1 matrix."""

    primary = "map"
    interval = ("map_low", "map_high")
    core_columns = ("map", "map_low", "map_high", "chance")

    def chance(self, y_train: np.ndarray, n: int, names: list[str]) -> np.ndarray:
        return np.tile(self.target(y_train, names).mean(0), (n, 1)).astype(np.float64)

    def _truth(self, y_true: np.ndarray, names: list[str]) -> np.ndarray:
        return self.target(y_true, names)

    def _metric(self, truth: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
        return mean_ap(truth, pred, draws)


class R2Scoring(BootstrapScoring):
    """R² of numbers, the training mean as chance, paired bootstrap interval and tests."""

    primary = "r2"
    interval = ("r2_low", "r2_high")
    core_columns = ("r2", "r2_low", "r2_high", "chance")

    def chance(self, y_train: np.ndarray, n: int, names: list[str]) -> np.ndarray:
        return np.full(n, float(np.mean(np.asarray(y_train, dtype=np.float64))))

    def _truth(self, y_true: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(y_true, dtype=np.float64)

    def _metric(self, truth: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
        return r2(truth, pred, draws)


def mean_ap(Y: np.ndarray, S: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
    """Mean over tags of average precision (scikit-learn's definition, ties grouped), for each row of
    ``draws`` (bootstrap weights) at once, or for the data as it is; tags without a positive row in a
    draw are left out of its mean."""
    W = np.ones((1, len(Y))) if draws is None else draws
    per_tag = np.stack([_average_precision(Y[:, j], S[:, j], W) for j in range(Y.shape[1])], axis=1)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(per_tag), per_tag, np.nan), axis=1)


def _average_precision(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted average precision of one tag for each row of ``W``: the sum over score thresholds of the
    recall gained times the precision there."""
    order = np.argsort(-s, kind="stable")
    s, y, W = s[order], y[order], W[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last row of each group of tied scores
    tp = np.cumsum(W * y, axis=1)[:, ends]
    seen = np.cumsum(W, axis=1)[:, ends]
    gained = np.diff(tp, axis=1, prepend=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        return np.where(tp[:, -1] > 0, (gained * precision).sum(1) / tp[:, -1], np.nan)


def r2(y: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
    """R² (1 - squared error / the variance around the mean) for each row of ``draws`` (bootstrap
    weights) at once, or for the data as it is."""
    W = np.ones((1, len(y))) if draws is None else draws
    total = W.sum(1, keepdims=True)
    mean = (W * y).sum(1, keepdims=True) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - (W * (y - pred) ** 2).sum(1) / (W * (y - mean) ** 2).sum(1)
