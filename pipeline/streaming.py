"""Ridge from sufficient statistics: standardise + ridge fitted in one pass over the rows, so features
are read by chunks and never held whole.

A pass adds up, per block of rows, the count, the sums of ``x`` and ``y``, ``X^T X``, ``X^T Y`` and the
squares of ``y`` (:class:`Moments`, float64). Everything a ridge with standardised features needs is a
function of those sums: the standardisation (mean and deviation), the centred Gram matrix, and, for a
model fitted on some blocks, its squared error on the others,
``||Y - XW - b||^2 = tr(Y^T Y) - 2 tr(W^T X^T Y) + tr(W^T X^T X W) + ...``. Rows fall in ``cv`` inner
folds by their position (row ``i`` in fold ``i mod cv``); each fold's model is solved from one
eigendecomposition of its standardised Gram matrix, so every ``alpha`` costs a matrix product; the
``alpha`` with the least held-out error is refit on all rows. The fit stage's own folds come from the
same pass (:func:`fit_subsets_in_one_pass`): sums are kept per group of rows that belong to the same
subsets, and a subset's sums are those of its groups.

The estimators are :class:`StreamingRidgeClassifier` (one-vs-rest ``+-1`` targets as
``RidgeClassifier``, or a ``0/1`` tag matrix) and :class:`StreamingRidge` (regression).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Callable, Iterable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .validation import check_estimator_params

ALPHAS = tuple(np.logspace(-1, 5, 13))
_STEP = 8192  # rows turned into float64 at a time while adding them up


@dataclass
class Moments:
    """Sums over rows of ``x`` (``d`` features) and ``y`` (``t`` target columns), one block per inner
    fold (the leading axis), in float64: count, sum of x, X^T X, sum of y, X^T Y, sum of y^2 per column."""

    n: np.ndarray
    sx: np.ndarray
    xx: np.ndarray
    sy: np.ndarray
    xy: np.ndarray
    yy: np.ndarray

    @classmethod
    def zeros(cls, blocks: int, d: int, t: int) -> "Moments":
        z = lambda *shape: np.zeros(shape, np.float64)  # noqa: E731
        return cls(z(blocks), z(blocks, d), z(blocks, d, d), z(blocks, t), z(blocks, d, t), z(blocks, t))

    def add(self, X: np.ndarray, Y: np.ndarray, blocks: np.ndarray) -> "Moments":
        """Add the rows of ``X``, ``Y`` to the blocks ``blocks`` names (in place; returns self)."""
        for i in range(0, len(X), _STEP):
            x, y = np.asarray(X[i:i + _STEP], np.float64), np.asarray(Y[i:i + _STEP], np.float64)
            at = blocks[i:i + _STEP]
            for b in np.unique(at):
                xb, yb = (x, y) if (at == b).all() else (x[at == b], y[at == b])
                self.n[b] += len(xb)
                self.sx[b] += xb.sum(0)
                self.xx[b] += xb.T @ xb
                self.sy[b] += yb.sum(0)
                self.xy[b] += xb.T @ yb
                self.yy[b] += (yb ** 2).sum(0)
        return self

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: "Moments") -> "Moments":
        return Moments(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def block(self, b: int) -> "Moments":
        return Moments(*(getattr(self, f.name)[b:b + 1] for f in fields(self)))

    def total(self) -> "Moments":
        """All blocks as one."""
        return Moments(*(getattr(self, f.name).sum(0, keepdims=True) for f in fields(self)))

    def columns(self, cols: np.ndarray) -> "Moments":
        """The sums of the target columns ``cols`` only."""
        return Moments(self.n, self.sx, self.xx, self.sy[:, cols], self.xy[:, :, cols], self.yy[:, cols])

    def standardised(self, mean: np.ndarray, scale: np.ndarray) -> "Moments":
        """The sums of ``(x - mean) / scale`` in place of ``x`` (exact: the map is affine)."""
        n, inv = self.n[:, None], 1 / scale
        sx = (self.sx - n * mean) * inv
        cross = mean[None, :, None] * self.sx[:, None, :]
        xx = (self.xx - cross - cross.transpose(0, 2, 1) + n[:, :, None] * np.outer(mean, mean)) * np.outer(inv, inv)
        xy = (self.xy - mean[None, :, None] * self.sy[:, None, :]) * inv[None, :, None]
        return Moments(self.n, sx, xx, self.sy, xy, self.yy)


def standardisation(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """The mean and deviation of the features summed in ``m`` (all blocks); a constant feature's
    deviation is 1, as ``StandardScaler`` has it."""
    t = m.total()
    n = t.n[0]
    mean = t.sx[0] / n
    var = np.clip(np.diag(t.xx[0]) / n - mean ** 2, 0, None)
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1)] = 1.0
    return mean, scale


def ridge_path(train: Moments) -> Callable[[float], tuple[np.ndarray, np.ndarray]]:
    """``alpha -> (W, b)`` of ridge on the standardised rows summed in ``train``, as weights on the raw
    features: one eigendecomposition of the standardised, centred Gram matrix serves every alpha."""
    mean, scale = standardisation(train)
    z = train.total().standardised(mean, scale)
    n = z.n[0]
    y_mean = z.sy[0] / n
    gram = z.xx[0] - np.outer(z.sx[0], z.sx[0]) / n  # centred (the standardised sums are ~0 already)
    xty = z.xy[0] - np.outer(z.sx[0], y_mean)
    lam, Q = np.linalg.eigh(gram)
    lam = np.clip(lam, 0, None)
    P = Q.T @ xty

    def solve(alpha: float) -> tuple[np.ndarray, np.ndarray]:
        W = (Q @ (P / (lam + alpha)[:, None])) / scale[:, None]
        return W, y_mean - mean @ W

    return solve


def squared_error(held: Moments, W: np.ndarray, b: np.ndarray) -> float:
    """``sum ||y - x W - b||^2`` over the rows summed in ``held``, from the sums alone."""
    h = held.total()
    n, sx, xx, sy, xy, yy = h.n[0], h.sx[0], h.xx[0], h.sy[0], h.xy[0], h.yy[0]
    per_column = (yy - 2 * (W * xy).sum(0) - 2 * b * sy + (W * (xx @ W)).sum(0) + 2 * b * (sx @ W) + n * b ** 2)
    return float(per_column.sum())


def choose_alpha(m: Moments, alphas: np.ndarray) -> tuple[float, list[tuple[float, float]]]:
    """The alpha with the least squared error summed over the blocks held out in turn, and the path
    (alpha, mean held-out squared error per row); 1.0 (scikit-learn's default) when no block can be held out."""
    total = m.total()
    errors, held_rows = np.zeros(len(alphas)), 0.0
    for b in range(len(m.n)):
        if m.n[b] == 0 or total.n[0] - m.n[b] < 1:
            continue
        held = m.block(b)
        solve = ridge_path(total - held)
        errors += [squared_error(held, *solve(a)) for a in alphas]
        held_rows += m.n[b]
    if held_rows == 0:
        return 1.0, []
    path = [(float(a), float(e / held_rows)) for a, e in zip(alphas, errors)]
    return float(alphas[int(np.argmin(errors))]), path


class _MomentsRidge(BaseEstimator):
    """What the two ridges share: fit from the sums of the rows (``fit``, ``partial_fit`` or
    ``fit_moments``), predictions from ``coef_`` and ``intercept_`` on the raw features."""

    _parameter_constraints: dict = {
        "alphas": ["array-like", Interval(Real, 0, None, closed="neither")],
        "cv": [Interval(Integral, 2, None, closed="left")],
    }

    def __init__(self, alphas=ALPHAS, cv: int = 5):
        self.alphas = alphas
        self.cv = cv

    def fit(self, X, y):
        check_estimator_params(self)
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32, np.float16), **self._y_checks)
        columns = self._columns(y)
        Y = self._targets(y, columns)
        return self.fit_moments(Moments.zeros(self.cv, X.shape[1], Y.shape[1]).add(X, Y, np.arange(len(X)) % self.cv),
                                columns)

    def partial_fit(self, X, y, classes=None):
        """Add the rows of ``X``, ``y`` to those of the earlier ``partial_fit`` calls and refit on them all
        (``fit`` starts over). A classifier needs ``classes`` on the first call, as ``SGDClassifier`` does."""
        first = not hasattr(self, "moments_")
        check_estimator_params(self)
        X, y = validate_data(self, X, y, reset=first, dtype=(np.float64, np.float32, np.float16), **self._y_checks)
        if first:
            self.columns_ = self._columns(y, classes)
        Y = self._targets(y, self.columns_)
        if first:
            self.moments_ = Moments.zeros(self.cv, X.shape[1], Y.shape[1])
        seen = int(self.moments_.n.sum())
        self.moments_.add(X, Y, (seen + np.arange(len(X))) % self.cv)
        return self.fit_moments(self.moments_, self.columns_)

    def fit_moments(self, moments: Moments, columns=None):
        """Fit from the sums of the rows (see :meth:`targets` for what their target columns hold), each
        leading block one inner fold; ``columns`` labels the target columns (a classifier's classes)."""
        check_estimator_params(self)
        alphas = np.sort(np.atleast_1d(np.asarray(self.alphas, dtype=np.float64)))
        if alphas.ndim != 1 or not (alphas > 0).all():
            raise ValueError(f"alphas must be positive, got {self.alphas!r}")
        moments, columns = self._present(moments, columns)
        if len(alphas) > 1:
            self.alpha_, self.path_ = choose_alpha(moments, alphas)
        else:
            self.alpha_, self.path_ = float(alphas[0]), []
        W, b = ridge_path(moments)(self.alpha_)
        self.coef_, self.intercept_ = W.T, b
        self.n_features_in_ = W.shape[0]
        self._set_outputs(columns)
        return self

    def targets(self, y, columns=None) -> np.ndarray:
        """The target matrix the sums are taken of (``+-1`` per class or tag; numbers as they are)."""
        return self._targets(np.asarray(y), columns)

    def _decision(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return X @ self.coef_.T + self.intercept_

    def _present(self, moments: Moments, columns):
        return moments, columns


class StreamingRidgeClassifier(ClassifierMixin, _MomentsRidge):
    """Standardise + ridge classifier fitted from the sums of the rows (one pass, any number of
    rows): one-vs-rest ``+-1`` targets as ``RidgeClassifier`` (one column for two classes), or a ``0/1``
    tag matrix (multilabel, a column per tag); ``alpha`` from ``alphas`` by squared error over ``cv``
    inner folds. Learned: ``classes_``, ``coef_``, ``intercept_`` (raw features), ``alpha_``, ``path_``."""

    _y_checks = dict(multi_output=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def _columns(self, y, classes=None):
        if type_of_target(y) == "multilabel-indicator":
            return None  # tags: a column each
        check_classification_targets(y)
        return np.unique(column_or_1d(y, warn=True) if classes is None else classes)

    def _targets(self, y, columns):
        if columns is None:
            return np.where(np.asarray(y) > 0, 1.0, -1.0)
        return np.where(np.asarray(y).reshape(-1, 1) == np.asarray(columns).reshape(1, -1), 1.0, -1.0)

    def _present(self, moments: Moments, columns):
        """Keep the classes the rows hold (one column, the second class's, for two), as scikit-learn fits them."""
        if columns is None:
            return moments, None
        positives = (moments.sy.sum(0) + moments.n.sum()) / 2
        keep = np.flatnonzero(positives > 0.5)
        if len(keep) < 2:
            raise ValueError(f"the rows hold {len(keep)} class; a classifier needs samples of at least 2 classes")
        return moments.columns(keep[1:] if len(keep) == 2 else keep), np.asarray(columns)[keep]

    def _set_outputs(self, columns) -> None:
        self.tags_ = columns is None
        self.classes_ = np.arange(self.coef_.shape[0]) if columns is None else columns

    def decision_function(self, X) -> np.ndarray:
        """Margins: a column per class or tag, or for two classes one value (positive: ``classes_[1]``)."""
        scores = self._decision(X)
        return scores.ravel() if scores.shape[1] == 1 and not self.tags_ else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        if self.tags_:
            return (scores > 0).astype(int)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else np.argmax(scores, axis=1)]


class StreamingRidge(RegressorMixin, _MomentsRidge):
    """Standardise + ridge regression fitted from the sums of the rows (one pass, any number of rows),
    ``alpha`` from ``alphas`` by squared error over ``cv`` inner folds; one target or several. Learned:
    ``coef_``, ``intercept_`` (raw features), ``alpha_``, ``path_``."""

    _y_checks = dict(multi_output=True, y_numeric=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _columns(self, y, classes=None):
        return None if y.ndim == 1 else np.arange(y.shape[1])

    def _targets(self, y, columns):
        y = np.asarray(y, np.float64)
        return y.reshape(len(y), -1)

    def _set_outputs(self, columns) -> None:
        if columns is None:  # one target
            self.coef_, self.intercept_ = self.coef_[0], float(self.intercept_[0])

    def predict(self, X) -> np.ndarray:
        return self._decision(X)


def accumulates(estimator) -> bool:
    """Whether ``estimator`` (or a pipeline's last step) fits from the sums of the rows."""
    return isinstance(estimator[-1] if hasattr(estimator, "steps") else estimator, _MomentsRidge)


def fit_subsets_in_one_pass(estimator, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                            subsets: list[np.ndarray] | None = None, classes: np.ndarray | None = None) -> list:
    """Clones of ``estimator`` (a streaming ridge, or a pipeline of a ``StandardScaler`` and one) fitted
    on each index set of ``subsets`` (None: every row) from ONE pass over ``chunks``, ``(rows, X, y)``
    triples covering the rows of every subset; a classifier's ``classes`` are needed up front, as for
    ``partial_fit``; rows of no subset are passed over. Sums are kept per (group of rows in the same subsets, inner fold), and a subset's are
    the sum of its groups', so memory is a few ``d x d`` blocks per group, whatever the number of rows.
    Row ``i`` is in inner fold ``i mod cv``."""
    model = estimator[-1] if hasattr(estimator, "steps") else estimator
    k, sums, columns = model.cv, None, None
    member = signatures = None
    if subsets is not None:
        member = np.zeros((max(int(s.max(initial=-1)) for s in subsets) + 1, len(subsets)), bool)
        for j, s in enumerate(subsets):
            member[s, j] = True
        union = np.flatnonzero(member.any(1))
        signatures, inverse = np.unique(member[union], axis=0, return_inverse=True)
        group = np.full(len(member), -1)
        group[union] = inverse.ravel()
    for rows, X, y in chunks:
        inside = None if member is None else np.isin(rows, union)
        if inside is not None and not inside.all():  # rows of no subset
            rows, X, y = rows[inside], X[inside], np.asarray(y)[inside]
        if sums is None:
            columns = model._columns(np.asarray(y), classes)
            Y = model.targets(y, columns)
            sums = Moments.zeros(k * (1 if signatures is None else len(signatures)), X.shape[1], Y.shape[1])
        else:
            Y = model.targets(y, columns)
        sums.add(X, Y, (0 if member is None else group[rows] * k) + rows % k)
    if sums is None:
        raise ValueError("no rows to fit on")
    if subsets is None:
        return [_fit_from_moments(clone(estimator), sums, columns)]
    return [_fit_from_moments(clone(estimator), _sum_groups(sums, np.flatnonzero(signatures[:, j]), k), columns)
            for j in range(len(subsets))]


def _sum_groups(sums: Moments, groups: np.ndarray, k: int) -> Moments:
    """The per-inner-fold sums of the rows in ``groups`` (blocks are ``group * k + fold``)."""
    picked = [Moments(*(getattr(sums, f.name)[g * k:(g + 1) * k] for f in fields(sums))) for g in groups]
    out = picked[0]
    for m in picked[1:]:
        out = out + m
    return out


def _fit_from_moments(estimator, m: Moments, columns):
    """Fit ``estimator`` from ``m``: a pipeline's ``StandardScaler`` is given the rows' mean and deviation
    (as its ``partial_fit`` over them would), the model the sums of the standardised rows."""
    if not hasattr(estimator, "steps"):
        return estimator.fit_moments(m, columns)
    mean, scale = standardisation(m)
    t = m.total()
    scaler = estimator[0]
    scaler.mean_, scaler.scale_ = mean, scale
    scaler.var_ = np.clip(np.diag(t.xx[0]) / t.n[0] - mean ** 2, 0, None)
    scaler.n_samples_seen_, scaler.n_features_in_ = int(t.n[0]), len(mean)
    estimator[-1].fit_moments(m.standardised(mean, scale), columns)
    return estimator
