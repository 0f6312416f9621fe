"""AUROC for classes: how well a row's class probabilities rank each class's images above the others
(one-vs-rest, averaged over the classes that the scored images hold with both signs), where accuracy only
counts the top class. Chance is 0.5 whatever the class balance."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from .metrics import register_metric


@register_metric("classification", "auroc", needs="scores")
def auroc(y_true: np.ndarray, scores: np.ndarray, names: list[str]) -> float:
    y = np.asarray(y_true).astype(str)
    per_class = [roc_auc_score(y == c, scores[:, j]) for j, c in enumerate(names) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(per_class)) if per_class else float("nan")
