"""Task kinds: what a label column means, picked by the label file's header from a registry like
timm's models.

A kind owns every decision that depends on what the labels are: how a label cell is read and written,
how rows are split into folds, what a head fits on and what it predicts, which metrics score those
predictions (with their interval), what chance predicts and how a row is tested against it and against
the best row, how rows are ranked, the columns ``predict`` writes, the default heads, and the loss a
fine-tune trains with. The evaluation protocol (:mod:`pipeline.evaluation.protocol`) and the stages ask the task's
kind for each of them, through :class:`TaskKind`'s methods.

A kind is made of parts (:mod:`pipeline.kinds.parts`), one per concern: its labels, its splits, its
scoring, its heads' predictions, its network's last layer. Adding a kind is one module: a class that
lists a part of each concern and ``TaskKind``, sets its attributes, and is decorated with
``@register_kind``; a metric beside the kind's own is a function with ``@register_metric``
(:mod:`pipeline.kinds.metrics`).

Predictions travel as one array per kind: class names (classification), a score matrix with a column
per tag (multi-label), numbers (regression). ``names`` are the classes or tags a model predicts over,
in a fixed order (none for regression).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import PipelineError
from ..validation import unknown
from .metrics import metrics_of, register_metric  # noqa: F401  (register_metric: the kinds' modules use it)

if TYPE_CHECKING:
    from .parts.scoring import Breakdown

_KINDS: dict[str, "TaskKind"] = {}


class TaskKind:
    """The interface of a task kind, which every stage calls; the parts (:mod:`pipeline.kinds.parts`)
    implement it, and where a default makes sense it is here."""

    name: str
    column: str  # the label file's column that says a table is of this kind
    primary: str  # the metric rows are ranked by first
    interval: tuple[str, str]  # the columns of the primary metric's 95 % interval (low, high)
    core_columns: tuple[str, ...]  # what ``score`` computes: the primary metric, its interval, chance
    default_heads: tuple[str, ...]
    estimator_type: str = "classifier"  # what a user's module:Class head must be (scikit-learn's word)
    single_label: bool = False  # one class per image: confusion matrices, per-class reports, label issues apply
    fewshot: bool = False  # whether few-shot curves (k examples per class) apply

    def parse(self, cells: Sequence[str], where: Sequence[str]) -> np.ndarray:
        """Label cells as the kind's values; ``where[i]`` names the cell (``file:line``) for errors."""
        raise NotImplementedError

    def values(self, values: Sequence) -> np.ndarray:
        """Parsed label values (``parse``'s elements, gathered one by one) as one array of the kind's form."""
        y = np.empty(len(values), dtype=object)
        y[:] = list(values)
        return y

    def format(self, y: np.ndarray) -> list[str]:
        """Values back to label cells (``parse`` reads them again)."""
        raise NotImplementedError

    def names(self, y: np.ndarray) -> list[str]:
        """The classes or tags a model of these labels predicts over, sorted (none for regression)."""
        raise NotImplementedError

    def check(self, y: np.ndarray, task: str, n_folds: int | None) -> None:
        """Raise when ``y`` cannot be evaluated (too few classes or rows, a class smaller than the folds)."""
        raise NotImplementedError

    def folds(self, y: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
        """The fold each row is scored in, for cross-validation; rows with the same ``groups`` label in one."""
        raise NotImplementedError

    def subsplit(self, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Row indices (kept, held) with ``fraction`` held out, or None when ``y`` is too small to split."""
        raise NotImplementedError

    def target(self, y: np.ndarray, names: list[str]) -> np.ndarray:
        """What a scikit-learn head fits on."""
        raise NotImplementedError

    def predict(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        """A fitted head's predictions of ``X``, in the kind's form."""
        raise NotImplementedError

    def scores(self, estimator, X: np.ndarray, names: list[str]) -> np.ndarray:
        """What ``predict`` reports of a fitted head (class probabilities, tag probabilities, numbers), and
        what a metric that ``needs="scores"`` reads; by default the predictions themselves."""
        return self.predict(estimator, X, names)

    def predict_scored(self, estimator, X: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict`` and, where a metric reads them (``needs_scores``), ``scores`` of a fitted head, from one
        pass of the head over ``X`` where the kind's scores are its predictions (a knn head's search is
        most of its time); a kind with scores of its own gets them from ``scores``."""
        y_pred = self.predict(estimator, X, names)
        if not self.needs_scores:
            return y_pred, None
        return y_pred, y_pred if type(self).scores is TaskKind.scores else self.scores(estimator, X, names)

    def score(self, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray, names: list[str]) -> dict:
        """The ``core_columns`` of a row, its ``chance`` (what its own predictions score when shuffled among
        the scored images of each fold) and ``p_above_chance``, the one-sided p-value that the row beats it."""
        raise NotImplementedError

    @property
    def set_aside_columns(self) -> tuple[str, str]:
        """The primary metric without the scored samples a protocol sets aside (near-copies of training
        images, suspected label errors), and how many it set aside."""
        return f"{self.primary}_clean", "n_set_aside"

    @property
    def columns(self) -> tuple[str, ...]:
        """The metric columns of a leaderboard row, in order: the core ones, the primary metric without the
        samples set aside, then the registered metrics."""
        return (*self.core_columns, *self.set_aside_columns, *(m.name for m in metrics_of(self.name)))

    @property
    def needs_scores(self) -> bool:
        """Whether a registered metric reads scores (``scores``), which stages then pass beside predictions."""
        return any(m.needs == "scores" for m in metrics_of(self.name))

    def evaluate(self, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray, names: list[str],
                 scores: np.ndarray | None = None) -> dict:
        """Every metric column of a row (``score`` and the registered metrics) and ``p_above_chance``."""
        core = self.score(y_true, y_pred, folds, names)
        p_above_chance = core.pop("p_above_chance")
        extra = {m.name: m(y_true, y_pred, scores, names) for m in metrics_of(self.name)}
        return {**core, **extra, "p_above_chance": p_above_chance}

    def primary_score(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> float:
        """The ``primary`` metric alone (a fine-tune's epoch is chosen by it)."""
        raise NotImplementedError

    def p_same(self, y_true: np.ndarray, mine: np.ndarray, best: np.ndarray, names: list[str]) -> float:
        """Two-sided p-value that two rows' predictions of the same samples are equally good."""
        raise NotImplementedError

    def rank_key(self, metrics: dict, fit_seconds: float | None) -> tuple:
        """A row's rank among a task's rows, higher is better: by default the primary metric, then the
        faster fit."""
        return (metrics[self.primary], -(fit_seconds or 0.0))

    def format_predictions(self, y_pred: np.ndarray, names: list[str]) -> list[str]:
        """Predictions as text cells (a run's ``*.predictions.csv``); ``parse_predictions`` reads them."""
        raise NotImplementedError

    def parse_predictions(self, cells: Sequence[str], names: list[str]) -> np.ndarray:
        raise NotImplementedError

    def prediction(self, names: list[str], scores: np.ndarray) -> list:
        """The prediction each row of ``scores`` makes (a class, the tags at or above 0.5, a number)."""
        raise NotImplementedError

    def predict_columns(self, names: list[str], scores: np.ndarray) -> list[dict]:
        """``predict``'s columns for each row of ``scores``: ``prediction`` first, then any scores."""
        raise NotImplementedError

    # fine-tuning: the network's last layer has ``outputs(names)`` units trained with ``loss``
    def outputs(self, names: list[str]) -> int:
        raise NotImplementedError

    def loss(self, logits, target, scale: float, label_smoothing: float = 0.0):
        """The training loss of a batch (torch tensors); ``scale`` is ``loss_scale`` of the training labels."""
        raise NotImplementedError

    def loss_scale(self, y: np.ndarray) -> float:
        return 1.0

    def targets(self, y: Sequence, names: list[str]):
        """A batch's labels as the tensor ``loss`` compares the logits with."""
        raise NotImplementedError

    def from_logits(self, logits: np.ndarray, names: list[str]) -> np.ndarray:
        """The network's outputs as predictions in the kind's form."""
        raise NotImplementedError

    def logit_scores(self, logits: np.ndarray) -> np.ndarray:
        """The network's outputs as what ``predict`` reports (``scores``' form)."""
        raise NotImplementedError

    def initial_bias(self, y: np.ndarray, names: list[str]) -> np.ndarray | None:
        """The bias a fresh last layer starts with (None: zeros)."""
        return None

    def linear_start(self, head, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """A fitted linear head (a scaler then a linear model) as last-layer weights on raw features."""
        raise NotImplementedError

    def output_rows(self, W: np.ndarray, b: np.ndarray, classes: Sequence, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """A fitted head's last layer (rows in its ``classes`` order) as this kind's output units in ``names``
        order: what an exported model computes its logits with."""
        raise NotImplementedError

    def torch_scores(self, logits):
        """``logit_scores`` as a torch operation, inside an exported model's graph."""
        raise NotImplementedError

    scores_meaning: str = ""  # what ``scores`` are, for people reading an exported model's card

    def other_columns(self) -> tuple[str, ...]:
        """The metric columns beside the primary metric and its interval, in order."""
        return tuple(c for c in self.columns if c not in (self.primary, *self.interval))

    def breakdown(self, y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> Breakdown:
        """A row's predictions of ``y_true`` scored part by part (``pipeline report --row``), where its one
        score can hide a part it fails: by class, by tag, by range of the target
        (:class:`~pipeline.kinds.parts.scoring.Breakdown`)."""
        raise NotImplementedError


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: register a task kind under its ``name``."""
    _KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> TaskKind:
    if name not in _KINDS:
        raise unknown("task kind", name, _KINDS)
    return _KINDS[name]


def list_kinds() -> dict[str, TaskKind]:
    return dict(_KINDS)


def kind_of_columns(columns: Sequence[str], where: str) -> TaskKind:
    """The kind a label table's header names (``label`` -> classification, ...)."""
    found = [k for k in _KINDS.values() if k.column in columns]
    if not found:
        names = " or ".join(f"id,{k.column}[,split][,group] ({k.name})" for k in _KINDS.values())
        raise PipelineError(f"{where}: missing column(s) {' or '.join(k.column for k in _KINDS.values())}; "
                            f"a label file is {names}")
    if len(found) > 1:
        raise PipelineError(f"{where}: columns {', '.join(k.column for k in found)} name different task kinds; keep one")
    return found[0]


from . import classification, multilabel, regression  # noqa: E402,F401,I001  (registers the built-in kinds)
from . import auroc  # noqa: E402,F401  (metrics beside the kinds' own)
