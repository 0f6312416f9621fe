"""Split-conformal prediction sets: ``predict --coverage 0.9`` gives each image the classes (or the
interval of numbers) that hold its true label 90 % of the time, calibrated on the run's out-of-sample
predictions of its scored images (the held-out split, or the out-of-fold predictions of cross-validation).

Conformity scores, one per calibration image: for classes ``1 - p(true class)`` (LAC: the smallest sets
on average, Sadinle et al. 2019; APS's sets adapt to how hard an image is but are larger, and one score is
enough to choose); for numbers the absolute residual ``|y - prediction|``. The threshold is their
``ceil((n + 1) * coverage) / n`` empirical quantile (the finite-sample correction: coverage at least the
target for an image exchangeable with the calibration images); a class is in the set when its probability
is at least ``1 - threshold``, a number interval is the prediction plus or minus the threshold. ``predict``
computes the probabilities with the same transform the head's row was scored with in ``fit``
(``TaskKind.scores``: probabilities, or a softmax of margins), so threshold and sets use the same scale.

Why a quantile over saved scores and not `mapie <https://mapie.readthedocs.io>`_ (not a dependency): its
split conformal needs calibration features run through a prefit estimator that has not seen them, and a
cross-validated run saves a model refit on every image. The run's saved out-of-sample scores are exactly
what split (and, after cross-validation, cross-) conformal calibrates on; for a refit model the coverage is
that of the fold models it was scored by, close when the folds are large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import PipelineError
from .evaluation import Row, RunFolder
from .kinds import TaskKind, get_kind
from .kinds.parts.labels import SEPARATOR


def threshold(conformity: np.ndarray, coverage: float) -> float:
    """The ``ceil((n + 1) * coverage)``-th smallest conformity score (infinite when that is past ``n``:
    too few calibration images for the coverage, so every class or number is in)."""
    scores = np.sort(np.asarray(conformity, dtype=np.float64))
    k = math.ceil((len(scores) + 1) * coverage)
    return float(scores[k - 1]) if 0 < k <= len(scores) else (math.inf if k > 0 else -math.inf)


def class_conformity(y_true: np.ndarray, probabilities: np.ndarray, names: list[str]) -> np.ndarray:
    """``1 - p(true class)`` per image; ``probabilities`` has a column per class in ``names`` order."""
    column = {c: j for j, c in enumerate(names)}
    return 1.0 - probabilities[np.arange(len(y_true)), [column[str(y)] for y in y_true]]


def number_conformity(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """The absolute residual per image."""
    return np.abs(np.asarray(y_true, dtype=np.float64) - np.asarray(y_pred, dtype=np.float64))


@dataclass
class Calibration:
    """A conformity threshold for ``coverage``, from ``n`` calibration images of a task of kind ``kind``."""

    kind: str
    coverage: float
    threshold: float
    n: int

    def columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        """``predict``'s columns for each row of the kind's ``scores``: ``prediction_set`` (the classes
        in, most probable first, ``|``-separated) or ``prediction_low`` and ``prediction_high``."""
        if _sets(get_kind(self.kind)):
            return [{"prediction_set": SEPARATOR.join(names[j] for j in np.argsort(-p, kind="stable")
                                                      if 1.0 - p[j] <= self.threshold)} for p in scores]
        return [{"prediction_low": float(v - self.threshold), "prediction_high": float(v + self.threshold)}
                for v in np.asarray(scores, dtype=np.float64)]

    @staticmethod
    def blank(kind: str) -> dict:
        """The columns of an image that could not be predicted."""
        return dict.fromkeys(["prediction_set"] if _sets(get_kind(kind)) else ["prediction_low", "prediction_high"], "")


def calibrate(run: RunFolder, row: Row, coverage: float) -> Calibration:
    """The threshold of ``row`` for ``coverage``, from its saved predictions (and, for classes, its saved
    scores) of the task's scored images."""
    kind = get_kind(row.task_kind)
    if not (_sets(kind) or kind.estimator_type == "regressor"):
        raise PipelineError(f"--coverage gives class sets or number intervals; a {kind.name} task has neither")
    _, y_true, y_pred = run.read_predictions(row)
    if _sets(kind):
        protocol = run.protocol(row.task)
        conformity = class_conformity(y_true, run.read_scores(row), protocol.names)
    else:
        conformity = number_conformity(y_true, y_pred)
    return Calibration(kind.name, coverage, threshold(conformity, coverage), len(conformity))


def _sets(kind: TaskKind) -> bool:
    return kind.single_label
