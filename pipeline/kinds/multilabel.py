"""Several tags per image (``id,labels[,split]``, tags separated by ``|``, an empty cell for none):
iteratively stratified folds (the ``iterative-stratification`` package), mean average precision over
tags (``map``, with a bootstrap interval), micro average precision and micro F1 at 0.5, each tag's
training prevalence as chance, paired bootstrap tests; fine-tuned with a sigmoid per tag and binary
cross-entropy."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import PipelineError
from . import TaskKind, bootstrap, interval, p_greater, p_two_sided, register_kind
from .classification import fold_scaler

SEPARATOR = "|"


@register_kind
class MultiLabel(TaskKind):
    name = "multilabel"
    column = "labels"
    primary = "map"
    columns = ("map", "map_low", "map_high", "chance", "map_micro", "f1_micro")
    default_heads = ("logreg", "ridge", "knn")

    def parse(self, cells: Sequence[str], where: Sequence[str]) -> np.ndarray:
        out = np.empty(len(cells), dtype=object)
        for i, cell in enumerate(cells):
            tags = [t.strip() for t in cell.split(SEPARATOR)] if cell.strip() else []
            if "" in tags:
                raise PipelineError(f"{where[i]}: empty tag in {cell!r}; tags are separated by {SEPARATOR!r}")
            out[i] = tuple(sorted(set(tags)))
        return out

    def format(self, y: np.ndarray) -> list[str]:
        return [SEPARATOR.join(tags) for tags in y]

    def names(self, y: np.ndarray) -> list[str]:
        return sorted({t for tags in y for t in tags})

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        Y = self.target(y, self.names(y))
        varied = (Y.sum(0) > 0) & (Y.sum(0) < len(y))
        if not varied.any():
            raise PipelineError(f"task {task!r}: needs a tag that some images have and others do not")
        if n_folds and len(y) < n_folds:
            raise PipelineError(f"task {task!r}: {len(y)} images, fewer than --cv {n_folds}")

    def folds(self, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        Y = self.target(y, self.names(y))
        fold = np.empty(len(y), np.int64)
        for k, (_, test) in enumerate(MultilabelStratifiedKFold(n_folds, shuffle=True, random_state=seed).split(Y, Y)):
            fold[test] = k
        return fold

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        if len(y) < 5:
            return None
        Y = self.target(y, self.names(y))
        keep, held = next(MultilabelStratifiedShuffleSplit(1, test_size=fraction, random_state=seed).split(Y, Y))
        return np.sort(keep), np.sort(held)

    def target(self, y: np.ndarray, names: list[str]) -> np.ndarray:
        index = {t: j for j, t in enumerate(names)}
        Y = np.zeros((len(y), len(names)), np.int64)
        for i, tags in enumerate(y):
            Y[i, [index[t] for t in tags if t in index]] = 1
        return Y

    def predict(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        """Each tag's probability (the sigmoid of the margins for heads without probabilities)."""
        from scipy.special import expit

        if not hasattr(estimator, "predict_proba"):
            return expit(np.asarray(estimator.decision_function(X), dtype=np.float64)).reshape(len(X), -1)
        p = estimator.predict_proba(X)
        if isinstance(p, list):  # one (n, classes) array per tag (k nearest neighbours)
            return np.stack([q[:, list(c).index(1)] if 1 in c else np.zeros(len(X))
                             for q, c in zip(p, estimator.classes_)], axis=1)
        return np.asarray(p, dtype=np.float64)

    def scores(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        return self.predict(estimator, X, names)

    def chance(self, y_train: np.ndarray, n: int, names: list[str]) -> np.ndarray:
        return np.tile(self.target(y_train, names).mean(0), (n, 1)).astype(np.float64)

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, y_chance: np.ndarray, folds: np.ndarray,
              names: list[str]) -> dict:
        from sklearn.metrics import average_precision_score, f1_score

        Y = self.target(y_true, names)
        draws = bootstrap(len(Y))
        mine, chance = mean_ap(Y, y_pred, draws), mean_ap(Y, y_chance, draws)
        low, high = interval(mine)
        present = Y.sum(0) > 0
        return dict(
            map=float(mean_ap(Y, y_pred)[0]), map_low=low, map_high=high, chance=float(mean_ap(Y, y_chance)[0]),
            map_micro=float(average_precision_score(Y[:, present], y_pred[:, present], average="micro")),
            f1_micro=float(f1_score(Y, y_pred >= 0.5, average="micro", zero_division=0)),
            p_above_chance=p_greater(mine - chance),
        )

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        return float(mean_ap(self.target(y_true, names), y_pred)[0])

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        Y = self.target(y_true, names)
        draws = bootstrap(len(Y))
        return p_two_sided(mean_ap(Y, mine, draws) - mean_ap(Y, best, draws))

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        return (metrics["map"], metrics["map_micro"], -(fit_seconds or 0.0))

    def format_predictions(self, y_pred: np.ndarray, names: list[str]) -> list[str]:
        return [SEPARATOR.join(f"{v:.6g}" for v in row) for row in y_pred]

    def parse_predictions(self, cells: Sequence[str], names: list[str]) -> np.ndarray:
        return np.array([[float(v) for v in c.split(SEPARATOR)] for c in cells], dtype=np.float64).reshape(len(cells), len(names))

    def predict_columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        """The tags at or above 0.5, and each tag's probability."""
        return [{"prediction": SEPARATOR.join(t for t, v in zip(names, p) if v >= 0.5),
                 **{f"prob_{t}": float(v) for t, v in zip(names, p)}} for p in scores]

    def outputs(self, names: list[str]) -> int:
        return len(names)

    def loss(self, logits, target, scale: float, label_smoothing: float = 0.0):
        import torch

        smoothed = target * (1 - label_smoothing) + 0.5 * label_smoothing
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), smoothed)

    def targets(self, y: Sequence, names: list[str]):
        import torch

        return torch.tensor(self.target(np.array(list(y), dtype=object), names), dtype=torch.float32)

    def from_logits(self, logits: np.ndarray, names: list[str]) -> np.ndarray:
        from scipy.special import expit

        return expit(logits)

    def logit_scores(self, logits: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        return expit(logits)

    def linear_start(self, head, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One sigmoid unit per tag: a one-vs-rest head's tag models stacked (a tag its training data had
        one value of keeps that value's log-odds), or a multi-output linear head's rows."""
        if not hasattr(head, "estimators_"):
            w, b = fold_scaler(head)
            return w.astype(np.float32), b.astype(np.float32)
        rows = []
        for est in head.estimators_:
            if hasattr(est, "y_"):  # scikit-learn's constant predictor for a tag with one value
                p = float(np.clip(np.mean(est.y_), 1e-4, 1 - 1e-4))
                rows.append((np.zeros((1, head.n_features_in_)), np.array([np.log(p / (1 - p))])))
            else:
                rows.append(fold_scaler(est))
        return (np.concatenate([w for w, _ in rows]).astype(np.float32),
                np.concatenate([b for _, b in rows]).astype(np.float32))


def mean_ap(Y: np.ndarray, S: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
    """Mean over tags of average precision (scikit-learn's definition, ties grouped), for each row of
    ``draws`` (bootstrap weights) at once, or for the data as it is; tags without a positive row in a
    draw are left out of its mean."""
    W = np.ones((1, len(Y))) if draws is None else draws
    per_tag = np.stack([_average_precision(Y[:, j], S[:, j], W) for j in range(Y.shape[1])], axis=1)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(per_tag), per_tag, np.nan), axis=1)


def _average_precision(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted average precision of one tag for each row of ``W``: the sum over score thresholds of the
    recall gained times the precision there."""
    order = np.argsort(-s, kind="stable")
    s, y, W = s[order], y[order], W[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last row of each group of tied scores
    tp = np.cumsum(W * y, axis=1)[:, ends]
    seen = np.cumsum(W, axis=1)[:, ends]
    gained = np.diff(tp, axis=1, prepend=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        return np.where(tp[:, -1] > 0, (gained * precision).sum(1) / tp[:, -1], np.nan)
