"""Fast linear probes as scikit-learn estimators: L2 logistic regression (``TorchLogisticRegression``)
and the linear SVM (``TorchLinearSVC``), each with its regularisation chosen on held-out rows, and ridge
regression from one SVD (``TorchRidge``), all solved in torch (on the GPU when there is one).

The linear classifiers solve every held-out split and the all-rows refit **as one batched problem**: the
features are multiplied once by the weights of every problem side by side, and each problem sees its own
training rows through a 0/1 weight column (DINOv2's evaluation trains its many linear heads the same
way). Full-batch L-BFGS walks the regularisation path ``Cs`` from strong to weak regularisation, each
``C`` starting from the previous solution; the split problems score each ``C`` on their held-out rows,
and the all-rows problem at the best ``C`` is the fitted model, so no separate refit is needed. The
objective per ``C`` is scikit-learn's (``LogisticRegression``: ``C * sum(log loss) + ||W||^2 / 2``;
``LinearSVC``: squared hinge, one-vs-rest, the bias penalised as liblinear's is), here divided by
``C * n``, so the same ``C`` means the same model.

The solvers are in :mod:`pipeline.torch_solvers`, imported by ``fit``: a fitted probe predicts with numpy.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.model_selection import train_test_split
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from .batched import Group, GroupFitMixin, RowChunks, encode_classes, probabilities
from .splitters import StratifiedKFoldUpTo, tag_folds, tag_holdout
from .validation import check_estimator_params


class _Grid(Interval):
    """The interval every value of a regularisation grid (``Cs``, ``alphas``) lies in, as a scikit-learn
    constraint on the grid: one float or a non-empty 1-d array-like of floats."""

    def __init__(self, left: float, closed: str):
        super().__init__(Real, left, None, closed=closed)

    def is_satisfied_by(self, val) -> bool:
        try:
            values = np.atleast_1d(np.asarray(val, dtype=np.float64))
        except (TypeError, ValueError):
            return False
        return values.ndim == 1 and values.size > 0 and all(v in self for v in values)

    def __str__(self) -> str:
        low = "[" if self.closed == "left" else "("
        return f"a float or a non-empty array-like of floats in the range {low}{self.left}, inf)"


# what the three probes' shared parameters may be (scikit-learn's declaration, checked at fit)
_SHARED = {
    "max_iter": [Interval(Integral, 1, None, closed="left")],
    "tol": [Interval(Real, 0, None, closed="left")],
    "val_size": [Interval(Real, 0, 1, closed="neither")],
    "scale_folds": ["boolean"],
    "device": [str],
    "random_state": ["random_state"],
}


class _LinearPathClassifier(GroupFitMixin, ClassifierMixin, BaseEstimator):
    """What the linear classifiers share: the batched path fit, and predictions from ``coef_``. Classes
    (one per row) or tags (a 0/1 matrix, a column per tag: a binary problem each, with its own ``C``,
    scikit-learn's multi-label convention)."""

    _loss = "log"  # or "squared_hinge"
    tags_ = False  # learned at fit; heads saved before tags were fitted here had classes
    _reads_chunks = True  # fits on RowChunks too (pipeline.batched): features larger than memory
    _stop_after_rises = 0  # stop the path once the held-out score worsened this often in a row (0: never)

    def _fit_groups(self, X: np.ndarray | RowChunks, y: np.ndarray, groups: list[Group], models: list) -> None:
        """Fit ``models[i]`` (clones of this estimator) on ``groups[i]``'s rows of ``X``, standardised by the
        group's scaler if it has one, all in one batch; every group holds every class of ``y``. ``X`` may
        be :class:`~pipeline.batched.RowChunks`: each L-BFGS step then reads it chunk by chunk."""
        import torch

        from .devices import resolve_device
        from .torch_solvers import Batch, threads_for

        check_estimator_params(self)
        classes, codes = encode_classes(y)
        Cs = np.sort(np.atleast_1d(np.asarray(self.Cs, dtype=np.float64)))
        for group in groups:
            group.splits = self._splits(codes[group.rows]) if Cs.size > 1 else []
        device = torch.device(resolve_device(self.device))
        X = X if isinstance(X, RowChunks) else torch.tensor(X, dtype=torch.float32, device=device)
        # a group too small to hold out from gets scikit-learn's default C
        for grid, members in ((Cs, [i for i, g in enumerate(groups) if g.splits or Cs.size == 1]),
                              (np.array([1.0]), [i for i, g in enumerate(groups) if not g.splits and Cs.size > 1])):
            if not members:
                continue
            batch = Batch(X, codes, len(classes), self._loss, [groups[i] for i in members], self.scale_folds, device)
            with threads_for(batch):
                solved = batch.path(grid, self.max_iter, self.tol, self._stop_after_rises)
            for i, (C, path, W, b, n_iter) in zip(members, solved):
                model = models[i]
                model.classes_, model.C_, model.path_, model.n_iter_ = classes, C, path, np.array([n_iter])
                model.tags_ = codes.ndim == 2
                model.coef_ = W.T.cpu().numpy().astype(np.float64)
                model.intercept_ = b.cpu().numpy().astype(np.float64)
                model.n_features_in_ = X.shape[1]

    @property
    def _problems_per_group(self) -> int:
        """Problems one batched group solves: its held-out splits and its all-rows fit."""
        return (1 if self.cv is None else self.cv) + 1

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def decision_function(self, X) -> np.ndarray:
        """Margins: one column per class or tag, or for two classes one value (positive means ``classes_[1]``)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 and not self.tags_ else scores

    def predict(self, X) -> np.ndarray:
        """The class of each row, or for tags its 0/1 row (a tag where its margin is positive)."""
        scores = self.decision_function(X)
        if self.tags_:
            return (scores > 0).astype(int)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else np.argmax(scores, axis=1)]

    def _splits(self, codes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The held-out splits that choose ``C``: ``cv`` stratified folds (fewer when a class is smaller;
        tags: :func:`~pipeline.splitters.tag_folds`)."""
        if codes.ndim == 2:
            return tag_folds(codes, self.cv, self.random_state)
        return list(StratifiedKFoldUpTo(self.cv, shuffle=True, random_state=self.random_state).split(codes, codes))


class TorchLogisticRegression(_LinearPathClassifier):
    """L2 logistic regression by batched L-BFGS in torch, ``C`` chosen along the warm-started path ``Cs``
    by held-out log loss, the model at that ``C`` fitted on all rows in the same batch. Two classes are
    one logit (binary log loss), more are multinomial, as in scikit-learn's ``LogisticRegression``.

    ``cv=None`` scores the path on one stratified ``val_size`` hold-out and stops it once the held-out
    loss has risen twice in a row (the weakly regularised end is the slowest to fit and rarely the best);
    ``cv=k`` scores every ``C`` by the mean over k stratified folds (fewer when a class is smaller),
    as ``GridSearchCV(LogisticRegression(), {"C": Cs}, scoring="neg_log_loss")`` does. ``scale_folds``
    standardises each held-out split's training rows on their own statistics, as a grid search over
    ``make_pipeline(StandardScaler(), ...)`` does (meant for features a ``StandardScaler`` put first). A single value
    in ``Cs`` skips the selection, and so does data too small to hold out from: then C is 1, scikit-learn's
    default. ``tol`` bounds the largest gradient entry of the per-sample objective. ``device="auto"`` is
    CUDA when present. Learned: ``classes_``, ``coef_``, ``intercept_``, ``C_``, ``path_`` (C, held-out
    loss) and ``n_iter_`` (L-BFGS iterations of the last step of the path).

    Tags (``y`` a 0/1 matrix, a column per tag) are a binary problem each, as
    ``OneVsRestClassifier(GridSearchCV(LogisticRegression(), ...))`` fits them, with the held-out splits
    shared by the tags (iteratively stratified) and every tag solved in the same batch: ``C_`` holds
    each tag's ``C``, ``path_`` each tag's held-out loss, ``tags_`` is True and ``predict`` gives 0/1 rows.
    """

    _parameter_constraints: dict = {
        "Cs": [_Grid(0, closed="neither")], "cv": [Interval(Integral, 2, None, closed="left"), None],
        **{k: _SHARED[k] for k in ("val_size", "scale_folds", "max_iter", "tol", "device", "random_state")},
    }

    def __init__(self, Cs=tuple(np.logspace(-4, 2, 13)), cv: int | None = None, val_size: float = 0.2,
                 scale_folds: bool = False, max_iter: int = 300, tol: float = 1e-3, device: str = "auto",
                 random_state: int | None = 0):
        self.Cs = Cs
        self.cv = cv
        self.val_size = val_size
        self.scale_folds = scale_folds
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.random_state = random_state

    @property
    def _stop_after_rises(self) -> int:
        return 2 if self.cv is None else 0

    def _splits(self, codes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.cv is not None:
            return super()._splits(codes)
        if codes.ndim == 2:
            return tag_holdout(codes, self.val_size, self.random_state)
        n_val, k = int(np.ceil(self.val_size * len(codes))), codes.max() + 1
        if np.bincount(codes).min() < 2 or not k <= n_val <= len(codes) - k:
            return []
        return [train_test_split(np.arange(len(codes)), test_size=self.val_size, random_state=self.random_state,
                                 stratify=codes)]

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, or for tags each tag's (the sigmoid of its margin)."""
        scores = self.decision_function(X)
        return expit(scores) if self.tags_ else probabilities(scores)


class TorchLinearSVC(_LinearPathClassifier):
    """The linear SVM of scikit-learn's ``LinearSVC`` (squared hinge, L2, one-vs-rest, the bias penalised
    as liblinear's is) by batched L-BFGS in torch, ``C`` chosen along the warm-started path ``Cs`` by mean
    accuracy over ``cv`` stratified folds (ties: the smallest ``C``), as ``GridSearchCV(LinearSVC(), {"C":
    Cs})`` does, the model at that ``C`` fitted on all rows in the same batch; ``scale_folds`` as in
    ``TorchLogisticRegression``. No probabilities: the margins rank the classes. Learned as
    ``TorchLogisticRegression`` (``path_`` holds 1 - accuracy)."""

    _loss = "squared_hinge"
    _parameter_constraints: dict = {
        "Cs": [_Grid(0, closed="neither")], "cv": [Interval(Integral, 2, None, closed="left")],
        **{k: _SHARED[k] for k in ("scale_folds", "max_iter", "tol", "device", "random_state")},
    }

    def __init__(self, Cs=tuple(np.logspace(-5, 0, 6)), cv: int = 5, scale_folds: bool = False, max_iter: int = 300,
                 tol: float = 1e-4, device: str = "auto", random_state: int | None = 0):
        self.Cs = Cs
        self.cv = cv
        self.scale_folds = scale_folds
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.random_state = random_state


class TorchRidge(RegressorMixin, BaseEstimator):
    """Ridge regression, ``||y - X w - b||^2 + alpha ||w||^2`` (scikit-learn's ``Ridge``), solved in torch
    from one thin SVD of the centred features per fit, so every value of ``alphas`` costs a matrix
    product. ``alpha`` is chosen by mean squared error on a ``val_size`` hold-out, then the model is refit
    on all rows; a single value in ``alphas``, or data too small to hold out from, skips the choice.
    Several targets at once work too. ``device="auto"`` is CUDA when present. Learned: ``coef_``,
    ``intercept_``, ``alpha_``, ``path_`` (alpha, held-out error)."""

    _parameter_constraints: dict = {
        "alphas": [_Grid(0, closed="left")], **{k: _SHARED[k] for k in ("val_size", "device", "random_state")},
    }

    def __init__(self, alphas=tuple(np.logspace(-2, 5, 15)), val_size: float = 0.2, device: str = "auto",
                 random_state: int | None = 0):
        self.alphas = alphas
        self.val_size = val_size
        self.device = device
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        import torch

        from .devices import resolve_device
        from .torch_solvers import ridge_path

        check_estimator_params(self)
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, multi_output=True)
        alphas = np.sort(np.atleast_1d(np.asarray(self.alphas, dtype=np.float64)))
        dev = resolve_device(self.device)
        Y = torch.tensor(y.reshape(len(y), -1), dtype=torch.float64, device=dev)
        Xt = torch.tensor(X, dtype=torch.float64, device=dev)
        self.path_ = []
        n_val = int(np.ceil(self.val_size * len(y)))
        if alphas.size > 1 and 1 <= n_val <= len(y) - 2:
            tr, va = train_test_split(np.arange(len(y)), test_size=self.val_size, random_state=self.random_state)
            solve = ridge_path(Xt[tr], Y[tr])
            for alpha in alphas:
                W, b = solve(alpha)
                self.path_.append((float(alpha), float(((Xt[va] @ W + b - Y[va]) ** 2).mean())))
            self.alpha_ = min(self.path_, key=lambda p: p[1])[0]
        else:
            self.alpha_ = float(alphas[0]) if alphas.size == 1 else 1.0
        W, b = ridge_path(Xt, Y)(self.alpha_)
        coef, intercept = W.T.cpu().numpy(), b.cpu().numpy()
        self.coef_, self.intercept_ = (coef[0], float(intercept[0])) if y.ndim == 1 else (coef, intercept)
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_
