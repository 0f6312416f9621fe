"""One class per image (``id,label[,split]``): stratified folds, accuracy with a Wilson interval,
balanced accuracy and macro F1, the majority class as chance, exact McNemar and binomial tests."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from ..errors import PipelineError
from . import TaskKind, register_kind


@register_kind
class Classification(TaskKind):
    name = "classification"
    column = "label"
    primary = "accuracy"
    columns = ("accuracy", "acc_low", "acc_high", "acc_std", "chance", "balanced_accuracy", "f1_macro")

    def parse(self, values: Sequence[str], where: Sequence[str]) -> np.ndarray:
        out = np.array([v.strip() for v in values], dtype=object)
        empty = np.flatnonzero(out == "")
        if len(empty):
            raise PipelineError(f"{where[empty[0]]}: empty label")
        return out

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise PipelineError(f"task {task!r}: needs at least 2 classes, found {len(classes)} "
                                f"({', '.join(map(str, classes))})")
        rare = counts < (n_folds or 0)
        if rare.any():
            raise PipelineError(
                f"task {task!r}: class {classes[rare][0]!r} has {counts[rare][0]} sample(s), fewer than --cv "
                f"{n_folds}; lower --cv, add samples, or give the task a train/val split")

    def folds(self, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
        fold = np.empty(len(y), np.int64)
        for k, (_, test) in enumerate(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)):
            fold[test] = k
        return fold

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        classes, counts = np.unique(y, return_counts=True)
        n_held = int(np.ceil(fraction * len(y)))
        if counts.min() < 2 or not len(classes) <= n_held <= len(y) - len(classes):
            return None
        keep, held = train_test_split(np.arange(len(y)), test_size=n_held, random_state=seed, stratify=y)
        return np.sort(keep), np.sort(held)

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, y_chance: np.ndarray, folds: np.ndarray) -> dict:
        correct = y_true == y_pred
        low, high = binomtest(int(correct.sum()), len(y_true)).proportion_ci(0.95, method="wilson")
        per_fold = [correct[folds == f].mean() for f in np.unique(folds)]
        return dict(
            accuracy=float(correct.mean()), acc_low=float(low), acc_high=float(high),
            acc_std=float(np.std(per_fold)) if len(per_fold) > 1 else None,
            chance=float(np.mean(y_true == y_chance)),
            balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)),
            f1_macro=float(f1_score(y_true, y_pred, average="macro")),
        )

    def chance_prediction(self, y_train: np.ndarray, n: int) -> np.ndarray:
        classes, counts = np.unique(y_train, return_counts=True)
        return np.full(n, classes[np.argmax(counts)], dtype=object)

    def outcome(self, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        return np.asarray(y_true) == np.asarray(y_pred)

    def p_same(self, mine: np.ndarray, best: np.ndarray) -> float:
        """Exact McNemar test: of the samples exactly one of the two rows got right, is either side more
        often the one?"""
        only_best, only_mine = int((best & ~mine).sum()), int((mine & ~best).sum())
        return float(binomtest(only_best, only_best + only_mine).pvalue) if only_best + only_mine else 1.0

    def p_above_chance(self, metrics: dict) -> float:
        n = metrics["n_test"]
        return float(binomtest(round(metrics["accuracy"] * n), n, metrics["chance"], alternative="greater").pvalue)

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        """Accuracy, then balanced accuracy, then the faster fit."""
        return (metrics["accuracy"], metrics["balanced_accuracy"], -(fit_seconds or 0.0))

    def predict_columns(self, classes: Sequence[str], scores: np.ndarray) -> list[dict]:
        return [{"prediction": classes[int(np.argmax(p))], **{f"prob_{c}": float(v) for c, v in zip(classes, p)}}
                for p in scores]
