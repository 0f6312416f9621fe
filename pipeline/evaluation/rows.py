"""A leaderboard row: one model of one task, scored under the task's protocol. ``score_row`` is the one
place a row gets its scores; ``best_row`` the one place a row is picked (``predict RUN``, lp-ft's start);
``clean_ranking`` says whether a task's ranking holds without the scored images its protocol sets aside."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import numpy as np
from scipy.stats import kendalltau

from ..kinds import get_kind
from .protocol import Protocol


@dataclass
class Row:
    """One leaderboard row: a model of one task scored under a protocol.

    ``stage`` is ``fit`` (a scikit-learn head on cached features) or ``finetune`` (a fine-tuned network);
    ``head_file`` is the head, or the fine-tuned model's folder, relative to the run folder; ``metrics``
    are the task kind's columns (``accuracy``, ``acc_low``, ... for classification); ``protocol`` is the
    id of the protocol the row was scored under, and ``comparable`` says whether it is the task's;
    ``spec`` is the key of the feature spec the features came through (``+``-joined when concatenated);
    ``rank_clean`` is the row's rank (1: best) among its task's by the primary metric without the scored
    images the protocol sets aside (``<primary>_clean``), when it has that score.
    """

    backbone: str
    weights: str
    tap: str
    task: str
    head: str
    eval: str
    spec: str = ""
    protocol: str = ""
    stage: str = "fit"
    task_kind: str = "classification"
    n_train: int | None = None
    n_test: int | None = None
    metrics: dict = field(default_factory=dict)
    fit_seconds: float | None = None
    p_vs_best: float | None = None
    same_as_best: bool | None = None
    p_above_chance: float | None = None
    above_chance: bool | None = None
    rank_clean: int | None = None
    comparable: bool = True
    head_file: str = ""
    predictions: str = ""
    cache: str = ""
    error: str = ""  # why the row has no score
    warnings: str = ""  # what the fit warned of (a solver that did not converge, ...), the row scored

    @property
    def key(self) -> tuple:
        """What a re-run replaces: the same model of the same task on the same features (a fine-tune: the
        same model folder)."""
        return (self.stage, self.backbone, self.spec, self.tap, self.task, self.head,
                self.head_file if self.stage == "finetune" else "")

    @property
    def scored(self) -> bool:
        return bool(self.metrics) and self.metrics.get(get_kind(self.task_kind).primary) is not None

    @property
    def score(self) -> float | None:
        """The kind's primary metric (accuracy for classification)."""
        return self.metrics.get(get_kind(self.task_kind).primary)

    @property
    def clean_score(self) -> float | None:
        """The primary metric without the scored images the protocol set aside (None: none were checked)."""
        return self.metrics.get(get_kind(self.task_kind).set_aside_columns[0])

    def rank_key(self) -> tuple:
        return get_kind(self.task_kind).rank_key(self.metrics, self.fit_seconds)

    def to_dict(self) -> dict:
        """Flat: the metrics are columns beside the others, as in the CSV."""
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "metrics"}, **d["metrics"]}

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}, metrics={k: v for k, v in d.items() if k not in names})


def score_row(protocol: Protocol, y_pred: np.ndarray | None, scores: np.ndarray | None = None, **identity) -> Row:
    """The row of a model of ``protocol``'s task with ``identity`` (backbone, head, files, ...), scored on
    its predictions of the protocol's scored samples (``scored`` order; ``scores`` for the metrics that
    rank, where the model gives them): the kind's metrics and chance, ``p_above_chance``, ``n_train``
    (unless ``identity`` says otherwise), ``n_test``, and the clean score with ``n_set_aside`` when the
    protocol sets samples aside (``Protocol.set_aside``). Unscored when ``y_pred`` is None (the model could
    not be fitted: ``identity`` holds the ``error``)."""
    row = Row(task=protocol.task, eval=protocol.eval, protocol=protocol.id, task_kind=protocol.kind, **identity)
    if y_pred is not None:
        metrics = protocol.score(y_pred, scores)
        n_train, row.n_test = metrics.pop("n_train"), metrics.pop("n_test")
        row.n_train = n_train if row.n_train is None else row.n_train
        row.p_above_chance, row.metrics = metrics.pop("p_above_chance"), metrics
    return row


def columns(kinds: Sequence[str]) -> list[str]:
    """The leaderboard's columns: identity, the kinds' metric columns, tests, files."""
    metric_cols = list(dict.fromkeys(c for k in kinds for c in get_kind(k).columns))
    return ["backbone", "weights", "spec", "tap", "task", "head", "eval", "n_train", "n_test", *metric_cols,
            "p_vs_best", "same_as_best", "p_above_chance", "above_chance", "rank_clean", "fit_seconds", "comparable",
            "protocol", "stage", "task_kind", "head_file", "predictions", "cache", "error", "warnings"]


def best_row(rows: Sequence[Row], task: str | None = None, linear: bool = False, backbone: str | None = None,
             weights: str | None = None) -> Row | None:
    """The best row that is scored under its task's protocol and has a model, optionally of ``task``, of
    a linear head, of ``backbone``, of ``weights``. Rows are kept best first within each task, so it is
    the first that matches."""
    from ..heads import is_linear

    return next((r for r in rows if r.comparable and r.scored and r.head_file
                 and (task is None or r.task == task) and (backbone is None or r.backbone == backbone)
                 and (weights is None or r.weights == weights) and (not linear or is_linear(r.head, r.task_kind))), None)


def clean_ranking(rows: Sequence[Row]) -> dict[str, str]:
    """Per task with two or more ranked rows that have a clean score, a line saying whether its ranking
    holds without the scored images set aside (leaked near-copies, suspected label errors): whether the
    best row stays best, and Kendall's tau between the ranking and the clean one. ``rows`` are best first
    within each task, as ``rank_and_test`` leaves them."""
    lines = {}
    for task in dict.fromkeys(r.task for r in rows):
        ranked = [r for r in rows if r.task == task and r.comparable and r.rank_clean is not None]
        if len(ranked) < 2 or not any(r.metrics.get(get_kind(r.task_kind).set_aside_columns[1]) for r in ranked):
            continue  # nothing set aside: the clean ranking is the ranking
        tau = kendalltau(np.arange(len(ranked)), [r.rank_clean for r in ranked]).statistic
        n_aside = "/".join(map(str, sorted({r.metrics[get_kind(r.task_kind).set_aside_columns[1]] for r in ranked})))
        lines[task] = (f"task {task!r} without its {n_aside} set-aside images: best row unchanged: "
                       f"{'yes' if ranked[0].rank_clean == 1 else 'no'}; Kendall tau {tau:.2f} over {len(ranked)} rows")
    return lines
