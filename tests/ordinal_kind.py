"""A task kind defined outside the package, as a user would: ordinal grades (``id,grade``), integers
read as numbers, split, scored and fine-tuned like a regression, with one metric of its own. The whole
kind is the parts it combines, its attributes and one registered metric."""

import numpy as np

from pipeline.kinds import TaskKind, register_kind
from pipeline.kinds.metrics import register_metric
from pipeline.kinds.parts import LinearLayer, NumberLabels, NumberPredictions, R2Scoring, ShuffledSplits


@register_kind
class Ordinal(NumberLabels, ShuffledSplits, R2Scoring, NumberPredictions, LinearLayer, TaskKind):
    name = "ordinal"
    column = "grade"
    default_heads = ("sklearn.neighbors:KNeighborsRegressor",)
    estimator_type = "regressor"


@register_metric("ordinal", "within_one")
def within_one(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    """The share of predictions that, rounded to a grade, are at most one grade off."""
    return float(np.mean(np.abs(np.round(y_pred) - y_true) <= 1))
