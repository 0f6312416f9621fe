"""What a fitted scikit-learn head predicts (``predict``: the form the scoring reads; ``scores``: what
``predict`` reports and score-reading metrics get), and how predictions are written to a run's
``*.predictions.csv`` and to ``predict``'s columns."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import expit, softmax

from .labels import SEPARATOR


class ClassPredictions:
    """Class names, with class probabilities as scores."""

    def predict(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(estimator.predict(X), dtype=object)

    def scores(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        """Class probabilities in ``names`` order, 0 for a class the head was not trained on (a class only
        the scored images have: it cannot predict it); for heads without them (linear-svm, ridge), the
        softmax of their margins, which ranks like them but is not calibrated."""
        if hasattr(estimator, "predict_proba"):
            probs = np.asarray(estimator.predict_proba(X))
        else:
            margins = np.asarray(estimator.decision_function(X), dtype=np.float64)
            if margins.ndim == 1:
                margins = np.stack([-margins / 2, margins / 2], axis=1)
            probs = softmax(margins, axis=1)
        known = {c: j for j, c in enumerate(map(str, estimator.classes_))}
        columns = np.array([known.get(c, -1) for c in names], dtype=np.int64)
        return np.where(columns >= 0, probs[:, columns], 0.0)

    def predict_scored(self, estimator, X: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """The most probable class of the scores, as ``predict`` serves it, with the scores; a head with
        neither probabilities nor margins: its own predictions, and no scores."""
        try:
            scores = self.scores(estimator, X, names)
        except (AttributeError, NotImplementedError):
            return self.predict(estimator, X, names), None
        return np.asarray(self.prediction(names, scores), dtype=object), scores

    def format_predictions(self, y_pred: np.ndarray, names: list[str]) -> list[str]:
        return [str(v) for v in y_pred]

    def parse_predictions(self, cells: Sequence[str], names: list[str]) -> np.ndarray:
        return np.array(list(cells), dtype=object)

    def prediction(self, names: list[str], scores: np.ndarray) -> list:
        """The most probable class of each row of scores."""
        return [names[i] for i in np.argmax(scores, axis=1)]

    def predict_columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        """The most probable class, and each class's probability."""
        return [{"prediction": d, **{f"prob_{c}": float(v) for c, v in zip(names, p)}}
                for d, p in zip(self.prediction(names, scores), scores)]


class TagPredictions:
    """A probability per tag (a column per name), which are also the scores."""

    def predict(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        """Each tag's probability (the sigmoid of the margins for heads without probabilities)."""
        if not hasattr(estimator, "predict_proba"):
            return expit(np.asarray(estimator.decision_function(X), dtype=np.float64)).reshape(len(X), -1)
        p = estimator.predict_proba(X)
        if isinstance(p, list):  # one (n, classes) array per tag (k nearest neighbours)
            return np.stack([q[:, list(c).index(1)] if 1 in c else np.zeros(len(X))
                             for q, c in zip(p, estimator.classes_)], axis=1)
        return np.asarray(p, dtype=np.float64)

    def format_predictions(self, y_pred: np.ndarray, names: list[str]) -> list[str]:
        """Each tag's probability, named: ``ants=0.97|bees=0.02``."""
        return [SEPARATOR.join(f"{n}={v:.6g}" for n, v in zip(names, row)) for row in y_pred]

    def parse_predictions(self, cells: Sequence[str], names: list[str]) -> np.ndarray:
        """Probabilities in ``names`` order from named cells (or bare values, as runs before named them)."""
        rows = [[float(v.rpartition("=")[2]) for v in c.split(SEPARATOR)] for c in cells]
        return np.array(rows, dtype=np.float64).reshape(len(cells), len(names))

    def prediction(self, names: list[str], scores: np.ndarray) -> list:
        """The tags at or above 0.5 of each row of scores."""
        return [SEPARATOR.join(t for t, v in zip(names, p) if v >= 0.5) for p in scores]

    def predict_columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        """The tags at or above 0.5, and each tag's probability."""
        return [{"prediction": d, **{f"prob_{t}": float(v) for t, v in zip(names, p)}}
                for d, p in zip(self.prediction(names, scores), scores)]


class NumberPredictions:
    """A number per image, which is also the score."""

    def predict(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        return np.asarray(estimator.predict(X), dtype=np.float64).ravel()

    def format_predictions(self, y_pred: np.ndarray, names: list[str]) -> list[str]:
        return [repr(float(v)) for v in y_pred]

    def parse_predictions(self, cells: Sequence[str], names: list[str]) -> np.ndarray:
        return np.array([float(c) for c in cells], dtype=np.float64)

    def prediction(self, names: list[str], scores: np.ndarray) -> list:
        return [float(v) for v in scores]

    def predict_columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        return [{"prediction": v} for v in self.prediction(names, scores)]
