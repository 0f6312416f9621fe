"""The predict stage: a saved model (a run's best row, one saved head, or a fine-tuned model folder) on
new images, one row per image with the prediction and its scores.

Every feature goes through the feature spec the model was trained on (weights, preprocessing, autocast,
test-time augmentation, decoding): images already in the cache it was fit on (same bytes, same spec)
are read from there, the others run through a backbone built from that spec, so both give the same
prediction. :class:`LoadedModel` holds a model's backbones and head once loaded: ``predict`` makes one per
call, the service (:mod:`pipeline.serve`) keeps one for every request.

A model from a fit run folder also says when it does not know: with a ``coverage``, each image's
``prediction_set`` (or ``prediction_low``/``prediction_high`` for numbers), calibrated on the row's
out-of-sample predictions (:mod:`pipeline.conformal`); always, its ``ood_score``, the percentile of its
distance to the nearest training image among the training images' own (:mod:`pipeline.ood`), and ``ood``,
whether that is above ``ood_percentile``.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..batches import default_workers
from ..cache import FeatureCache
from ..conformal import Calibration, calibrate
from ..data import Sample, list_images
from ..errors import PipelineError
from ..evaluation import HeadCard, Protocol, Row, RunFolder
from ..featurizer import Featurizer, Part, part_features
from ..files import atomic_path
from ..heads import read_head
from ..kinds import get_kind
from ..modeldir import MODEL_FILE, is_model_dir, read_config
from ..ood import Reference, reference_name
from ..spec import FeatureSpec
from ..validation import at_least, between, check, optional, validate_params


@dataclass
class Model:
    """What predict runs: the parts whose features it concatenates, then a scikit-learn head, or (for a
    fine-tuned network, ``head_path`` None) its own classifier's logits; ``row`` and ``protocol``: the
    leaderboard row it is and its task's protocol, when it was chosen from a run folder."""

    classes: list[str]
    parts: list[Part]
    task_kind: str = "classification"
    head_path: Path | None = None
    extra_weights: list[Path] = field(default_factory=list)  # a model folder's own weights file
    row: Row | None = None
    protocol: Protocol | None = None
    run: RunFolder | None = None


def resolve_model(model: str | os.PathLike, task: str | None = None, row: int | None = None) -> Model:
    """A fit run folder (its best row, of ``task`` if given, or its leaderboard row ``row``, counted from 1
    as in ``leaderboard.md``), a ``.skops`` head, or a fine-tuned model folder."""
    path = Path(model)
    run = RunFolder(path)
    if path.is_dir() and run.exists:
        chosen = run.best_row(task) if row is None else _numbered_row(run, row, task)
        found = run.resolve(chosen.head_file)
        if not found.exists():
            raise PipelineError(f"{path}: its row for task {chosen.task!r} ({chosen.head}) is at {chosen.head_file}, "
                                f"relative to the run, and {found} does not exist; copy it along with the run")
        return replace(resolve_model(found), row=chosen, protocol=run.protocol(chosen.task), run=run)
    if row is not None:
        raise PipelineError(f"--row picks a row of a fit run folder, and {path} is not one")
    if path.is_dir() and is_model_dir(path):
        cfg = read_config(path)
        weights = path / MODEL_FILE
        spec = FeatureSpec.from_dict(cfg["feature_spec"])
        return Model(cfg["classes"], [Part(spec, "logits", str(weights.resolve()))], cfg.get("task_kind", "classification"),
                     extra_weights=[weights])
    if path.suffix == ".skops" and path.is_file():
        card = HeadCard.read(path)
        parts = [Part(p.spec, card.tap, p.weights_source, p.caches(path.parent)) for p in card.parts]
        return Model(card.classes, parts, card.task_kind, path)
    raise PipelineError(
        f"cannot use {path} as a model: give a fit run folder (with leaderboard.json), a .skops head, "
        "or a fine-tuned model folder (with model.safetensors and config.json)"
    )


def load_head(path: str | os.PathLike):
    """A saved ``.skops`` head, ready to predict from features: read with skops against the trusted types,
    a knn head given back its training features from the cache its card names (see
    :meth:`pipeline.heads._CappedNeighbours.without_rows`)."""
    head = read_head(path)
    if getattr(head, "needs_rows", False):
        _give_rows(head, resolve_model(path).parts)
    return head


def _give_rows(head, parts: list[Part]) -> None:
    """Give a knn head saved without its training features those of ``parts``' caches."""
    try:
        head.with_rows(np.hstack([_training_features(p, head.training_ids_) for p in parts]))
    except PipelineError as e:
        raise PipelineError(f"{e}; this knn head reads its training features from it (a head fit with "
                            "--portable carries them)") from None


def _numbered_row(run: RunFolder, row: int, task: str | None) -> Row:
    rows = run.rows()
    check(dict(row=row), dict(row=between(1, len(rows))))  # the run's rows, counted from 1
    chosen = rows[row - 1]
    if task is not None and chosen.task != task:
        raise PipelineError(f"row {row} of {run.path} is of task {chosen.task!r}, not {task!r}; give --row or --task")
    if not chosen.head_file:
        raise PipelineError(f"row {row} of {run.path} ({chosen.head} on {chosen.task}) has no saved model: "
                            f"{chosen.error or 'it was not scored'}")
    return chosen


class LoadedModel:
    """A model resolved and its head loaded once, its backbones loaded on first need and kept, to predict
    batch after batch: ``predict`` makes one per call, the service one for all its requests. With
    ``from_cache``, images whose bytes are in the cache the head was fit on (same spec) are read from
    there; the service computes every image instead, so it needs no cache (and none being written).

    A model from a run folder adds ``prediction_set`` (or ``prediction_low``, ``prediction_high``) when
    given a ``coverage``, and ``ood_score``, ``ood`` (see the module docstring); the training features
    those search are read from the cache once, on first need, and kept."""

    @validate_params(dict(coverage=optional(between(0, 1, low_open=True, high_open=True)),
                          ood_percentile=between(0, 100)))
    def __init__(self, model: str | os.PathLike, task: str | None = None, row: int | None = None,
                 weights: Sequence[str | os.PathLike] = (), device: str = "auto", from_cache: bool = True,
                 coverage: float | None = None, ood_percentile: float = 99.0):
        self.model = resolve_model(model, task, row)
        self.kind = get_kind(self.model.task_kind)
        self.weights = [*self.model.extra_weights, *map(Path, weights)]
        self.device, self.from_cache = device, from_cache
        self._featurizers: dict[int, Featurizer] = {}
        # the scikit-learn head; None for a fine-tuned network, whose logits are the scores
        self.head = None if self.model.head_path is None else read_head(self.model.head_path)
        if getattr(self.head, "needs_rows", False):
            _give_rows(self.head, self.model.parts)
        self.calibration = None if coverage is None else self._calibrate(coverage)
        self.ood_percentile = ood_percentile
        self._ood: tuple[Reference, np.ndarray] | None = None
        self.ood_note = "" if self.model.run is not None else "ood scores need a fit run folder as the model"

    def _calibrate(self, coverage: float) -> Calibration:
        m = self.model
        if m.run is None:
            raise PipelineError("--coverage calibrates on a fit run's out-of-sample predictions: give the run "
                                "folder as the model, not one of its heads or a model folder")
        return calibrate(m.run, m.row, coverage)

    def describe(self) -> dict:
        """What the model is, as JSON: its row and protocol (from a run folder), classes, head and feature specs."""
        m, protocol = self.model, self.model.protocol
        return dict(
            task_kind=m.task_kind, classes=m.classes, head=None if m.head_path is None else str(m.head_path),
            row=None if m.row is None else m.row.to_dict(),
            protocol=None if protocol is None else dict(
                id=protocol.id, task=protocol.task, eval=protocol.eval, seed=protocol.seed, images=len(protocol.ids),
                scored=len(protocol.scored), description=protocol.describe()),
            feature_specs=[dict(key=p.spec.key, tap=p.tap, description=p.spec.describe(), spec=p.spec.to_dict())
                           for p in m.parts],
            calibration=None if self.calibration is None else vars(self.calibration),
            ood=dict(percentile=self.ood_percentile, note=self.ood_note))

    def load(self) -> "LoadedModel":
        """Load every backbone, and the training features ``ood_score`` searches, now (a service pays for
        them at start, not on its first request)."""
        for k in range(len(self.model.parts)):
            self.featurizer(k)
        self.ood_reference()
        return self

    def ood_reference(self) -> tuple[Reference, np.ndarray] | None:
        """The run's out-of-distribution reference for this model and the training features it was made
        of, read once; None (and ``ood_note`` says why) when the run or the cache does not have them."""
        if self._ood is None and not self.ood_note:
            try:
                self._ood = self._read_ood()
            except PipelineError as e:
                self.ood_note = str(e)
        return self._ood

    def _read_ood(self) -> tuple[Reference, np.ndarray]:
        m = self.model
        if not all(p.caches for p in m.parts):
            raise PipelineError("a fine-tuned network's features are in no cache to compare with")
        path = m.run.ood_path(reference_name([p.caches[0] for p in m.parts], m.parts[0].tap, m.row.task))
        if not path.is_file():
            raise PipelineError(f"the run has no out-of-distribution reference ({path.name}): it was fit before "
                                "they were saved")
        reference = Reference.load(path)
        if reference.protocol != m.protocol.id:
            raise PipelineError(f"{path.name} is of another protocol than the task's; fit it again")
        ids = m.protocol.ids[m.protocol.refit()] if reference.ids is None else np.asarray(reference.ids, dtype=object)
        if np.array_equal(getattr(self.head, "training_ids_", ()), ids):  # a knn head read these very rows
            return reference, self.head._fit_X
        return reference, np.hstack([_training_features(p, ids) for p in m.parts])

    def featurizer(self, k: int) -> Featurizer:
        """The backbone of part ``k``, loaded through its spec."""
        if k not in self._featurizers:
            part = self.model.parts[k]
            self._featurizers[k] = Featurizer.load(part.spec, self.weights, part.weights_source, self.device)
        return self._featurizers[k]

    def features(self, samples: Sequence[Sample], batch_size: int = 32, workers: int = 0,
                 progress: bool = False) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Each readable sample's features (by index; a head on concatenated backbones: theirs side by side),
        and the reason for each sample that could not be read."""
        feats, errors = None, {}
        for k, part in enumerate(self.model.parts):
            got, failed = part_features(part, list(samples), functools.partial(self.featurizer, k), batch_size, workers,
                                        progress, self.from_cache)
            errors.update(failed)
            feats = got if feats is None else {i: np.concatenate([feats[i], got[i]]) for i in feats if i in got}
        return feats, errors

    def scores(self, X: np.ndarray) -> np.ndarray:
        """What the task kind reports: class or tag probabilities (columns in ``classes`` order), or numbers."""
        if self.head is None:
            return self.kind.logit_scores(X)
        return self.kind.scores(self.head, X, self.model.classes)

    def columns(self, X: np.ndarray) -> list[dict]:
        """Each feature row's columns: the kind's (``prediction`` and scores), then the prediction set and
        the ood columns where the model has them."""
        scores = self.scores(X)
        rows = self.kind.predict_columns(self.model.classes, scores)
        if self.calibration is not None:
            for row, extra in zip(rows, self.calibration.columns(self.model.classes, scores)):
                row.update(extra)
        if self.model.run is not None:
            for row, extra in zip(rows, self._ood_columns(X)):
                row.update(extra)
        return rows

    def _ood_columns(self, X: np.ndarray) -> list[dict]:
        found = self.ood_reference()
        if found is None:
            return [dict(ood_score="", ood="")] * len(X)
        reference, X_train = found
        return [dict(ood_score=round(float(p), 1), ood=bool(p > self.ood_percentile))
                for p in reference.scores(X, X_train)]

    def blank(self) -> dict:
        """The columns of a sample that could not be read, empty."""
        names = ["prediction", *(f"prob_{c}" for c in self.model.classes)]
        names += list(Calibration.blank(self.model.task_kind)) if self.calibration is not None else []
        names += ["ood_score", "ood"] if self.model.run is not None else []
        return dict.fromkeys(names, "")

    def predict(self, samples: Sequence[Sample], batch_size: int = 32, workers: int = 0,
                progress: bool = False) -> list[dict]:
        """One row per sample: ``path`` (the sample's id), ``prediction``, ``error`` and the columns of
        ``columns``."""
        feats, errors = self.features(samples, batch_size, workers, progress)
        ok = sorted(feats)
        columns = dict(zip(ok, self.columns(np.stack([feats[i] for i in ok])))) if ok else {}
        blank = self.blank()
        return [{"path": s.id, "prediction": "", "error": errors.get(i, ""), **blank, **columns.get(i, {})}
                for i, s in enumerate(samples)]


def _training_features(part: Part, ids: np.ndarray) -> np.ndarray:
    """The features of ``ids`` that ``part`` reads, from the first of its caches that is there."""
    path = next((c for c in part.caches if c.is_file()), None)
    if path is None:
        raise PipelineError(f"the cache the head was fit on is not reachable (looked in {', '.join(map(str, part.caches))})")
    with FeatureCache(path) as cache:
        if cache.spec != part.spec or part.tap not in cache.taps:
            raise PipelineError(f"{path} is not the cache the head was fit on (another feature spec or no tap {part.tap!r})")
        return cache.features(part.tap, cache.rows_of(ids))


class Predictions(list):
    """``predict``'s rows (a list of dicts), with ``summary``: what the model said about them as a whole."""

    def __init__(self, rows: list[dict], loaded: LoadedModel):
        super().__init__(rows)
        self.summary: list[str] = []
        if loaded.calibration is not None:
            c = loaded.calibration
            self.summary.append(f"prediction sets for {c.coverage * 100:g}% coverage, calibrated on {c.n} "
                                f"out-of-sample predictions (threshold {c.threshold:.4g})")
            if math.isinf(c.threshold):
                self.summary.append(f"coverage {c.coverage:g} needs at least {math.ceil(c.coverage / (1 - c.coverage))} "
                                    f"calibration predictions and the run has {c.n}: every set holds everything")
        if loaded.model.run is not None:
            flagged = [r["ood"] for r in rows if r["ood"] != ""]
            self.summary.append(f"{sum(flagged)} of {len(flagged)} images are unlike the training data (ood)"
                                if not loaded.ood_note else f"ood columns are empty: {loaded.ood_note}")


@validate_params(dict(batch_size=at_least(1), workers=optional(at_least(0))))
def predict(model: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
            task: str | None = None, weights: Sequence[str | os.PathLike] = (), batch_size: int = 32,
            workers: int | None = None, device: str = "auto", progress: bool = True, coverage: float | None = None,
            ood_percentile: float = 99.0, row: int | None = None) -> Predictions:
    """Predict every image (files or folders) in ``images``: one dict per image with ``path``,
    ``prediction``, ``error`` and the task kind's score columns, then (a run folder's model) the
    ``coverage`` prediction set and the ood columns (see :class:`LoadedModel`). ``row``: a run folder's
    leaderboard row (counted from 1, as in leaderboard.md) instead of its best, as ``export`` and
    ``serve`` take it. ``weights`` are weights files to use when those the model was trained with are
    not where they were (each is matched by its sha256)."""
    paths = list_images(list(images))  # before the model loads: a missing file is said at once
    if not paths:
        raise PipelineError("no images to predict on")
    if out is not None and (Path(out).is_dir() or str(out).endswith(("/", os.sep))):
        raise PipelineError(f"--out must be a CSV file to write, got the folder {out}")
    loaded = LoadedModel(model, task, row, weights=weights, device=device, coverage=coverage,
                         ood_percentile=ood_percentile)
    rows = Predictions(loaded.predict([Sample(str(p), p) for p in paths], batch_size,
                                      default_workers() if workers is None else workers, progress), loaded)
    if out is not None:
        with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows
