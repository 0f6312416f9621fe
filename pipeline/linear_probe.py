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
"""

from __future__ import annotations

import contextlib
from numbers import Integral, Real
from typing import Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.model_selection import train_test_split
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from .batched import Group, GroupFitMixin, RowChunks, encode_classes, group_scaling, probabilities
from .devices import resolve_device
from .splitters import StratifiedKFoldUpTo
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
    """What the linear classifiers share: the batched path fit, and predictions from ``coef_``."""

    _loss = "log"  # or "squared_hinge"
    _reads_chunks = True  # fits on RowChunks too (pipeline.batched): features larger than memory
    _stop_after_rises = 0  # stop the path once the held-out score worsened this often in a row (0: never)

    def _fit_groups(self, X: np.ndarray | RowChunks, y: np.ndarray, groups: list[Group], models: list) -> None:
        """Fit ``models[i]`` (clones of this estimator) on ``groups[i]``'s rows of ``X``, standardised by the
        group's scaler if it has one, all in one batch; every group holds every class of ``y``. ``X`` may
        be :class:`~pipeline.batched.RowChunks`: each L-BFGS step then reads it chunk by chunk."""
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
            batch = _Batch(X, codes, len(classes), self._loss, [groups[i] for i in members], self.scale_folds, device)
            with _threads_for(batch):
                solved = batch.path(grid, self.max_iter, self.tol, self._stop_after_rises)
            for i, (C, path, W, b, n_iter) in zip(members, solved):
                model = models[i]
                model.classes_, model.C_, model.path_, model.n_iter_ = classes, C, path, np.array([n_iter])
                model.coef_ = W.T.cpu().numpy().astype(np.float64)
                model.intercept_ = b.cpu().numpy().astype(np.float64)
                model.n_features_in_ = X.shape[1]

    @property
    def _problems_per_group(self) -> int:
        """Problems one batched group solves: its held-out splits and its all-rows fit."""
        return (1 if self.cv is None else self.cv) + 1

    def decision_function(self, X) -> np.ndarray:
        """Margins: one column per class, or for two classes one value (positive means ``classes_[1]``)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else np.argmax(scores, axis=1)]

    def _splits(self, codes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The held-out splits that choose ``C``: ``cv`` stratified folds (fewer when a class is smaller)."""
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
        n_val, k = int(np.ceil(self.val_size * len(codes))), codes.max() + 1
        if np.bincount(codes).min() < 2 or not k <= n_val <= len(codes) - k:
            return []
        return [train_test_split(np.arange(len(codes)), test_size=self.val_size, random_state=self.random_state,
                                 stratify=codes)]

    def predict_proba(self, X) -> np.ndarray:
        return probabilities(self.decision_function(X))


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


SMALL_PRODUCT = 2e8  # multiply-adds of one logits product below which a CPU solve runs on one thread


@contextlib.contextmanager
def _threads_for(batch: "_Batch"):
    """One torch thread on a CPU for a batch whose products are small: each L-BFGS step is dozens of
    small operations, too little work to share, and with a busy core (another job, a worker of the
    sweep) every operation would wait for the slowest thread: 10x slower on a loaded 2-core machine."""
    small = batch.device.type == "cpu" and batch.n * batch.d * batch.train.shape[1] * batch.outputs < SMALL_PRODUCT
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# rows x problems x outputs of one logits product, by device type: bounds what autograd keeps per step.
# On a CPU a product that stays in its caches is faster (torch-logreg, 50,000 x 512, 100 classes, 5 folds:
# 43.6 s and 1.2 GB peak at 2^20 against 58.8 s and 1.5 GB at 2^24); a GPU wants large products.
CHUNK_CELLS = {"cpu": 2 ** 20, "cuda": 2 ** 24}


class _Batch:
    """Linear problems on rows of ``X``, solved side by side. Per group: one problem per held-out split
    (on its training rows) and one on all the group's rows, each on the group's standardisation (a split
    problem on its own rows' with ``scale_folds``). ``loss``
    is ``log`` (binary on one logit for two classes, else multinomial) or ``squared_hinge`` (one-vs-rest,
    one margin for two classes). Every pass over the rows goes a chunk at a time (:meth:`_chunks`), so
    memory holds one chunk's logits, and ``X`` may be :class:`~pipeline.batched.RowChunks` read from disk."""

    def __init__(self, X: torch.Tensor | RowChunks, codes: np.ndarray, n_classes: int, loss: str,
                 groups: list[Group], scale_folds: bool = False, device: torch.device | None = None):
        (n, d), dev = X.shape, X.device if isinstance(X, torch.Tensor) else device
        self.X, self.n, self.d, self.device = X, n, d, dev
        self.loss, self.outputs = loss, 1 if n_classes == 2 else n_classes
        self.y = torch.as_tensor(codes, dtype=torch.long, device=dev)
        train, held, held_problem, owner, self.refits, self.held_of = [], [], [], [], [], []
        for g, group in enumerate(groups):
            held_cols = []
            for tr, te in group.splits:
                held_cols.append(len(held))
                held_problem.append(len(train))
                train.append(_mask(n, group.rows[tr]))
                held.append(_mask(n, group.rows[te]))
                owner.append(g)
            self.held_of.append(held_cols)
            self.refits.append(len(train))
            train.append(_mask(n, group.rows))
            owner.append(g)
        self.train = torch.tensor(np.stack(train, 1), dtype=torch.float32, device=dev)
        self.held = torch.tensor(np.stack(held, 1) if held else np.zeros((n, 0)), dtype=torch.float32, device=dev)
        self.held_problem = torch.as_tensor(held_problem, dtype=torch.long, device=dev)
        self.n_train = self.train.sum(0)
        means, scales = (a[:, owner] for a in group_scaling(groups, d))
        if scale_folds and held_problem:  # each split problem standardised on its own training rows
            split_means, split_scales = _column_stats(self._chunks(), self.train[:, held_problem])
            means[:, held_problem], scales[:, held_problem] = split_means, split_scales
        self.scaled = scale_folds or any(g.scaler is not None for g in groups)
        if self.scaled:  # problem p sees (x - mean_p) / scale_p = x * inv_scale[:, p] - shift[:, p]
            self.inv_scale = torch.tensor(1 / scales, dtype=torch.float32, device=dev)
            self.shift = torch.tensor(means / scales, dtype=torch.float32, device=dev)
        if loss == "squared_hinge":
            signs = torch.nn.functional.one_hot(self.y, n_classes).float() * 2 - 1
            self.signs = signs[:, 1:] if self.outputs == 1 else signs

    def path(self, Cs: np.ndarray, max_iter: int, tol: float, stop_after_rises: int) -> list[tuple]:
        """Solve along ``Cs``; per group the chosen ``C``, its path of (C, held-out score) and its all-rows
        solution at that ``C``: ``(C, path, W, b, iterations)`` (the last ``C`` when nothing is held out)."""
        groups = range(len(self.refits))
        best, paths, rises, params = [None for _ in groups], [[] for _ in groups], [0 for _ in groups], None
        for C in Cs:
            params = self.solve(float(C), max_iter, tol, params)
            W, b, _ = params
            scores = self.held_out_scores(params) if self.held.shape[1] else None
            for g in groups:
                if scores is None:
                    best[g] = (float(C), None, W[:, self.refits[g]], b[self.refits[g]])
                    continue
                if stop_after_rises and rises[g] >= stop_after_rises:
                    continue
                paths[g].append((float(C), scores[g]))
                if best[g] is None or scores[g] < best[g][1]:
                    best[g], rises[g] = (float(C), scores[g], W[:, self.refits[g]], b[self.refits[g]]), 0
                else:
                    rises[g] += 1
            if stop_after_rises and all(r >= stop_after_rises for r in rises):
                break
        return [(C, paths[g], W, b, params[2]) for g, (C, _, W, b) in zip(groups, best)]

    def solve(self, C: float, max_iter: int, tol: float, init=None):
        """Minimise every problem's ``mean loss + ||W||^2 / (2 C n)`` from ``init`` (else zeros): weights
        ``(d, problems, outputs)``, biases ``(problems, outputs)``, L-BFGS iterations. Each evaluation
        adds up the loss and its gradient chunk by chunk."""
        P = self.train.shape[1]
        W = torch.zeros((self.d, P, self.outputs), device=self.device) if init is None else init[0].clone()
        b = torch.zeros((P, self.outputs), device=self.device) if init is None else init[1].clone()
        W.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-9,
                                history_size=20, line_search_fn="strong_wolfe")
        scale = 1.0 / (2.0 * C * self.n_train)

        def closure():
            opt.zero_grad()
            norms = W.pow(2).sum((0, 2)) + (b.pow(2).sum(1) if self.loss == "squared_hinge" else 0)
            objective = (scale * norms).sum()
            objective.backward()
            total = objective.detach()
            for rows, x in self._chunks():
                part = ((self._losses(x, rows, W, b) * self.train[rows]).sum(0) / self.n_train).sum()
                part.backward()
                total = total + part.detach()
            return total

        opt.step(closure)
        return W.detach(), b.detach(), int(opt.state[W].get("n_iter", 0))

    def held_out_scores(self, params) -> np.ndarray:
        """Per group, the mean over its splits of the held-out log loss (``log``) or error rate
        (``squared_hinge``)."""
        W, b, _ = params
        summed = torch.zeros(self.held.shape[1], dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for rows, x in self._chunks():
                if self.loss == "log":
                    per_row = self._losses(x, rows, W, b)[:, self.held_problem]
                else:
                    z = self._logits(x, W, b)[:, self.held_problem]
                    guess = (z[..., 0] > 0).long() if self.outputs == 1 else z.argmax(-1)
                    per_row = (guess != self.y[rows, None]).float()
                summed += (per_row * self.held[rows]).sum(0).double()
        per_split = (summed / self.held.sum(0).double()).cpu().numpy()
        return np.array([per_split[cols].mean() for cols in self.held_of])

    def _chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, features)`` in chunks of at most :data:`CHUNK_CELLS` logits: slices of the tensor ``X``,
        or of each chunk read from :class:`~pipeline.batched.RowChunks`."""
        cells = CHUNK_CELLS.get(getattr(self.device, "type", "cpu"), CHUNK_CELLS["cpu"])
        step = max(1, cells // (self.train.shape[1] * self.outputs))
        parts = ((slice(0, self.n), self.X),) if isinstance(self.X, torch.Tensor) else self.X
        for where, x in parts:
            x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
            for start in range(0, len(x), step):
                stop = min(start + step, len(x))
                yield slice(where.start + start, where.start + stop), x[start:stop]

    def _logits(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d, P, o = W.shape
        if not self.scaled:
            return (x @ W.reshape(d, P * o)).reshape(-1, P, o) + b
        z = x @ (W * self.inv_scale[:, :, None]).reshape(d, P * o)
        return z.reshape(-1, P, o) + (b - torch.einsum("dp,dpo->po", self.shift, W))

    def _losses(self, x: torch.Tensor, rows: slice, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The loss of each row of the chunk ``x`` (rows ``rows``) in each problem, ``(len(x), problems)``."""
        z, y = self._logits(x, W, b), self.y[rows]
        if self.loss == "squared_hinge":
            return torch.clamp(1 - self.signs[rows, None, :] * z, min=0).pow(2).sum(-1)
        if self.outputs == 1:
            return torch.nn.functional.softplus(z[..., 0]) - y[:, None] * z[..., 0]
        return torch.logsumexp(z, -1) - z.gather(-1, y[:, None, None].expand(-1, z.shape[1], 1))[..., 0]


def _column_stats(chunks: Iterator[tuple[slice, torch.Tensor]], masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per mask column, the mean and standard deviation of the rows it selects, summed over the chunks
    ``(rows, features)``, ``(d, columns)`` each; a constant feature's deviation is 1, as ``StandardScaler`` has it."""
    M = masks.double()
    sums = squares = 0
    for rows, x in chunks:
        x64 = x.double()
        sums = sums + x64.T @ M[rows]
        squares = squares + x64.pow(2).T @ M[rows]
    n = M.sum(0)
    mean = sums / n
    var = torch.clamp(squares / n - mean.pow(2), min=0)
    std = var.sqrt()
    std[std < 10 * torch.finfo(torch.float64).eps * mean.abs().clamp(min=1)] = 1.0
    return mean.cpu().numpy(), std.cpu().numpy()


def _mask(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, np.float32)
    mask[rows] = 1
    return mask


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
            solve = _ridge_path(Xt[tr], Y[tr])
            for alpha in alphas:
                W, b = solve(alpha)
                self.path_.append((float(alpha), float(((Xt[va] @ W + b - Y[va]) ** 2).mean())))
            self.alpha_ = min(self.path_, key=lambda p: p[1])[0]
        else:
            self.alpha_ = float(alphas[0]) if alphas.size == 1 else 1.0
        W, b = _ridge_path(Xt, Y)(self.alpha_)
        coef, intercept = W.T.cpu().numpy(), b.cpu().numpy()
        self.coef_, self.intercept_ = (coef[0], float(intercept[0])) if y.ndim == 1 else (coef, intercept)
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_


def _ridge_path(X: torch.Tensor, Y: torch.Tensor):
    """``alpha -> (W, b)`` of ridge on ``X``, ``Y`` from one thin SVD of the centred ``X``:
    ``W = V diag(s / (s^2 + alpha)) U^T Y_c``, ``b = mean(Y) - mean(X) W``."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    U, s, Vh = torch.linalg.svd(X - x_mean, full_matrices=False)
    UtY = U.T @ (Y - y_mean)

    def solve(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        W = Vh.T @ ((s / (s ** 2 + alpha))[:, None] * UtY)
        return W, y_mean - x_mean @ W

    return solve
