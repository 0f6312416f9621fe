"""One class per image (``id,label[,split]``): stratified folds, accuracy with a Wilson interval,
balanced accuracy and macro F1, the majority class as chance, exact McNemar and binomial tests;
fine-tuned with cross-entropy over a softmax."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import PipelineError
from . import TaskKind, register_kind


@register_kind
class Classification(TaskKind):
    name = "classification"
    column = "label"
    primary = "accuracy"
    columns = ("accuracy", "acc_low", "acc_high", "acc_std", "chance", "balanced_accuracy", "f1_macro")
    default_heads = ("logreg", "mlp", "knn")
    fewshot = True

    def parse(self, cells: Sequence[str], where: Sequence[str]) -> np.ndarray:
        out = np.array([c.strip() for c in cells], dtype=object)
        empty = np.flatnonzero(out == "")
        if len(empty):
            raise PipelineError(f"{where[empty[0]]}: empty label")
        return out

    def format(self, y: np.ndarray) -> list[str]:
        return [str(v) for v in y]

    def names(self, y: np.ndarray) -> list[str]:
        return sorted(set(map(str, y)))

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
        from sklearn.model_selection import StratifiedKFold

        fold = np.empty(len(y), np.int64)
        for k, (_, test) in enumerate(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)):
            fold[test] = k
        return fold

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        from sklearn.model_selection import train_test_split

        classes, counts = np.unique(y, return_counts=True)
        n_held = int(np.ceil(fraction * len(y)))
        if counts.min() < 2 or not len(classes) <= n_held <= len(y) - len(classes):
            return None
        keep, held = train_test_split(np.arange(len(y)), test_size=n_held, random_state=seed, stratify=y)
        return np.sort(keep), np.sort(held)

    def target(self, y: np.ndarray, names: list[str]) -> np.ndarray:
        return y

    def predict(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(estimator.predict(X), dtype=object)

    def scores(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        """Class probabilities in ``names`` order; for heads without them (linear-svm, ridge), the softmax of
        their margins, which ranks like them but is not calibrated."""
        from scipy.special import softmax

        order = [list(map(str, estimator.classes_)).index(c) for c in names]
        if hasattr(estimator, "predict_proba"):
            return estimator.predict_proba(X)[:, order]
        scores = np.asarray(estimator.decision_function(X), dtype=np.float64)
        if scores.ndim == 1:
            scores = np.stack([-scores / 2, scores / 2], axis=1)
        return softmax(scores, axis=1)[:, order]

    def chance(self, y_train: np.ndarray, n: int, names: list[str]) -> np.ndarray:
        classes, counts = np.unique(y_train, return_counts=True)
        return np.full(n, classes[np.argmax(counts)], dtype=object)

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, y_chance: np.ndarray, folds: np.ndarray,
              names: list[str]) -> dict:
        from scipy.stats import binomtest
        from sklearn.metrics import balanced_accuracy_score, f1_score

        correct = y_true == y_pred
        n, right = len(y_true), int(correct.sum())
        low, high = binomtest(right, n).proportion_ci(0.95, method="wilson")
        per_fold = [correct[folds == f].mean() for f in np.unique(folds)]
        chance = float(np.mean(y_true == y_chance))
        return dict(
            accuracy=right / n, acc_low=float(low), acc_high=float(high),
            acc_std=float(np.std(per_fold)) if len(per_fold) > 1 else None, chance=chance,
            balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)),
            f1_macro=float(f1_score(y_true, y_pred, average="macro")),
            p_above_chance=float(binomtest(right, n, chance, alternative="greater").pvalue),
        )

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        """Exact McNemar test: of the samples exactly one of the two rows got right, is either side more
        often the one?"""
        from scipy.stats import binomtest

        a, b = mine == y_true, best == y_true
        only_best, only_mine = int((b & ~a).sum()), int((a & ~b).sum())
        return float(binomtest(only_best, only_best + only_mine).pvalue) if only_best + only_mine else 1.0

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        """Accuracy, then balanced accuracy, then the faster fit."""
        return (metrics["accuracy"], metrics["balanced_accuracy"], -(fit_seconds or 0.0))

    def format_predictions(self, y_pred: np.ndarray, names: list[str]) -> list[str]:
        return [str(v) for v in y_pred]

    def parse_predictions(self, cells: Sequence[str], names: list[str]) -> np.ndarray:
        return np.array(list(cells), dtype=object)

    def predict_columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        """The most probable class, and each class's probability."""
        return [{"prediction": names[int(np.argmax(p))], **{f"prob_{c}": float(v) for c, v in zip(names, p)}}
                for p in scores]

    def outputs(self, names: list[str]) -> int:
        return len(names)

    def loss(self, logits, target, scale: float, label_smoothing: float = 0.0):
        import torch

        return torch.nn.functional.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)

    def targets(self, y: Sequence, names: list[str]):
        import torch

        index = {c: i for i, c in enumerate(names)}
        return torch.tensor([index[str(v)] for v in y], dtype=torch.long)

    def from_logits(self, logits: np.ndarray, names: list[str]) -> np.ndarray:
        return np.array(names, dtype=object)[np.argmax(logits, axis=1)]

    def logit_scores(self, logits: np.ndarray) -> np.ndarray:
        """What ``predict`` reports for a fine-tuned network: class probabilities."""
        from scipy.special import softmax

        return softmax(logits, axis=1)

    def linear_start(self, head, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Softmax weights: a binary head's single row ``w`` becomes the rows ``-w/2, w/2`` (the same
        probabilities under softmax)."""
        w, b = fold_scaler(head)
        if w.shape[0] == 1:
            w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
        return w.astype(np.float32), b.astype(np.float32)


def fold_scaler(head) -> tuple[np.ndarray, np.ndarray]:
    """A fitted ``scaler -> linear model`` pipeline (inside a search, if any) as weights on raw features:
    ``W' = W / scale``, ``b' = b - W' @ mean``."""
    pipe = getattr(head, "best_estimator_", head)
    scaler, model = pipe[0], pipe[-1]
    w = np.atleast_2d(model.coef_) / scaler.scale_
    b = np.atleast_1d(model.intercept_) - w @ scaler.mean_
    return w, b
