"""Metrics beside a kind's own: each is one function registered for a task kind, as timm registers
models. A kind scores its primary metric, its interval, chance and the test against chance itself; every
other leaderboard column is a registered metric, computed from the scored samples' predictions or, for
a metric that ranks (AUROC), from their scores (class probabilities). Adding one is a function and
``@register_metric``; its module is imported in :mod:`pipeline.kinds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..validation import one_of, validate_params

_METRICS: dict[str, dict[str, "Metric"]] = {}
NEEDS = ("predictions", "scores")


@dataclass(frozen=True)
class Metric:
    """``fn(y_true, values, names) -> float``, where ``values`` are the kind's predictions, or its scores
    (``TaskKind.scores``: class probabilities in ``names`` order) for a metric that ``needs`` them."""

    name: str
    kind: str
    needs: str
    fn: Callable[[np.ndarray, np.ndarray, list[str]], float]

    def __call__(self, y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None, names: list[str]) -> float | None:
        """The metric, or None when it needs scores and the model gave none."""
        values = y_pred if self.needs == "predictions" else scores
        return None if values is None else float(self.fn(y_true, values, names))


@validate_params(dict(needs=one_of(*NEEDS)), spell=str)
def register_metric(kind: str, name: str, needs: str = "predictions"):
    """Decorator: ``fn`` becomes the leaderboard column ``name`` of every row of a ``kind`` task."""

    def wrap(fn):
        _METRICS.setdefault(kind, {})[name] = Metric(name, kind, needs, fn)
        return fn

    return wrap


def metrics_of(kind: str) -> tuple[Metric, ...]:
    """A kind's registered metrics, in registration order (their leaderboard columns' order)."""
    return tuple(_METRICS.get(kind, {}).values())
