"""One class per image (``id,label[,split]``): stratified folds, accuracy with a Wilson interval,
balanced accuracy and macro F1, the majority class as chance, exact McNemar and binomial tests;
fine-tuned with cross-entropy over a softmax."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

from . import TaskKind, register_kind
from .metrics import register_metric
from .parts import AccuracyScoring, ClassLabels, ClassPredictions, SoftmaxLayer, StratifiedSplits


@register_kind
class Classification(ClassLabels, StratifiedSplits, AccuracyScoring, ClassPredictions, SoftmaxLayer, TaskKind):
    name = "classification"
    column = "label"
    default_heads = ("logreg", "mlp", "knn")
    single_label = True
    fewshot = True

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        """Accuracy, then balanced accuracy, then the faster fit."""
        return (metrics["accuracy"], metrics["balanced_accuracy"], -(fit_seconds or 0.0))


@register_metric("classification", "balanced_accuracy")
def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    return balanced_accuracy_score(y_true, y_pred)


@register_metric("classification", "f1_macro")
def f1_macro(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
    return f1_score(y_true, y_pred, average="macro")
