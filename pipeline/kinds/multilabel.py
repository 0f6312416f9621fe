"""Several tags per image (``id,labels[,split]``, tags separated by ``|``, an empty cell for none):
iteratively stratified folds (the ``iterative-stratification`` package), mean average precision over
tags (``map``, with a bootstrap interval), micro average precision and micro F1 at 0.5, each tag's
training prevalence as chance, paired bootstrap tests; fine-tuned with a sigmoid per tag and binary
cross-entropy."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, f1_score

from . import TaskKind, register_kind
from .metrics import register_metric
from .parts import MeanAPScoring, SigmoidLayer, TagLabels, TagPredictions, TagStratifiedSplits
from .parts.labels import indicators


@register_kind
class MultiLabel(TagLabels, TagStratifiedSplits, MeanAPScoring, TagPredictions, SigmoidLayer, TaskKind):
    name = "multilabel"
    column = "labels"
    default_heads = ("logreg", "ridge", "knn")

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        """Mean AP, then micro AP, then the faster fit."""
        return (metrics["map"], metrics["map_micro"], -(fit_seconds or 0.0))


@register_metric("multilabel", "map_micro")
def map_micro(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    """Average precision over every (image, tag) pair at once, of the tags some scored image has."""
    Y = indicators(y_true, names)
    present = Y.sum(0) > 0
    return average_precision_score(Y[:, present], y_pred[:, present], average="micro")


@register_metric("multilabel", "f1_micro")
def f1_micro(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    return f1_score(indicators(y_true, names), y_pred >= 0.5, average="micro", zero_division=0)
