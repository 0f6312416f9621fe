"""A number per image (``id,target[,split]``): shuffled folds, R² (with a bootstrap interval), MAE,
RMSE and Spearman's rank correlation, the training mean as chance, paired bootstrap tests; fine-tuned
with one linear output and the squared error."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from . import TaskKind, register_kind
from .metrics import register_metric
from .parts import LinearLayer, NumberLabels, NumberPredictions, R2Scoring, ShuffledSplits
from .parts.scoring import errors


@register_kind
class Regression(NumberLabels, ShuffledSplits, R2Scoring, NumberPredictions, LinearLayer, TaskKind):
    name = "regression"
    column = "target"
    default_heads = ("ridge", "knn", "mlp")
    estimator_type = "regressor"

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        """R², then the lower MAE, then the faster fit."""
        return (metrics["r2"], -metrics["mae"], -(fit_seconds or 0.0))


@register_metric("regression", "mae")
def mae(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    return errors(y_true, y_pred)[0]


@register_metric("regression", "rmse")
def rmse(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    return errors(y_true, y_pred)[1]


@register_metric("regression", "spearman")
def spearman(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    """Rank correlation (NaN for constant predictions, which have no ranking)."""
    return spearmanr(np.asarray(y_true, dtype=np.float64), y_pred).statistic if np.ptp(y_pred) > 0 else float("nan")
