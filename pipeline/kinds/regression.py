"""A number per image (``id,target[,split]``): shuffled folds, R² (with a bootstrap interval), MAE,
RMSE and Spearman's rank correlation, the training mean as chance, paired bootstrap tests; fine-tuned
with one linear output and the squared error."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import PipelineError
from . import TaskKind, bootstrap, interval, p_greater, p_two_sided, register_kind
from .classification import fold_scaler


@register_kind
class Regression(TaskKind):
    name = "regression"
    column = "target"
    primary = "r2"
    columns = ("r2", "r2_low", "r2_high", "chance", "mae", "rmse", "spearman")
    default_heads = ("ridge", "knn", "mlp")

    def parse(self, cells: Sequence[str], where: Sequence[str]) -> np.ndarray:
        out = np.empty(len(cells), dtype=np.float64)
        for i, cell in enumerate(cells):
            try:
                out[i] = float(cell)
            except ValueError:
                raise PipelineError(f"{where[i]}: target {cell.strip()!r} is not a number") from None
            if not math.isfinite(out[i]):
                raise PipelineError(f"{where[i]}: target {cell.strip()!r} is not a finite number")
        return out

    def format(self, y: np.ndarray) -> list[str]:
        return [repr(float(v)) for v in y]

    def names(self, y: np.ndarray) -> list[str]:
        return []

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        if len(y) < max(n_folds or 0, 3):
            raise PipelineError(f"task {task!r}: {len(y)} images, too few to score a regression"
                                + (f" with --cv {n_folds}" if n_folds else ""))
        if np.ptp(np.asarray(y, dtype=np.float64)) == 0:
            raise PipelineError(f"task {task!r}: every target is {y[0]}; there is nothing to predict")

    def folds(self, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
        from sklearn.model_selection import KFold

        fold = np.empty(len(y), np.int64)
        for k, (_, test) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)))):
            fold[test] = k
        return fold

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        from sklearn.model_selection import train_test_split

        if len(y) < 5:
            return None
        keep, held = train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed)
        return np.sort(keep), np.sort(held)

    def target(self, y: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(y, dtype=np.float64)

    def predict(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(estimator.predict(X), dtype=np.float64).ravel()

    def scores(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        return self.predict(estimator, X, names)

    def chance(self, y_train: np.ndarray, n: int, names: list[str]) -> np.ndarray:
        return np.full(n, float(np.mean(np.asarray(y_train, dtype=np.float64))))

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, y_chance: np.ndarray, folds: np.ndarray,
              names: list[str]) -> dict:
        from scipy.stats import spearmanr

        y = np.asarray(y_true, dtype=np.float64)
        draws = bootstrap(len(y))
        mine, chance = r2(y, y_pred, draws), r2(y, y_chance, draws)
        low, high = interval(mine)
        err = y_pred - y
        rho = spearmanr(y, y_pred).statistic if np.ptp(y_pred) > 0 else float("nan")
        return dict(r2=float(r2(y, y_pred)[0]), r2_low=low, r2_high=high, chance=float(r2(y, y_chance)[0]),
                    mae=float(np.mean(np.abs(err))), rmse=float(np.sqrt(np.mean(err ** 2))), spearman=float(rho),
                    p_above_chance=p_greater(mine - chance))

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        return float(r2(np.asarray(y_true, dtype=np.float64), y_pred)[0])

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        y = np.asarray(y_true, dtype=np.float64)
        draws = bootstrap(len(y))
        return p_two_sided(r2(y, mine, draws) - r2(y, best, draws))

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        return (metrics["r2"], -metrics["mae"], -(fit_seconds or 0.0))

    def format_predictions(self, y_pred: np.ndarray, names: list[str]) -> list[str]:
        return [repr(float(v)) for v in y_pred]

    def parse_predictions(self, cells: Sequence[str], names: list[str]) -> np.ndarray:
        return np.array([float(c) for c in cells], dtype=np.float64)

    def predict_columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        return [{"prediction": float(v)} for v in scores]

    def outputs(self, names: list[str]) -> int:
        return 1

    def loss_scale(self, y: np.ndarray) -> float:
        """The training targets' variance, so the loss is on the scale of a standardised target."""
        return float(np.var(np.asarray(y, dtype=np.float64))) or 1.0

    def loss(self, logits, target, scale: float, label_smoothing: float = 0.0):
        import torch

        return torch.nn.functional.mse_loss(logits.float()[:, 0], target) / scale

    def targets(self, y: Sequence, names: list[str]):
        import torch

        return torch.tensor([float(v) for v in y], dtype=torch.float32)

    def from_logits(self, logits: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64)[:, 0]

    def logit_scores(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64)[:, 0]

    def initial_bias(self, y: np.ndarray, names: list[str]) -> np.ndarray | None:
        return np.array([np.mean(np.asarray(y, dtype=np.float64))], dtype=np.float32)

    def linear_start(self, head, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        w, b = fold_scaler(head)
        return w.reshape(1, -1).astype(np.float32), b.reshape(1).astype(np.float32)


def r2(y: np.ndarray, pred: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
    """R² (1 - squared error / the variance around the mean) for each row of ``draws`` (bootstrap
    weights) at once, or for the data as it is."""
    W = np.ones((1, len(y))) if draws is None else draws
    total = W.sum(1, keepdims=True)
    mean = (W * y).sum(1, keepdims=True) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - (W * (y - pred) ** 2).sum(1) / (W * (y - mean) ** 2).sum(1)
