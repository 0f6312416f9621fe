"""The audit stage: what a feature cache says about the data itself, the questions that most often make a
leaderboard lie or a model fail.

- **Label issues**, per task: out-of-fold class probabilities from a linear head, under the task's
  evaluation protocol (a run's stored one, or one decided as ``fit`` decides it), fed to cleanlab's
  confident learning (``find_label_issues``), ranked by self-confidence (the probability of the given
  label), most suspicious first.
- **Near-duplicates**: pairs of images whose features have cosine similarity of at least a threshold
  (:data:`pipeline.similarity.DUPLICATE_COSINE`), pairs across training and evaluation splits first; per
  task, how many scored images have a near-copy among the images their model trains on (possible leakage).
- **Outliers**: images whose ``k`` nearest neighbours are far (mean cosine distance), beyond the upper
  fence of the scores' box plot.
- **A map**: the embeddings in 2-D (UMAP when installed, else t-SNE), coloured by label.

Everything is written into ``out`` as CSV, with ``audit.html``, one static page to look at.
"""

from __future__ import annotations

import csv
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cache import FeatureCache, find_caches
from ..sources import load_source
from ..errors import PipelineError
from ..files import atomic_path
from ..heads import create_head, has_head
from ..evaluation import HOLDOUT_SPLITS, Labelled, Protocol, RunFolder, open_task
from ..findings import AuditResult, TaskAudit, label_issues_file
from ..similarity import BLOCK, DUPLICATE_COSINE, knn, near_copies, normalized, pairs_above
from ..tasks import Task, TaskData, cache_task, join_task, label_files, read_labels
from ..validation import Rule, Settings, at_least, between, one_of, unknown

MAP_METHODS = ("auto", "umap", "tsne", "none")


def _gives_probabilities(head) -> bool:
    """Whether ``head`` names a classification head with ``predict_proba``, which cleanlab reads."""
    return isinstance(head, str) and has_head(head, "classification") and hasattr(create_head(head), "predict_proba")


@dataclass
class AuditConfig(Settings):
    """How ``audit`` looks: the tap; the head whose out-of-fold probabilities cleanlab reads (a registry
    head with ``predict_proba``) and the folds and seed of a task without a split (or of its training
    images); the near-duplicate threshold; the neighbours an outlier score averages over; the map's
    method and most points; how many examples of each finding the page shows; the search block."""

    tap: str = "pooled"
    head: str = "logreg"
    cv: int = 5
    seed: int = 0
    dup_threshold: float = DUPLICATE_COSINE
    k: int = 10
    map: str = "auto"
    map_points: int = 5000
    top: int = 24
    block: int = BLOCK

    RULES = dict(head=Rule(_gives_probabilities, "a head with class probabilities (logreg, torch-logreg, sgd, ...)"),
                 cv=at_least(2), dup_threshold=between(0, 1, low_open=True), k=at_least(1), map=one_of(*MAP_METHODS),
                 map_points=at_least(10), top=at_least(1), block=at_least(1))


def audit(caches: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
          labels: Sequence[str | os.PathLike] = (), *, run: str | os.PathLike | None = None,
          data: str | os.PathLike | None = None, config: AuditConfig | None = None, **settings) -> AuditResult:
    """Audit the images of ``caches`` (several caches: several backbones over the same images, their
    normalised features side by side) and write the findings into ``out``.

    Tasks are the caches' own labels and each label file in ``labels``. ``run``: a fit run folder whose
    stored protocols score the label issues (else each is decided as ``fit`` decides it); the audit is
    recorded there and its ``report.html`` links to the page. ``data``: the image folder or manifest,
    for thumbnails on the page. Settings are :class:`AuditConfig`'s fields."""
    started = time.time()
    cfg = replace(config or AuditConfig(), **settings)
    cfg.check()
    out = Path(out)
    run_folder = RunFolder(run) if run is not None else None
    if run_folder is not None and not run_folder.exists:
        raise PipelineError(f"{run} is not a fit run folder (no leaderboard.json)")
    images = _image_paths(data)
    paths = find_caches([caches] if isinstance(caches, (str, os.PathLike)) else list(caches))
    found = _load(paths, [read_labels(p) for p in label_files(labels)], cfg.tap)
    audits = [_audit_task(t, d, found, run_folder, cfg) for t, d in found.tasks]
    duplicates = find_duplicates(found.X, found.ids, found.splits, cfg.dup_threshold, cfg.block)
    outliers = find_outliers(found.X, found.ids, found.labels, found.splits, cfg.k, cfg.block)
    result = AuditResult(out, audits, duplicates, outliers, "", threshold=cfg.dup_threshold)
    result.files = _write(result)
    if cfg.map != "none" and len(found.ids) >= 5:
        coords, shown, result.map_method = embed_2d(found.X, cfg.map, cfg.seed, cfg.map_points)
        result.files.update(_write_map(out, found.ids[shown], coords, found.colour()[shown], audits))
    from ..audit_page import write_page

    result.files["page"] = write_page(result, images, cfg.top)
    if run_folder is not None:
        _record(run_folder, result, paths, labels, cfg, time.time() - started)
    return result


@dataclass
class _Found:
    """The images every cache holds valid features of: ids, joined features, the first cache's labels
    and splits, and each task with its labelled images."""

    ids: np.ndarray
    X: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    tasks: list[tuple[Task, TaskData]]

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.ids)}

    def colour(self) -> np.ndarray:
        """What the map colours points by: the first task's labels ("" where it has none)."""
        by_id = dict(zip(self.tasks[0][0].ids, self.tasks[0][0].labels)) if self.tasks else {}
        return np.array([str(by_id.get(i, "")) for i in self.ids], dtype=object)


def _load(paths: list[Path], extra: list[Task], tap: str) -> _Found:
    with ExitStack() as stack:
        opened = [stack.enter_context(FeatureCache(p)) for p in paths]
        ids, X = joined_features(opened, tap)
        first = opened[0]
        tasks = ([cache_task(first)] if (first.labels != "").any() else []) + extra
        position = {sid: i for i, sid in enumerate(first.ids)}
        rows = [position[i] for i in ids]
        return _Found(ids, X, first.labels[rows], first.splits[rows],
                      [(t, join_task(first, t, load=False)) for t in tasks])


def joined_features(caches: list[FeatureCache], tap: str) -> tuple[np.ndarray, np.ndarray]:
    """The ids valid in every cache (in the first cache's order) and their features: each cache's rows
    normalised, side by side, scaled so each row has unit length (cosine similarity is then the mean of
    the backbones')."""
    valid = [set(c.ids[c.valid]) for c in caches]
    first = caches[0]
    ids = np.array([i for i in first.ids[first.valid] if all(i in v for v in valid[1:])], dtype=object)
    if not len(ids):
        raise PipelineError("no image has valid features in every cache; several caches must be backbones over "
                            "the same images")
    parts = []
    for c in caches:
        if tap not in c.taps:
            raise unknown("tap", tap, c.taps, f"(the taps of {c.path.name})")
        position = {sid: i for i, sid in enumerate(c.ids)}
        parts.append(normalized(c.features(tap, np.array([position[i] for i in ids]))))
    return ids, np.hstack(parts) / np.sqrt(len(parts))


def out_of_fold(X: np.ndarray, protocol: Protocol, head: str, cv: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities of every sample of ``protocol`` (rows of ``X`` in its order) from a ``head``
    that never saw its label: the protocol's own splits for the scored samples, and ``cv`` folds of the
    training-only samples among themselves. Returns (classes, probabilities); a row is NaN where no
    fold could predict it."""
    classes = np.unique(protocol.y.astype(str))
    y = protocol.y.astype(str)
    probs = np.full((len(y), len(classes)), np.nan)
    for train, test in protocol.oof_plan(cv, seed):
        if len(np.unique(y[train])) < 2 or not len(test):
            continue
        est = create_head(head, seed).fit(X[train], y[train])
        probs[test] = 0.0
        probs[np.ix_(test, np.searchsorted(classes, est.classes_.astype(str)))] = est.predict_proba(X[test])
    return classes, probs


def rank_label_issues(y: np.ndarray, classes: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's confident learning on out-of-fold probabilities: the indices it flags, most suspicious
    first (lowest self-confidence), and every sample's label quality score (NaN where no probability)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    have = np.flatnonzero(~np.isnan(probs).any(axis=1))
    scores = np.full(len(y), np.nan)
    if len(np.unique(y[have])) < 2:
        return np.zeros(0, np.int64), scores
    given = np.searchsorted(classes, y[have].astype(str))
    flagged = find_label_issues(given, probs[have], return_indices_ranked_by="self_confidence", n_jobs=1)
    scores[have] = get_label_quality_scores(given, probs[have], method="self_confidence")
    return have[flagged], scores


def find_duplicates(X: np.ndarray, ids: np.ndarray, splits: np.ndarray, threshold: float, block: int = BLOCK) -> list[dict]:
    """Pairs of images with cosine similarity of at least ``threshold``: pairs across a training and an
    evaluation split first (the evaluation image as ``id_a``), then by similarity."""
    rows = []
    for i, j, s in zip(*pairs_above(X, threshold, block)):
        cross = "train" in (splits[i], splits[j]) and bool({splits[i], splits[j]} & set(HOLDOUT_SPLITS))
        if cross and splits[i] == "train":
            i, j = j, i
        rows.append(dict(id_a=ids[i], id_b=ids[j], similarity=round(float(s), 4), split_a=splits[i],
                         split_b=splits[j], cross=bool(cross)))
    return sorted(rows, key=lambda r: (not r["cross"], -r["similarity"]))


def find_outliers(X: np.ndarray, ids: np.ndarray, labels: np.ndarray, splits: np.ndarray, k: int,
                  block: int = BLOCK) -> list[dict]:
    """Every image's outlier score, the mean cosine distance to its ``k`` nearest other images, most
    outlying first; ``outlier`` marks scores beyond the upper fence (Q3 + 1.5 IQR)."""
    sims, idx = knn(X, X, k, exclude=np.arange(len(X)), block=block)
    score = 1.0 - np.nanmean(sims, axis=1) if len(X) > 1 else np.zeros(len(X))
    q1, q3 = np.percentile(score, [25, 75])
    fence = q3 + 1.5 * (q3 - q1)
    rows = [dict(id=ids[i], label=labels[i], split=splits[i], score=round(float(score[i]), 4),
                 outlier=bool(score[i] > fence), nearest_id=ids[idx[i, 0]] if idx[i, 0] >= 0 else "",
                 nearest_similarity=round(float(sims[i, 0]), 4) if idx[i, 0] >= 0 else "")
            for i in np.argsort(-score, kind="stable")]
    return rows


def embed_2d(X: np.ndarray, method: str, seed: int, max_points: int) -> tuple[np.ndarray, np.ndarray, str]:
    """2-D coordinates of at most ``max_points`` rows (a seeded sample), the rows shown, and the method:
    UMAP (``auto`` when umap-learn is installed) or t-SNE from scikit-learn, after PCA to 50 dimensions."""
    from sklearn.decomposition import PCA

    shown = np.arange(len(X))
    if len(X) > max_points:
        shown = np.sort(np.random.default_rng(seed).choice(len(X), max_points, replace=False))
    Z = X[shown]
    if Z.shape[1] > 50 and len(Z) > 50:
        Z = PCA(50, random_state=seed).fit_transform(Z)
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise PipelineError("--map umap needs umap-learn: pip install -e '.[umap]' (in the repository)") from None
        else:
            return umap.UMAP(n_neighbors=min(15, len(Z) - 1), random_state=seed).fit_transform(Z), shown, "UMAP"
    from sklearn.manifold import TSNE

    coords = TSNE(2, perplexity=min(30.0, (len(Z) - 1) / 3), init="pca", random_state=seed).fit_transform(Z)
    return coords, shown, "t-SNE"


def _audit_task(task: Task, data: TaskData, found: _Found, run: RunFolder | None, cfg: AuditConfig) -> TaskAudit:
    """The protocol of a task on the images that have features, its label issues and its leaked images."""
    protocol, note = _protocol(task, data, found.row_of, run, cfg)
    X = found.X[[found.row_of[i] for i in protocol.ids]]
    leaked = list(protocol.ids[near_copies(X, protocol, cfg.dup_threshold, cfg.block)])
    if not protocol.task_kind.single_label:
        return TaskAudit(task.name, protocol, [], leaked, f"label issues need one class per image, not {protocol.kind}")
    classes, probs = out_of_fold(X, protocol, cfg.head, cfg.cv, cfg.seed)
    flagged, scores = rank_label_issues(protocol.y, classes, probs)
    split_of = dict(zip(data.ids, data.splits))
    issues = [dict(id=str(protocol.ids[i]), given=str(protocol.y[i]), suggested=str(classes[int(np.argmax(probs[i]))]),
                   score=round(float(scores[i]), 4), split=split_of.get(protocol.ids[i], "")) for i in flagged]
    return TaskAudit(task.name, protocol, issues, leaked, note)


def _protocol(task: Task, data: TaskData, row_of: dict, run: RunFolder | None, cfg: AuditConfig) -> tuple[Protocol, str]:
    """The run's protocol of the task on the images with features here (``row_of``: the evaluation
    service's ``within`` policy), else one decided as ``fit`` decides it."""
    keep = np.array([i in row_of for i in data.ids], bool)
    labelled = Labelled(task.name, task.kind, data.ids[keep], data.y[keep], data.splits[keep])
    protocol, note = open_task(labelled, cfg.cv, cfg.seed, run, "within")
    if run is not None and run.protocol(task.name) is None:
        note = f"{run.path} holds no protocol for it; decided as fit decides"
    return protocol, note


def _image_paths(data: str | os.PathLike | None) -> dict[str, Path]:
    """Where each id's image is, from the data folder or manifest (for thumbnails)."""
    if data is None:
        return {}
    return {s.id: s.path for s in load_source(data).samples}


def _write(result: AuditResult) -> dict[str, Path]:
    out = result.out
    files = {}
    for t in result.tasks:
        if t.protocol.task_kind.single_label:
            files[f"label_issues_{t.task}"] = _write_csv(out / label_issues_file(t.task), t.issues,
                                                         ("id", "given", "suggested", "score", "split"))
    files["duplicates"] = _write_csv(out / "duplicates.csv", result.duplicates,
                                     ("id_a", "id_b", "similarity", "split_a", "split_b", "cross"))
    files["outliers"] = _write_csv(out / "outliers.csv", result.outliers,
                                   ("id", "label", "split", "score", "outlier", "nearest_id", "nearest_similarity"))
    return files


def _write_map(out: Path, ids: np.ndarray, coords: np.ndarray, labels: np.ndarray, audits: list[TaskAudit]) -> dict[str, Path]:
    """``map.csv`` (id, x, y, label) and ``map.png``: points coloured by label, the first task's label
    issues ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [dict(id=i, x=round(float(x), 3), y=round(float(y), 3), label=lab) for i, (x, y), lab in zip(ids, coords, labels)]
    files = {"map_csv": _write_csv(out / "map.csv", rows, ("id", "x", "y", "label"))}
    flagged = {d["id"] for d in audits[0].issues} if audits else set()
    fig, ax = plt.subplots(figsize=(7, 6))
    classes = sorted(set(labels))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for n, c in enumerate(classes):
        at = labels == c
        ax.scatter(coords[at, 0], coords[at, 1], s=12, color=cmap(n % cmap.N), label=c or "(no label)", alpha=0.8)
    ringed = np.array([i in flagged for i in ids], bool)
    if ringed.any():
        ax.scatter(coords[ringed, 0], coords[ringed, 1], s=70, facecolors="none", edgecolors="red", linewidths=1.3,
                   label=f"label issue ({audits[0].task})")
    if len(classes) <= 20:
        ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(out / "map.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return {**files, "map": out / "map.png"}


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _record(run: RunFolder, result: AuditResult, caches: list[Path], labels: Sequence, cfg: AuditConfig,
            seconds: float) -> None:
    """Note the audit in the run (``run.json``) and write its report again, which then links to the page."""
    from ..report import publish

    run.record("audit", dict(caches=[str(p) for p in caches], labels=[str(x) for x in labels],
                             out=run.relative(result.out), page=run.relative(result.files["page"]), **asdict(cfg)), seconds)
    publish(run)
