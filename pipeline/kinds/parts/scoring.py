"""How a row is scored: its primary metric with a 95 % interval (``score``'s ``core_columns``), its chance
level (what predictions that know nothing of the images score on the same images), the one-sided test
against chance, the primary metric alone (a fine-tune's epoch is chosen by it) and the paired test of
two rows' predictions of the same samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from .bootstrap import bootstrap, interval, p_permutation, p_two_sided, permutations


@dataclass
class Breakdown:
    """A row's metrics part by part (``pipeline report --row``): a table whose first column names what
    each line is about (a class, a tag, a range of the target), and what its plot draws: a confusion
    matrix (``labels``, ``confusion``: rows true, columns predicted) or the predictions against the truth
    (``scatter``: true, predicted)."""

    columns: tuple[str, ...]
    lines: list[tuple]
    labels: list[str] | None = None
    confusion: list[list[int]] | None = None
    scatter: tuple[np.ndarray, np.ndarray] | None = None


class ShuffledChance:
    """Chance as what predictions that know nothing of the images score on the same images: the exact
    expectation of the metric (``_expected``) when the row's own predictions are shuffled among the
    scored images of each fold, which keeps the row's values, ties and each fold model's scale; and the
    one-sided permutation test against it (``_metric(truth, predictions, perms=...)``: permuting the truth
    pairs the same values as permuting the predictions). Folds matter: each fold's predictions come from
    a different model, whose scale and offset are set by its own training labels, so only images of one
    fold are exchangeable.

    On a held-out split the test is exact. Under cross-validation it is not: image i's prediction learnt
    from j's label and j's from i's, so the folds' agreements vary together, which shuffles within folds
    do not see. For predictions linear in the training labels (ridge, nearest neighbours, centroids) that
    adds at most the shuffles' own variance (a quadratic form with no diagonal: sum A_ij A_ji <= sum
    A_ij²), so there the shuffled values are spread by sqrt(2) around chance."""

    def _metric(self, truth: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None,
                perms: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def _expected(self, truth: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> float:
        raise NotImplementedError

    def _against_chance(self, truth: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> dict:
        """``chance`` and ``p_above_chance`` of a row's predictions of ``truth``."""
        observed = float(self._metric(truth, pred)[0])
        chance = self._expected(truth, pred, folds)
        null = np.concatenate([self._metric(truth, pred, perms=p) for p in permutations(folds)])
        if len(np.unique(folds)) > 1:
            null = chance + np.sqrt(2) * (null - chance)
        return dict(chance=chance, p_above_chance=p_permutation(observed, null))


class AccuracyScoring(ShuffledChance):
    """Accuracy with a Wilson interval and its spread over folds, the permutation test against the
    shuffled predictions' accuracy as chance (a row that always predicts the majority class scores
    exactly chance) and exact McNemar test between rows."""

    primary = "accuracy"
    interval = ("acc_low", "acc_high")
    core_columns = ("accuracy", "acc_low", "acc_high", "acc_std", "chance")

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray, names: list[str]) -> dict:
        correct = y_true == y_pred
        n, right = len(y_true), int(correct.sum())
        low, high = binomtest(right, n).proportion_ci(0.95, method="wilson")
        per_fold = [correct[folds == f].mean() for f in np.unique(folds)]
        return dict(accuracy=right / n, acc_low=float(low), acc_high=float(high),
                    acc_std=float(np.std(per_fold)) if len(per_fold) > 1 else None,
                    **self._against_chance(y_true, y_pred, folds))

    def _against_chance(self, truth: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> dict:
        # as integer codes, made once: each batch of permutations then compares integers (at 200,000
        # images, coding the labels for each of the 100 batches took 4.6 s of a row's 8 s of scoring)
        return super()._against_chance(*_class_codes(truth, pred), folds)

    def _metric(self, truth: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None,
                perms: np.ndarray | None = None) -> np.ndarray:
        return _coded_accuracy(truth, pred, perms)

    def _expected(self, truth: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> float:
        return _coded_expected_accuracy(truth, pred, folds)

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))

    def breakdown(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> Breakdown:
        """Each class's precision, recall, F1 and support, and the confusion matrix."""
        from sklearn.metrics import classification_report, confusion_matrix

        labels = sorted(set(y_true) | set(y_pred))
        report = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
        lines = [(c, report[c]["precision"], report[c]["recall"], report[c]["f1-score"], int(report[c]["support"]))
                 for c in labels]
        return Breakdown(("class", "precision", "recall", "f1", "support"), lines, labels,
                         confusion_matrix(y_true, y_pred, labels=labels).tolist())

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        """Exact McNemar test: of the samples exactly one of the two rows got right, is either side more
        often the one?"""
        a, b = mine == y_true, best == y_true
        only_best, only_mine = int((b & ~a).sum()), int((a & ~b).sum())
        return float(binomtest(only_best, only_best + only_mine).pvalue) if only_best + only_mine else 1.0


class ResamplingScoring(ShuffledChance):
    """A metric computed for many resamples at once (``_metric(truth, predictions, draws, perms)``): its
    95 % percentile bootstrap interval, chance and the test against it (``ShuffledChance``), and the test
    between rows paired on the same bootstrap resamples. A part built on it says how labels become
    ``_truth``, which ``_metric`` and its ``_expected``."""

    primary: str
    interval: tuple[str, str]

    def _truth(self, y_true: np.ndarray, names: list[str]) -> np.ndarray:
        raise NotImplementedError

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray, names: list[str]) -> dict:
        truth = self._truth(y_true, names)
        low, high = interval(np.concatenate([self._metric(truth, y_pred, w) for w in bootstrap(len(truth))]))
        return {self.primary: float(self._metric(truth, y_pred)[0]), self.interval[0]: low,
                self.interval[1]: high, **self._against_chance(truth, y_pred, folds)}

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        return float(self._metric(self._truth(y_true, names), y_pred)[0])

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        truth = self._truth(y_true, names)
        return p_two_sided(np.concatenate([self._metric(truth, mine, w) - self._metric(truth, best, w)
                                           for w in bootstrap(len(truth))]))


class MeanAPScoring(ResamplingScoring):
    """Mean average precision over tags (``map``) of score matrices, bootstrap interval, permutation test
    against chance, the expected mean AP of the row's scores shuffled within folds as chance (above each
    tag's prevalence: a random ranking of few positives scores more), paired bootstrap test between rows.
    Reads the tags as ``target``'s 0/1 matrix."""

    primary = "map"
    interval = ("map_low", "map_high")
    core_columns = ("map", "map_low", "map_high", "chance")

    def _truth(self, y_true: np.ndarray, names: list[str]) -> np.ndarray:
        return self.target(y_true, names)

    def _metric(self, truth: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None,
                perms: np.ndarray | None = None) -> np.ndarray:
        return mean_ap(truth, pred, draws, perms)

    def _expected(self, truth: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> float:
        return expected_mean_ap(truth, pred, folds)

    def breakdown(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> Breakdown:
        """Each tag's average precision (as ``map`` averages it; empty for a tag no scored image has),
        precision, recall and F1 at 0.5, and support (the scored images with the tag)."""
        from sklearn.metrics import precision_recall_fscore_support

        Y = self._truth(y_true, names)
        precision, recall, f1, support = precision_recall_fscore_support(Y, y_pred >= 0.5, zero_division=0)
        return Breakdown(("tag", "ap", "precision", "recall", "f1", "support"),
                         list(zip(names, mean_ap_per_tag(Y, y_pred), precision, recall, f1, support.tolist())))


class R2Scoring(ResamplingScoring):
    """R² of numbers, bootstrap interval, permutation test against chance, the expected R² of the row's
    predictions shuffled within folds as chance (at most 0: varied predictions that know nothing of the
    images score below the training mean's 0), paired bootstrap test between rows."""

    primary = "r2"
    interval = ("r2_low", "r2_high")
    core_columns = ("r2", "r2_low", "r2_high", "chance")

    def _truth(self, y_true: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(y_true, dtype=np.float64)

    def _metric(self, truth: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None,
                perms: np.ndarray | None = None) -> np.ndarray:
        return r2(truth, pred, draws, perms)

    def _expected(self, truth: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> float:
        return expected_r2(truth, pred, folds)

    def breakdown(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> Breakdown:
        """MAE, RMSE and the mean error (predicted minus true: a model drawn to the mean errs upwards at the
        bottom of the range and downwards at the top) over every scored image, then over each quarter of
        them ordered by true target (equal counts, so the ranges differ in width); the predictions against
        the truth for the plot."""
        y, pred = self._truth(y_true, names), np.asarray(y_pred, dtype=np.float64)
        edges = np.quantile(y, [0, 0.25, 0.5, 0.75, 1])
        quarter = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, 3)
        parts = [("all", np.ones(len(y), bool))] + [(f"{edges[q]:.4g} to {edges[q + 1]:.4g}", quarter == q) for q in range(4)]
        lines = [(what, *errors(y[at], pred[at]), int(at.sum())) for what, at in parts if at.any()]
        return Breakdown(("target", "mae", "rmse", "mean_error", "n"), lines, scatter=(y, pred))


def accuracy(y: np.ndarray, pred: np.ndarray, perms: np.ndarray | None = None) -> np.ndarray:
    """The share of predictions equal to the truth, for each row of ``perms`` (prediction ``i`` paired
    with label ``perms[b, i]``) at once, or for the data as it is."""
    return _coded_accuracy(*_class_codes(y, pred), perms)


def _coded_accuracy(truth: np.ndarray, guess: np.ndarray, perms: np.ndarray | None = None) -> np.ndarray:
    """:func:`accuracy` of integer class codes (:func:`_class_codes`)."""
    return np.mean(truth[np.arange(len(truth))[None] if perms is None else perms] == guess, axis=1)


def expected_accuracy(y: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> float:
    """The exact expectation of ``accuracy(y, pred)`` when the predictions are shuffled within each fold:
    per fold, the sum over classes of (images of the class) x (predictions of it) / (images)."""
    return _coded_expected_accuracy(*_class_codes(y, pred), folds)


def _coded_expected_accuracy(truth: np.ndarray, guess: np.ndarray, folds: np.ndarray) -> float:
    """:func:`expected_accuracy` of integer class codes (:func:`_class_codes`)."""
    k = max(truth.max(), guess.max()) + 1
    hits = sum(np.bincount(truth[f], minlength=k) @ np.bincount(guess[f], minlength=k) / np.sum(f)
               for f in (folds == fold for fold in np.unique(folds)))
    return float(hits / len(truth))


def _class_codes(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes and predicted classes as integer codes, the same class the same code."""
    _, codes = np.unique(np.r_[np.asarray(y, dtype=str), np.asarray(pred, dtype=str)], return_inverse=True)
    return codes[:len(y)], codes[len(y):]


def _weights_and_pairing(n: int, draws: np.ndarray | None, perms: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap weights (a row per draw, or ones) and which truth row each prediction is paired with (a
    row per permutation, or each its own)."""
    W = np.ones((1, n)) if draws is None else draws
    P = np.arange(n)[None] if perms is None else perms
    return W, P


def mean_ap(Y: np.ndarray, S: np.ndarray, draws: np.ndarray | None = None,
            perms: np.ndarray | None = None) -> np.ndarray:
    """Mean over tags of average precision (scikit-learn's definition, ties grouped), for each row of
    ``draws`` (bootstrap weights) or of ``perms`` (image ``i``'s scores paired with image ``perms[b, i]``'s
    tags) at once, or for the data as it is; over the tags with a positive image. A bootstrap draw
    that holds none of a tag's positives keeps that tag's average precision on the data as it is:
    leaving it out would average the draws that miss a rare tag over other tags, and move the interval
    away from the score (a tag on 2 of 153 images lifted ``map_high`` from about 0.70 to 0.83)."""
    W, P = _weights_and_pairing(len(Y), draws, perms)
    per_tag = np.stack([_average_precision(Y[P, j], S[:, j], W) for j in range(Y.shape[1])], axis=1)
    if draws is not None and np.isnan(per_tag).any():
        per_tag = np.where(np.isnan(per_tag), mean_ap_per_tag(Y, S), per_tag)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(per_tag), per_tag, np.nan), axis=1)


def mean_ap_per_tag(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Each tag's average precision on the data as it is (NaN for a tag without a positive image)."""
    return np.array([_average_precision(Y[None, :, j], S[:, j], np.ones((1, len(Y))))[0] for j in range(Y.shape[1])])


def _average_precision(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted average precision of one tag for each row of ``W`` and of ``y`` (its labels, one row or a
    row per draw): the sum over score thresholds of the recall gained times the precision there."""
    order = np.argsort(-s, kind="stable")
    s, y, W = s[order], y[:, order], W[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last row of each group of tied scores
    tp = np.cumsum(W * y, axis=1)[:, ends]
    seen = np.cumsum(W, axis=1)[:, ends]
    gained = np.diff(tp, axis=1, prepend=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        return np.where(tp[:, -1] > 0, (gained * precision).sum(1) / tp[:, -1], np.nan)


def expected_mean_ap(Y: np.ndarray, S: np.ndarray, folds: np.ndarray) -> float:
    """The exact expectation of ``mean_ap(Y, S)`` when the images' scores are shuffled within each fold,
    over tags with a positive image (NaN when none has)."""
    per_tag = [_expected_average_precision(Y[:, j], S[:, j], folds) for j in range(Y.shape[1]) if Y[:, j].any()]
    return float(np.mean(per_tag)) if per_tag else float("nan")


def _expected_average_precision(y: np.ndarray, s: np.ndarray, folds: np.ndarray) -> float:
    """The exact expected average precision of one tag when its labels are shuffled among the images of
    each fold, scores (and their ties) kept. AP is the sum over groups g of tied scores, best first, of
    X_g (X_g + Y_g) / (m N_g): X_g the positives in g, Y_g those ranked above g, N_g the images in or above
    g, m the positives. Each fold's counts are hypergeometric and the folds are independent, so
    E[X (X + Y)] = Var X + E[X]² + Cov(X, Y) + E[X] E[Y] has a closed form. With one fold and no ties it is
    the expected AP of a random ranking, (m-1)/(n-1) + (n-m) H_n / (n (n-1)) (Bestgen 2015)."""
    order = np.argsort(-s, kind="stable")
    group = np.r_[0, np.cumsum(np.diff(s[order]) != 0)]
    fold = np.unique(folds, return_inverse=True)[1].ravel()[order]
    a = np.zeros((group[-1] + 1, fold.max() + 1))  # images of each fold in each group of tied scores
    np.add.at(a, (group, fold), 1.0)
    b = np.cumsum(a, axis=0) - a  # images of each fold ranked above the group
    n = a.sum(0)
    p = np.bincount(fold, weights=y[order], minlength=len(n)) / n  # each fold's positive rate
    q = p * (1 - p) / np.maximum(n - 1, 1)
    ex, ey = a @ p, b @ p
    var_x, cov_xy = (a * (n - a) * q).sum(1), -(a * b * q).sum(1)
    return float(np.sum((var_x + ex**2 + cov_xy + ex * ey) / (a + b).sum(1)) / y.sum())


def errors(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Mean absolute error, root mean squared error and mean error (predicted minus true)."""
    error = np.asarray(pred, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return float(np.mean(np.abs(error))), float(np.sqrt(np.mean(error ** 2))), float(np.mean(error))


def r2(y: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None, perms: np.ndarray | None = None) -> np.ndarray:
    """R² (1 - squared error / the variance around the mean) for each row of ``draws`` (bootstrap
    weights) or of ``perms`` (prediction ``i`` paired with target ``perms[b, i]``) at once, or for the data
    as it is."""
    W, P = _weights_and_pairing(len(y), draws, perms)
    y = y[P]
    total = W.sum(1, keepdims=True)
    mean = (W * y).sum(1, keepdims=True) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - (W * (y - pred) ** 2).sum(1) / (W * (y - mean) ** 2).sum(1)


def expected_r2(y: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> float:
    """The exact expectation of ``r2(y, pred)`` when the predictions are shuffled within each fold: a
    fold of n images adds n (Var y + Var pred + (mean y - mean pred)²) to the expected squared error,
    so it is at most 0."""
    error = sum(np.sum(f) * (np.var(y[f]) + np.var(pred[f]) + (np.mean(y[f]) - np.mean(pred[f])) ** 2)
                for f in (folds == k for k in np.unique(folds)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(1 - error / np.sum((y - np.mean(y)) ** 2))
