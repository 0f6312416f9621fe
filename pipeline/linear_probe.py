"""Fast linear probes as scikit-learn estimators: logistic regression by L-BFGS on torch tensors
(``TorchLogisticRegression``), and ridge regression from one SVD in torch (``TorchRidge``).

Full-batch L-BFGS in float32 (on the GPU when there is one) over a warm-started regularisation path:
``C`` goes from strong to weak regularisation, each fit starting from the previous solution and scored
by log loss on a stratified held-out part of the training rows; the path stops once the held-out loss
has risen twice in a row (the weakly regularised end is the slowest to fit and rarely the best), and the
best ``C`` is refit on all rows from its path solution. The objective per ``C`` is scikit-learn's
``LogisticRegression``'s, ``C * sum(log loss) + ||W||^2 / 2`` (here divided by ``C * n``), so the same
``C`` means the same model.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class TorchLogisticRegression(ClassifierMixin, BaseEstimator):
    """L2 logistic regression by full-batch L-BFGS in torch, ``C`` chosen along the warm-started path
    ``Cs`` (ascending) on a ``val_size`` stratified hold-out, then refit on all rows. Two classes are one
    logit (binary log loss), more are multinomial, as in scikit-learn's ``LogisticRegression``.

    A single value in ``Cs`` skips the selection, and so does data too small for a stratified hold-out
    (a class with one row, or fewer hold-out rows than classes): then C is 1, scikit-learn's default.
    ``tol`` bounds the largest gradient entry of the per-sample objective. ``device="auto"`` is CUDA
    when present. Learned: ``classes_``, ``coef_``, ``intercept_``, ``C_``, ``path_`` (C, held-out loss)
    and ``n_iter_`` (L-BFGS iterations of the final fit).
    """

    def __init__(self, Cs=tuple(np.logspace(-4, 2, 13)), val_size: float = 0.2, max_iter: int = 300,
                 tol: float = 1e-3, device: str = "auto", random_state: int | None = 0):
        self.Cs = Cs
        self.val_size = val_size
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=(np.float32, np.float64))
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError(f"needs samples of at least 2 classes, but the data contains only one class: {self.classes_[0]!r}")
        Cs = np.sort(np.atleast_1d(np.asarray(self.Cs, dtype=np.float64)))
        if Cs.size == 0 or (Cs <= 0).any():
            raise ValueError(f"Cs must be positive values, got {self.Cs!r}")
        dev = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                           else "cpu" if self.device == "auto" else self.device)
        init, self.path_ = None, []
        n_val = int(np.ceil(self.val_size * len(y)))
        if Cs.size > 1 and np.bincount(codes).min() >= 2 and k <= n_val <= len(y) - k:
            tr, va = train_test_split(np.arange(len(y)), test_size=self.val_size, random_state=self.random_state,
                                      stratify=codes)
            Xt, yt = _tensors(X[tr], codes[tr], dev)
            Xv, yv = _tensors(X[va], codes[va], dev)
            best, rises, params = None, 0, None
            for C in Cs:
                params = _lbfgs(Xt, yt, k, C, self.max_iter, self.tol, params)
                with torch.no_grad():
                    loss = float(_log_loss(Xv @ params[0] + params[1], yv))
                self.path_.append((float(C), loss))
                if best is None or loss < best[1]:
                    best, init, rises = (float(C), loss), params, 0
                else:
                    rises += 1
                    if rises == 2:
                        break
            self.C_ = best[0]
        else:
            self.C_ = float(Cs[0]) if Cs.size == 1 else 1.0
        Xa, ya = _tensors(X, codes, dev)
        W, b, n_iter = _lbfgs(Xa, ya, k, self.C_, self.max_iter, self.tol, init)
        self.coef_ = W.T.cpu().numpy().astype(np.float64)
        self.intercept_ = b.cpu().numpy().astype(np.float64)
        self.n_iter_ = np.array([n_iter])
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logits: one column per class, or for two classes one value (positive means ``classes_[1]``)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict_proba(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = expit(scores)
            return np.stack([1 - p, p], axis=1)
        return softmax(scores, axis=1)

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else np.argmax(scores, axis=1)]


def _tensors(X: np.ndarray, codes: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(X, dtype=torch.float32, device=device), torch.as_tensor(codes, dtype=torch.long, device=device))


def _log_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean log loss: binary on one logit column, multinomial on several."""
    if logits.shape[1] == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    return torch.nn.functional.cross_entropy(logits, y)


def _lbfgs(X: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, max_iter: int, tol: float,
           init: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise ``mean log loss + ||W||^2 / (2 C n)`` from ``init`` (else zeros); the weights, the bias
    and the L-BFGS iterations taken. Two classes have one logit."""
    n, d = X.shape
    outputs = 1 if n_classes == 2 else n_classes
    W = torch.zeros((d, outputs), device=X.device) if init is None else init[0].clone()
    b = torch.zeros(outputs, device=X.device) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    penalty = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _log_loss(X @ W + b, y) + penalty * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach(), int(opt.state[W].get("n_iter", 0))


class TorchRidge(RegressorMixin, BaseEstimator):
    """Ridge regression, ``||y - X w - b||^2 + alpha ||w||^2`` (scikit-learn's ``Ridge``), solved in torch
    from one thin SVD of the centred features per fit, so every value of ``alphas`` costs a matrix
    product. ``alpha`` is chosen by mean squared error on a ``val_size`` hold-out, then the model is refit
    on all rows; a single value in ``alphas``, or data too small to hold out from, skips the choice.
    Several targets at once work too. ``device="auto"`` is CUDA when present. Learned: ``coef_``,
    ``intercept_``, ``alpha_``, ``path_`` (alpha, held-out error)."""

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
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, multi_output=True)
        alphas = np.sort(np.atleast_1d(np.asarray(self.alphas, dtype=np.float64)))
        if alphas.size == 0 or (alphas < 0).any():
            raise ValueError(f"alphas must be 0 or more, got {self.alphas!r}")
        dev = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                           else "cpu" if self.device == "auto" else self.device)
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
