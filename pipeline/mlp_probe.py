"""One-hidden-layer MLPs as scikit-learn estimators, trained in torch: step for step the training of
scikit-learn's ``MLPClassifier(solver="adam")`` and ``MLPRegressor(solver="adam")`` (same initialisation
and minibatch order for the same integer ``random_state``, same Adam steps, same stopping rule), with the large matrix products in bf16
where the hardware computes it natively, and many models trained side by side (the folds of a
cross-validation and the refit on all rows, see :mod:`pipeline.batched`), each on its own minibatches.

Why: on a CPU with AMX a bf16 product of this shape is about 4x a float32 one, and training the six
models of a 5-fold row together turns six small matrix products per step into one batched product.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from .batched import Group, GroupFitMixin, encode_classes, group_scaling, one_softmax, output_targets, probabilities
from .devices import AMP, COMPUTE_DTYPES, resolve_amp, resolve_device
from .validation import check_estimator_params

_BETAS, _EPS = (0.9, 0.999), 1e-8  # MLPClassifier's defaults


class _TorchMLP(GroupFitMixin, BaseEstimator):
    """What the classifier and the regressor share: their arguments, the side-by-side training of
    groups (:class:`_Nets`) and the forward pass."""

    _problems_per_group = 1  # a batched group trains one network: no held-out splits (see pipeline.batched)
    _parameter_constraints: dict = {
        "hidden_layer_size": [Interval(Integral, 1, None, closed="left")],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "amp": [StrOptions(set(AMP))],
        "device": [str],
        "random_state": ["random_state"],
    }

    def __init__(self, hidden_layer_size: int = 100, alpha: float = 1e-4, batch_size: int | str = "auto",
                 learning_rate_init: float = 1e-3, max_iter: int = 200, tol: float = 1e-4, n_iter_no_change: int = 10,
                 amp: str = "auto", device: str = "auto", random_state=None):
        self.hidden_layer_size = hidden_layer_size
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.amp = amp
        self.device = device
        self.random_state = random_state

    def _train(self, X: np.ndarray, Y: np.ndarray, output: str, groups: list[Group], models: list,
               targets: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Train ``models[i]`` (clones of this estimator) on ``groups[i]``'s rows of ``X`` against ``Y``
        (``output``: ``softmax``, ``sigmoid`` or ``identity``), side by side; ``targets``: per group, the
        mean and scale ``Y`` is standardised with."""
        check_estimator_params(self)
        rng = check_random_state(self.random_state)
        seed = self.random_state if isinstance(self.random_state, Integral) else int(rng.randint(np.iinfo(np.int32).max))
        nets = _Nets(X, Y, output, groups, self, seed, targets)
        while nets.live.any() and nets.epochs < self.max_iter:
            nets.epoch()
        if nets.live.any():
            warnings.warn(f"{type(self).__name__}: the loss still improved after max_iter={self.max_iter} epochs",
                          ConvergenceWarning)
        for g, model in enumerate(models):
            model.n_features_in_ = X.shape[1]
            model.coefs_, model.intercepts_ = nets.layers(g)
            model.loss_curve_ = nets.curves[g]
            model.loss_, model.n_iter_ = model.loss_curve_[-1], len(model.loss_curve_)

    def _forward(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        (W1, W2), (b1, b2) = self.coefs_, self.intercepts_
        return np.maximum(X @ W1 + b1, 0) @ W2 + b2


class TorchMLPClassifier(ClassifierMixin, _TorchMLP):
    """``hidden_layer_size`` ReLU units, a softmax (a sigmoid for two classes), log loss plus
    ``alpha / 2 * ||W||^2`` per minibatch, Adam at ``learning_rate_init``; training stops once the
    epoch's training loss has not improved by ``tol`` for ``n_iter_no_change`` epochs in a row, or after
    ``max_iter`` epochs: scikit-learn's ``MLPClassifier`` with ``solver="adam"`` and these arguments.
    ``amp`` is the precision of the matrix products (``auto``: bf16 where native, as for a backbone's
    forward pass; ``off``: float32, the same model as scikit-learn's up to rounding); weights, Adam and
    the loss stay float32. ``device="auto"`` is CUDA when present. Learned: ``classes_``, ``coefs_``,
    ``intercepts_`` (per layer), ``n_iter_`` (epochs), ``loss_`` and ``loss_curve_``. Tags (``y`` a 0/1
    matrix, a column per tag) get a sigmoid each, as ``MLPClassifier`` has them (``tags_`` is then True,
    ``predict`` gives 0/1 rows)."""

    tags_ = False  # learned at fit; heads saved before tags were trained here had classes

    def _fit_groups(self, X: np.ndarray, y: np.ndarray, groups: list[Group], models: list) -> None:
        """Train ``models[i]`` (clones of this estimator) on ``groups[i]``'s rows of ``X``, standardised by
        the group's scaler if it has one, side by side; every group holds every class of ``y``."""
        classes, codes = encode_classes(y)
        output = "softmax" if one_softmax(codes, len(classes)) else "sigmoid"
        self._train(X, output_targets(codes, len(classes)), output, groups, models)
        for model in models:
            model.classes_, model.tags_ = classes, codes.ndim == 2

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, or for tags each tag's."""
        logits = self._forward(X)
        return expit(logits) if self.tags_ else probabilities(logits)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row, or for tags its 0/1 row (a tag at a probability over 0.5)."""
        if self.tags_:
            return (self._forward(X) > 0).astype(int)
        best = np.argmax(self.predict_proba(X), axis=1)
        return self.classes_[best]


class TorchMLPRegressor(RegressorMixin, _TorchMLP):
    """The regressor of :class:`TorchMLPClassifier`'s network: one output, no activation, the squared
    loss ``mean((y - z)^2) / 2`` plus ``alpha / 2 * ||W||^2`` per minibatch: scikit-learn's
    ``MLPRegressor`` with ``solver="adam"`` and these arguments. ``scale_target`` standardises ``y`` on
    each fit's rows and predicts in its units, as ``TransformedTargetRegressor(..., transformer=
    StandardScaler())`` around it does (learned: ``target_mean_``, ``target_scale_``). Learned besides:
    ``coefs_``, ``intercepts_``, ``n_iter_``, ``loss_`` and ``loss_curve_``."""

    _parameter_constraints: dict = {**_TorchMLP._parameter_constraints, "scale_target": ["boolean"]}

    def __init__(self, hidden_layer_size: int = 100, alpha: float = 1e-4, batch_size: int | str = "auto",
                 learning_rate_init: float = 1e-3, max_iter: int = 200, tol: float = 1e-4, n_iter_no_change: int = 10,
                 scale_target: bool = False, amp: str = "auto", device: str = "auto", random_state=None):
        super().__init__(hidden_layer_size, alpha, batch_size, learning_rate_init, max_iter, tol, n_iter_no_change,
                         amp, device, random_state)
        self.scale_target = scale_target

    def _fit_groups(self, X: np.ndarray, y: np.ndarray, groups: list[Group], models: list) -> None:
        """Train ``models[i]`` on ``groups[i]``'s rows, side by side; ``y`` one number per row."""
        if np.ndim(y) != 1:
            raise ValueError(f"takes one number per row, got targets of shape {np.shape(y)}")
        y = np.asarray(y, dtype=np.float64)
        means = np.array([y[g.rows].mean() if self.scale_target else 0.0 for g in groups])
        scales = np.array([_scale(y[g.rows]) if self.scale_target else 1.0 for g in groups])
        self._train(X, y[:, None].astype(np.float32), "identity", groups, models, (means, scales))
        for model, mean, scale in zip(models, means, scales):
            model.target_mean_, model.target_scale_ = float(mean), float(scale)

    def predict(self, X) -> np.ndarray:
        """The number of each row."""
        return self._forward(X)[:, 0] * self.target_scale_ + self.target_mean_


def _scale(y: np.ndarray) -> float:
    """``StandardScaler``'s scale of ``y``: its deviation, 1 where it is (about) constant."""
    std = float(np.std(y))
    return std if std > 10 * np.finfo(np.float64).eps * max(abs(float(np.mean(y))), 1.0) else 1.0


class _Nets:
    """The networks of a batch of groups: weights stacked on a first axis (one per group), each group's
    own random stream, minibatch order, Adam state and stopping count, as ``MLPClassifier`` keeps them."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, output: str, groups: list[Group], est: _TorchMLP, seed: int,
                 targets: tuple[np.ndarray, np.ndarray] | None = None):
        self.dev = resolve_device(est.device)
        self.dtype = COMPUTE_DTYPES[resolve_amp(est.amp, self.dev)]
        self.est, self.groups, self.output = est, groups, output
        d, h, o = X.shape[1], est.hidden_layer_size, Y.shape[1]
        # per group, y -> (y - mean) / scale: the targets it trains against
        self.targets = None if targets is None else (self._stack(targets[0])[:, None, None],
                                                    self._stack(1 / targets[1])[:, None, None])
        with warnings.catch_warnings():  # joblib hands workers read-only memory maps; the tensor is only read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            self.X = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.dev)
        self.Y = torch.as_tensor(Y, device=self.dev)
        means, scales = group_scaling(groups, d)
        self.mean, self.inv_scale = self._stack(means.T)[:, None, :], self._stack(1 / scales.T)[:, None, :]
        self.rngs = [np.random.RandomState(seed) for _ in groups]
        inits = [[_glorot(rng, fan_in, fan_out) for fan_in, fan_out in ((d, h), (h, o))] for rng in self.rngs]
        self.W1, self.b1 = (self._stack([init[0][k] for init in inits]) for k in (0, 1))
        self.W2, self.b2 = (self._stack([init[1][k] for init in inits]) for k in (0, 1))
        self.order = [np.arange(len(g.rows)) for g in groups]
        sizes = np.array([len(g.rows) for g in groups])
        if est.batch_size != "auto" and est.batch_size > sizes.min():
            warnings.warn(f"batch_size={est.batch_size} is more than the {sizes.min()} rows; it is clipped")
        self.batch = np.minimum(sizes, 200 if est.batch_size == "auto" else est.batch_size)
        self.steps = -(-sizes // self.batch)
        self.live = np.ones(len(groups), bool)
        self.best, self.bad = np.full(len(groups), np.inf), np.zeros(len(groups), int)
        self.curves: list[list[float]] = [[] for _ in groups]
        self.epochs = 0
        # one Adam per group's weights and one per its biases (no L2 on biases): views into the stacks
        self.views = [(self.W1[g], self.W2[g], self.b1[g], self.b2[g]) for g in range(len(groups))]
        param_groups = []
        for W1, W2, b1, b2 in self.views:
            param_groups += [{"params": [W1, W2]}, {"params": [b1, b2], "weight_decay": 0.0}]
        self.adam = torch.optim.Adam(param_groups, lr=est.learning_rate_init, betas=_BETAS,
                                     fused=self.dev.type in ("cpu", "cuda"))
        self.taken = np.zeros(len(groups), int)  # Adam steps per group

    def _stack(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.tensor(np.stack(arrays), dtype=torch.float32, device=self.dev)

    def epoch(self) -> None:
        """One pass over every live group's rows in a new order; then each group's stopping count."""
        for g in np.flatnonzero(self.live):
            self.order[g] = self.order[g][_permutation(self.rngs[g], len(self.order[g]))]
        summed = torch.zeros(len(self.groups), dtype=torch.float64, device=self.dev)  # read once per epoch
        for j in range(self.steps[self.live].max()):
            active = self.live & (j < self.steps)
            rows = [self.groups[g].rows[self.order[g][j * self.batch[g]:(j + 1) * self.batch[g]]] if active[g] else []
                    for g in range(len(self.groups))]
            loss, grads = self._gradients(rows)
            self._adam_step(grads, rows, active)
            summed += loss.double() * torch.as_tensor([len(r) for r in rows], dtype=torch.float64, device=self.dev)
        self.epochs += 1
        totals = summed.cpu().numpy()
        for g in np.flatnonzero(self.live):
            loss = totals[g] / len(self.groups[g].rows)
            self.curves[g].append(float(loss))
            self.bad[g] = self.bad[g] + 1 if loss > self.best[g] - self.est.tol else 0
            self.best[g] = min(self.best[g], loss)
            self.live[g] = self.bad[g] <= self.est.n_iter_no_change

    def _gradients(self, rows: list[np.ndarray]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Each group's loss on its minibatch ``rows[g]`` (none: padding only) and the gradients of the
        log or squared loss part, stacked as the weights are (W1, W2, b1, b2); the L2 part is Adam's weight decay."""
        G, width = len(rows), max(len(r) for r in rows)
        index = np.zeros((G, width), np.int64)
        weight = np.zeros((G, width), np.float32)  # 1 / batch size on a group's rows, 0 on padding
        for g, r in enumerate(rows):
            index[g, :len(r)], weight[g, :len(r)] = r, 1 / max(len(r), 1)
        index, weight = torch.as_tensor(index, device=self.dev), torch.as_tensor(weight, device=self.dev)
        lo = self.dtype
        x = ((self.X[index] - self.mean) * self.inv_scale).to(lo)
        a = torch.baddbmm(self.b1[:, None, :].to(lo), x, self.W1.to(lo)).float()
        hidden = a.clamp(min=0)
        z = torch.baddbmm(self.b2[:, None, :], hidden, self.W2)
        y = self.Y[index] if self.targets is None else (self.Y[index] - self.targets[0]) * self.targets[1]
        if self.output == "sigmoid":
            p, row_loss = torch.sigmoid(z), (torch.nn.functional.softplus(z) - y * z).sum(-1)
        elif self.output == "softmax":
            p, row_loss = torch.softmax(z, -1), torch.logsumexp(z, -1) - (z * y).sum(-1)
        else:  # one number: the squared loss
            p, row_loss = z, 0.5 * (z - y).square().sum(-1)
        n = torch.as_tensor([max(len(r), 1) for r in rows], dtype=torch.float32, device=self.dev)
        norms = sum(torch.linalg.vector_norm(W, dim=(1, 2)).square() for W in (self.W1, self.W2))
        loss = (row_loss * weight).sum(1) + 0.5 * self.est.alpha * norms / n
        delta = (p - y) * weight[..., None]  # d(mean loss)/dz, for either loss
        dh = torch.bmm(delta, self.W2.transpose(1, 2)) * (a > 0)
        grads = (torch.bmm(x.transpose(1, 2), dh.to(lo)).float(), torch.bmm(hidden.transpose(1, 2), delta), dh.sum(1),
                 delta.sum(1))
        return loss.detach(), grads

    def _adam_step(self, grads: tuple[torch.Tensor, ...], rows: list[np.ndarray], active: np.ndarray) -> None:
        """One Adam step of every active group; the others keep their weights and Adam state."""
        for g, params in enumerate(self.views):
            for param, grad in zip(params, grads):
                param.grad = grad[g] if active[g] else None
            if active[g]:
                self.taken[g] += 1
                # scikit-learn's Adam adds eps to sqrt(v) before the bias correction, torch's after it
                correction = np.sqrt(1 - _BETAS[1] ** self.taken[g])
                self.adam.param_groups[2 * g]["weight_decay"] = self.est.alpha / len(rows[g])
                for k in (2 * g, 2 * g + 1):
                    self.adam.param_groups[k]["eps"] = _EPS / correction
        self.adam.step()

    def layers(self, g: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Group ``g``'s weights and biases, per layer, as ``MLPClassifier`` and ``MLPRegressor`` keep them."""
        W1, W2, b1, b2 = (t.cpu().numpy().copy() for t in self.views[g])
        return [W1, W2], [b1, b2]


def _glorot(rng: np.random.RandomState, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``MLPClassifier``'s initialisation of a layer followed by ReLU units: uniform in +-sqrt(6 / (fan_in + fan_out))."""
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, (fan_in, fan_out)), rng.uniform(-bound, bound, fan_out)


def _permutation(rng: np.random.RandomState, n: int) -> np.ndarray:
    """The order ``sklearn.utils.shuffle`` draws from ``rng`` for ``n`` rows."""
    order = np.arange(n)
    rng.shuffle(order)
    return order
