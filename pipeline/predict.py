"""The predict stage: a saved model (a fit run's best head, one saved head, or a fine-tuned network) on
new images, one row per image with the predicted label and class probabilities.

For a head, features of images already in the cache it was fit on (same bytes) are read from there;
only the others go through the backbone.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.special import softmax

from .backbones import Backbone, load_backbone
from .cache import FeatureCache
from .data import Sample, content_hash, list_images
from .errors import PipelineError
from .extract import default_workers, forward_batches
from .finetune import MODEL_FILE, read_checkpoint_config
from .files import atomic_path
from .fit import best_row
from .heads import load_head
from .report import read_leaderboard


@dataclass
class Model:
    """What predict runs: a backbone reference and either a scikit-learn head or the network's own classifier."""

    kind: str  # "head" or "finetuned"
    backbone: str
    weights: str | None
    weights_sha256: str | None
    classes: list[str]
    tap: str = "pooled"
    head_path: Path | None = None
    cache: Path | None = None
    parts: list["Model"] = field(default_factory=list)  # a head on concatenated backbones: one per backbone


def resolve_model(model: str | os.PathLike, task: str | None = None) -> Model:
    """A fit run directory (its best row, of ``task`` if given), a ``.skops`` head, or a fine-tuned model dir."""
    path = Path(model)
    if path.is_dir() and (path / "leaderboard.json").is_file():
        rows = read_leaderboard(path)
        task = task or (rows[0]["task"] if rows else None)
        best = best_row(rows, task=task)
        if best is None:
            raise PipelineError(f"{path}: no fitted head for task {task!r} in its leaderboard")
        return resolve_model(best["head_file"])
    if path.is_dir() and (path / MODEL_FILE).is_file():
        cfg = read_checkpoint_config(path)
        return Model("finetuned", cfg["backbone"], str(path / MODEL_FILE), None, cfg["classes"], "logits")
    if path.suffix == ".skops" and path.is_file():
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            raise PipelineError(f"{path} has no {card_path.name} beside it naming its backbone")
        card = json.loads(card_path.read_text())
        parts = [_feature_source(part, card["tap"]) for part in card["parts"]]
        if len(parts) == 1:
            return Model(**{**parts[0].__dict__, "kind": "head", "classes": card["classes"], "head_path": path})
        return Model("head", card["backbone"], None, None, card["classes"], card["tap"], path, parts=parts)
    raise PipelineError(
        f"cannot use {path} as a model: give a fit run directory (with leaderboard.json), a .skops head, "
        "or a fine-tuned model directory (with model.safetensors)"
    )


def _feature_source(part: dict, tap: str) -> Model:
    """One backbone a head needs features from, as its card names it."""
    source = part.get("weights_source", "")
    weights = source if source and not source.startswith("hub:") and Path(source).is_file() else None
    return Model("features", part["backbone"], weights, part["weights_sha256"], [], tap,
                 cache=Path(part["cache"]) if part.get("cache") else None)


def predict(
    model: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    task: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> list[dict]:
    """Predict a label and class probabilities for every image (files or folders) in ``images``."""
    m = resolve_model(model, task)
    paths = list_images(list(images))
    if not paths:
        raise PipelineError("no images to predict on")
    samples = [Sample(str(p), p) for p in paths]
    first, *more = m.parts or [m]
    feats, errors = _features(first, samples, batch_size, workers, device, progress)
    for part in more:  # a head on concatenated backbones: their features side by side
        got, failed = _features(part, samples, batch_size, workers, device, progress)
        errors.update(failed)
        feats = {i: np.concatenate([feats[i], got[i]]) for i in feats if i in got}
    ok = sorted(feats)
    probs = _probabilities(m, np.stack([feats[i] for i in ok])) if ok else np.zeros((0, len(m.classes)))
    rows = []
    by_index = dict(zip(ok, probs))
    for i, s in enumerate(samples):
        row = {"path": str(s.path), "prediction": "", "error": errors.get(i, "")}
        p = by_index.get(i)
        if p is not None:
            row["prediction"] = m.classes[int(np.argmax(p))]
        row.update({f"prob_{c}": (float(p[k]) if p is not None else "") for k, c in enumerate(m.classes)})
        rows.append(row)
    if out is not None:
        with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


def _features(m: Model, samples: list[Sample], batch_size: int, workers: int | None, device: str,
              progress: bool) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Features of ``m``'s backbone and tap for each sample (from its cache where the bytes are there),
    and the reason for each sample that could not be read."""
    feats: dict[int, np.ndarray] = {} if m.kind == "finetuned" else _cached_features(m, samples)
    errors: dict[int, str] = {}
    todo = [i for i in range(len(samples)) if i not in feats]
    if todo:
        bb = _backbone(m, device)
        batches = forward_batches(bb, [samples[i] for i in todo], (m.tap,), batch_size,
                                  default_workers() if workers is None else workers, progress, f"predict {m.backbone}")
        for idx, by_tap, failed in batches:
            errors.update({todo[i]: err for i, err in failed})
            feats.update({todo[i]: f for i, f in zip(idx, by_tap.get(m.tap, ()))})
    return feats, errors


def _backbone(m: Model, device: str) -> Backbone:
    bb = load_backbone(m.backbone, m.weights, device, amp="auto", channels_last=True)
    if m.weights_sha256 and bb.weights_sha256 != m.weights_sha256:
        raise PipelineError(
            f"the head was fit on {m.backbone} weights {m.weights_sha256[:12]}, but the weights found are "
            f"{bb.weights_sha256[:12]} ({bb.weights_source}); point PIPELINE_WEIGHTS_DIR at the right file"
        )
    return bb


def _cached_features(m: Model, samples: list[Sample]) -> dict[int, np.ndarray]:
    """Features of images whose bytes are already in the head's cache, by content hash."""
    if m.cache is None or not m.cache.is_file():
        return {}
    with FeatureCache(m.cache) as cache:
        if cache.attrs["weights_sha256"] != m.weights_sha256 or m.tap not in cache.taps:
            return {}
        valid = cache.valid
        stored = {h: r for r, (h, v) in enumerate(zip(cache.content_hash, valid)) if v}
        hits = {}
        for i, s in enumerate(samples):
            try:
                row = stored.get(content_hash(s.path))
            except OSError:
                continue
            if row is not None:
                hits[i] = row
        if not hits:
            return {}
        rows = cache.features(m.tap, np.array(list(hits.values())))
    return dict(zip(hits, rows))


def _probabilities(m: Model, X: np.ndarray) -> np.ndarray:
    if m.kind == "finetuned":
        return softmax(X, axis=1)
    head = load_head(m.head_path)
    order = [list(head.classes_).index(c) for c in m.classes]
    if hasattr(head, "predict_proba"):
        return head.predict_proba(X)[:, order]
    scores = head.decision_function(X)  # linear-svm, ridge: softmax of the margins, not calibrated
    if scores.ndim == 1:
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    return softmax(np.asarray(scores, dtype=np.float64), axis=1)[:, order]
