"""A fast linear probe: multinomial logistic regression on torch tensors, as a scikit-learn estimator.

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
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class TorchLogisticRegression(ClassifierMixin, BaseEstimator):
    """Multinomial L2 logistic regression by full-batch L-BFGS in torch, ``C`` chosen along the
    warm-started path ``Cs`` (ascending) on a ``val_size`` stratified hold-out, then refit on all rows.

    A single value in ``Cs`` skips the selection, and so does data too small for a stratified hold-out
    (a class with one row, or fewer hold-out rows than classes): then C is 1, scikit-learn's default.
    ``tol`` bounds the largest gradient entry of the
    per-sample objective. ``device="auto"`` is CUDA when present.
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
            raise ValueError(f"needs at least 2 classes, got {k}")
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
                    loss = float(torch.nn.functional.cross_entropy(Xv @ params[0] + params[1], yv))
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
        W, b = _lbfgs(Xa, ya, k, self.C_, self.max_iter, self.tol, init)
        self.coef_ = W.T.cpu().numpy().astype(np.float64)
        self.intercept_ = b.cpu().numpy().astype(np.float64)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        return X @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X), axis=1)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def _tensors(X: np.ndarray, codes: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.ascontiguousarray(X), dtype=torch.float32, device=device),
            torch.as_tensor(codes, dtype=torch.long, device=device))


def _lbfgs(X: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, max_iter: int, tol: float,
           init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean log loss + ||W||^2 / (2 C n)`` from ``init`` (else zeros)."""
    n, d = X.shape
    W = torch.zeros((d, n_classes), device=X.device) if init is None else init[0].clone()
    b = torch.zeros(n_classes, device=X.device) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    penalty = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, y) + penalty * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()
