"""The predict stage: a saved model (a run's best row, one saved head, or a fine-tuned model folder) on
new images, one row per image with the prediction and its scores.

Every feature goes through the feature spec the model was trained on (weights, preprocessing, autocast,
test-time augmentation, decoding): images already in the cache it was fit on (same bytes, same spec)
are read from there, the others run through a backbone built from that spec, so both give the same
prediction.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .batches import default_workers
from .data import Sample, list_images
from .errors import PipelineError
from .featurizer import Part, part_features
from .files import atomic_path
from .heads import load_head
from .kinds import get_kind
from .modeldir import MODEL_FILE, is_model_dir, read_config
from .runs import RunFolder
from .spec import FeatureSpec
from .validation import at_least, check, optional


@dataclass
class Model:
    """What predict runs: the parts whose features it concatenates, then a scikit-learn head, or (for a
    fine-tuned network, ``head_path`` None) its own classifier's logits."""

    classes: list[str]
    parts: list[Part]
    task_kind: str = "classification"
    head_path: Path | None = None
    extra_weights: list[Path] = field(default_factory=list)  # a model folder's own weights file


def resolve_model(model: str | os.PathLike, task: str | None = None) -> Model:
    """A fit run folder (its best row, of ``task`` if given), a ``.skops`` head, or a fine-tuned model folder."""
    path = Path(model)
    run = RunFolder(path)
    if path.is_dir() and run.exists:
        best = run.best_row(task)
        found = run.resolve(best.head_file)
        if not found.exists():
            raise PipelineError(f"{path}: its best row for task {best.task!r} ({best.head}) is at {best.head_file}, "
                                f"relative to the run, and {found} does not exist; copy it along with the run")
        return resolve_model(found)
    if path.is_dir() and is_model_dir(path):
        cfg = read_config(path)
        weights = path / MODEL_FILE
        spec = FeatureSpec.from_dict(cfg["feature_spec"])
        return Model(cfg["classes"], [Part(spec, "logits", str(weights.resolve()))], cfg.get("task_kind", "classification"),
                     extra_weights=[weights])
    if path.suffix == ".skops" and path.is_file():
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            raise PipelineError(f"{path} has no {card_path.name} beside it naming its feature specs")
        card = json.loads(card_path.read_text())
        parts = [Part(FeatureSpec.from_dict(p["spec"]), card["tap"], p.get("weights_source", ""),
                      [path.parent / p["cache"], Path(p["cache_abs"])]) for p in card["parts"]]
        return Model(card["classes"], parts, card.get("task_kind", "classification"), path)
    raise PipelineError(
        f"cannot use {path} as a model: give a fit run folder (with leaderboard.json), a .skops head, "
        "or a fine-tuned model folder (with model.safetensors and config.json)"
    )


def predict(model: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
            task: str | None = None, weights: Sequence[str | os.PathLike] = (), batch_size: int = 32,
            workers: int | None = None, device: str = "auto", progress: bool = True) -> list[dict]:
    """Predict every image (files or folders) in ``images``: one dict per image with ``path``,
    ``prediction``, ``error`` and the task kind's score columns. ``weights`` are weights files to use
    when those the model was trained with are not where they were (each is matched by its sha256)."""
    check(dict(batch_size=batch_size, workers=workers), dict(batch_size=at_least(1), workers=optional(at_least(0))))
    m = resolve_model(model, task)
    paths = list_images(list(images))
    if not paths:
        raise PipelineError("no images to predict on")
    samples = [Sample(str(p), p) for p in paths]
    workers = default_workers() if workers is None else workers
    feats, errors = None, {}
    for part in m.parts:  # a head on concatenated backbones: their features side by side
        got, failed = part_features(part, samples, [*m.extra_weights, *map(Path, weights)], batch_size, workers, device, progress)
        errors.update(failed)
        feats = got if feats is None else {i: np.concatenate([feats[i], got[i]]) for i in feats if i in got}
    ok = sorted(feats)
    kind = get_kind(m.task_kind)
    scores = _scores(m, np.stack([feats[i] for i in ok])) if ok else np.zeros((0, len(m.classes)))
    columns = dict(zip(ok, kind.predict_columns(m.classes, scores)))
    blank = dict.fromkeys(["prediction", *(f"prob_{c}" for c in m.classes)], "")
    rows = [{"path": str(s.path), "prediction": "", "error": errors.get(i, ""), **blank, **columns.get(i, {})}
            for i, s in enumerate(samples)]
    if out is not None:
        with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


def _scores(m: Model, X: np.ndarray) -> np.ndarray:
    """What the task kind reports: class or tag probabilities (columns in ``m.classes`` order), or numbers."""
    kind = get_kind(m.task_kind)
    if m.head_path is None:
        return kind.logit_scores(X)
    return kind.scores(load_head(m.head_path), X, m.classes)
