"""The fit stage: train and compare heads on cached features, one leaderboard row per
(cache, tap, task, head), each fitted head saved beside what it needs to be used again.

Evaluation is on the ``val`` (else ``test``) split when the task has one beside ``train``, else seeded
stratified k-fold cross-validation over all labelled rows (out-of-fold predictions), after which the
saved head is refit on all of them.

Heads hold their training features in memory, except the ``chunked`` ones (``sgd``), which read them
from the cache file ``chunk_rows`` rows at a time, so a cache larger than memory can be fit.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from scipy.stats import binomtest
from sklearn.model_selection import StratifiedKFold

from .cache import FeatureCache, find_caches
from .errors import PipelineError
from .files import atomic_path
from .heads import create_head, fit_by_chunks, head_spec, list_heads, save_head
from .progress import progress_bar
from .report import markdown_table, plot_confusion, rank_key, sort_rows, write_leaderboard, write_predictions
from .tasks import TaskData, cache_task, join_task, read_labels

DEFAULT_HEADS = ("logreg", "mlp", "knn")


@dataclass
class FitResult:
    """The leaderboard rows (best first within each task) and where everything was written."""

    rows: list[dict]
    out: Path
    files: dict[str, Path]

    def markdown(self) -> str:
        return markdown_table(self.rows)


def fit(
    caches: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    labels: Sequence[str | os.PathLike] = (),
    heads: Sequence[str] = DEFAULT_HEADS,
    taps: Sequence[str] | None = None,
    cv: int = 5,
    seed: int = 0,
    n_jobs: int = -1,
    chunk_rows: int = 65536,
    head_params: dict | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit every head on every (cache, tap, task) and write the leaderboard, heads and a confusion matrix.

    Chunked heads read ``chunk_rows`` rows of features at a time from the cache; the others load a
    task's features whole (when only chunked heads are asked for, no features are loaded at all).
    ``labels`` are label files or folders of them (every ``*.csv``), one task each. ``head_params`` set
    the parameters of every ``module:Class`` head.

    Each row has a 95 % Wilson interval of its accuracy (``acc_low``, ``acc_high``), the standard
    deviation over folds for cross-validation (``acc_std``), and an exact McNemar test against its
    task's best row on the same samples (``p_vs_best``; ``same_as_best`` when p >= 0.05)."""
    paths = find_caches([caches] if isinstance(caches, (str, os.PathLike)) else list(caches))
    heads = list(dict.fromkeys(heads))
    if not heads:
        raise PipelineError("no heads given; e.g. --heads logreg,mlp,knn")
    user_heads = [h for h in heads if ":" in h]
    if head_params and not user_heads:
        raise PipelineError("--head-param sets parameters of module:Class heads, and --heads names none")
    params = {h: dict(head_params or {}) for h in user_heads}
    for h in heads:
        create_head(h, seed, params.get(h))  # unknown names and bad parameters fail here, before any work
    if cv < 2:
        raise PipelineError(f"--cv must be at least 2, got {cv}")
    if chunk_rows < 1:
        raise PipelineError(f"--chunk-rows must be at least 1, got {chunk_rows}")
    in_memory = any(not head_spec(h).chunked for h in heads)
    extra_tasks = [read_labels(p) for p in _label_files(labels)]
    out = Path(out)

    jobs, meta = [], []
    for path in paths:
        with FeatureCache(path) as cache:
            attrs = cache.attrs
            tasks = ([cache_task(cache)] if (cache.labels != "").any() else []) + extra_tasks
            if not tasks:
                raise PipelineError(f"{path.name} stores no labels; give a label file with --labels id,label[,split]")
            for tap in taps or cache.taps:
                for task in tasks:
                    data = join_task(cache, task, tap, load=in_memory)
                    plan = _plan(data, cv, path)
                    for head in heads:
                        rows = _Rows(data, (str(path), tap, chunk_rows) if head_spec(head).chunked else None, seed)
                        jobs.append(delayed(_fit_one)(head, params.get(head), seed, rows, plan, cv))
                        meta.append(dict(
                            backbone=cache.backbone, weights=attrs["weights_sha256"][:12], tap=tap,
                            task=data.task, head=_head_label(head, params.get(head)), eval=plan,
                            cache=str(path.resolve()),
                            _cache_attrs=attrs, _classes=sorted(set(data.y)),
                        ))

    results = _run_jobs(jobs, n_jobs, progress)
    rows = []
    for m, res in zip(meta, results):
        cache_attrs, classes = m.pop("_cache_attrs"), m.pop("_classes")
        row = {**m, **res["metrics"]}
        if res["estimator"] is not None:
            row["head_file"] = str(_save(res["estimator"], out, row, cache_attrs, classes))
            row["predictions"] = str(write_predictions(res["ids"], res["y_true"], res["y_pred"],
                                                       Path(row["head_file"]).with_suffix(".predictions.csv")))
        row["_pred"] = (res["y_true"], res["y_pred"], classes, res["ids"])
        rows.append(row)
    rows = sort_rows(rows)
    _compare_with_best(rows)

    files = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        best = best_row([r for r in rows if r["task"] == task])
        if best is not None:
            y_true, y_pred, classes, _ = best["_pred"]
            title = f"{best['backbone']} / {best['tap']} / {best['head']} on {task} ({best['eval']}): acc {best['accuracy']:.3f}"
            files[f"confusion_{task}"] = plot_confusion(y_true, y_pred, classes, out / f"confusion_{_slug(task)}.png", title)
    for r in rows:
        r.pop("_pred")
    files.update(write_leaderboard(rows, out))
    return FitResult(rows, out, files)


def best_row(rows: Sequence[dict], task: str | None = None, linear: bool = False, backbone: str | None = None) -> dict | None:
    """The row with the highest accuracy (then balanced accuracy, then the faster fit), optionally only
    of one task, of linear heads, or of one backbone."""
    linear_heads = {h for h in list_heads() if head_spec(h).linear}
    cands = [
        r for r in rows
        if r.get("accuracy") is not None and r.get("head_file")
        and (task is None or r["task"] == task)
        and (backbone is None or r["backbone"] == backbone)
        and (not linear or r["head"] in linear_heads)
    ]
    return max(cands, key=rank_key, default=None)


def _plan(data: TaskData, cv: int, path: Path) -> str:
    """``val``/``test`` for a held-out evaluation, else ``cv<k>``; checks the task can be evaluated."""
    classes, counts = np.unique(data.y, return_counts=True)
    where = f"task {data.task!r} on {path.name}"
    if len(classes) < 2:
        raise PipelineError(f"{where}: needs at least 2 classes, found {len(classes)} ({', '.join(map(str, classes))})")
    split = data.holdout_split
    if split is not None:
        train_classes = np.unique(data.y[data.splits == "train"])
        if len(train_classes) < 2:
            raise PipelineError(f"{where}: the train split has fewer than 2 classes")
        return split
    rare = classes[counts < cv]
    if len(rare):
        raise PipelineError(
            f"{where}: class {rare[0]!r} has {counts[counts < cv][0]} sample(s), fewer than --cv {cv}; "
            "lower --cv, add samples, or give the task a train/val split"
        )
    return f"cv{cv}"


class _Rows:
    """Fit and predict on index sets of a task's rows: features from memory, or, for a chunked head,
    read from the cache file ``chunk_rows`` rows at a time (``source = (path, tap, chunk_rows)``)."""

    def __init__(self, data: TaskData, source: tuple[str, str, int] | None, seed: int):
        self.data, self.source, self.seed = data, source, seed

    def fit(self, est, idx: np.ndarray):
        y = self.data.y
        if self.source is None:
            return est.fit(self.data.X[idx], y[idx])
        rng = np.random.default_rng(self.seed)
        with FeatureCache(self.source[0]) as cache:

            def chunks(epoch: int):
                for part in self._parts(idx if epoch < 0 else rng.permutation(idx)):
                    yield self._read(cache, part), y[part]

            return fit_by_chunks(est, chunks, np.unique(y))

    def predict(self, est, idx: np.ndarray) -> np.ndarray:
        if self.source is None:
            return est.predict(self.data.X[idx])
        with FeatureCache(self.source[0]) as cache:
            return np.concatenate([est.predict(self._read(cache, part)) for part in self._parts(idx)])

    def _parts(self, idx: np.ndarray):
        step = self.source[2]
        return (idx[i:i + step] for i in range(0, len(idx), step))

    def _read(self, cache: FeatureCache, part: np.ndarray) -> np.ndarray:
        return cache.features(self.source[1], self.data.rows[part])


def _fit_one(head: str, params: dict | None, seed: int, rows: _Rows, plan: str, cv: int) -> dict:
    est = create_head(head, seed, params)
    y = rows.data.y
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fold_acc = []
            if plan.startswith("cv"):
                folds = StratifiedKFold(cv, shuffle=True, random_state=seed)
                y_true, y_pred = y, np.empty(len(y), dtype=object)
                for tr, te in folds.split(np.zeros((len(y), 1)), y):  # out-of-fold predictions
                    y_pred[te] = rows.predict(rows.fit(clone(est), tr), te)
                    fold_acc.append(accuracy_score(y[te], y_pred[te]))
                train = test = np.arange(len(y))
            else:
                train, test = np.flatnonzero(rows.data.splits == "train"), np.flatnonzero(rows.data.splits == plan)
                y_true = y[test]
            start = time.perf_counter()
            rows.fit(est, train)
            seconds = time.perf_counter() - start
            if not plan.startswith("cv"):
                y_pred = rows.predict(est, test)
            notes = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught})
    except Exception as e:  # a head that cannot fit this task is a row with an error, not a failed run
        return dict(estimator=None, y_true=None, y_pred=None, ids=None, metrics=dict(
            n_train=None, n_test=None, accuracy=None, balanced_accuracy=None, f1_macro=None,
            fit_seconds=None, error=" ".join(f"{type(e).__name__}: {e}".split())[:300]))
    correct = int((y_true == y_pred).sum())
    low, high = binomtest(correct, len(y_true)).proportion_ci(0.95, method="wilson")
    return dict(estimator=est, y_true=y_true, y_pred=y_pred, ids=rows.data.ids[test], metrics=dict(
        n_train=int(len(train)), n_test=int(len(y_true)),
        accuracy=correct / len(y_true), acc_low=float(low), acc_high=float(high),
        acc_std=float(np.std(fold_acc)) if fold_acc else None,
        balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)),
        f1_macro=float(f1_score(y_true, y_pred, average="macro")),
        fit_seconds=round(seconds, 4), error="; ".join(notes),
    ))


def _compare_with_best(rows: list[dict]) -> None:
    """``p_vs_best`` (exact McNemar test on the samples both rows predicted) and ``same_as_best``."""
    for task in dict.fromkeys(r["task"] for r in rows):
        best = best_row([r for r in rows if r["task"] == task])
        if best is None:
            continue
        ref = dict(zip(best["_pred"][3], best["_pred"][0] == best["_pred"][1]))
        for r in rows:
            if r["task"] != task or r.get("accuracy") is None:
                continue
            if r is best:
                r["p_vs_best"], r["same_as_best"] = None, True
                continue
            mine = dict(zip(r["_pred"][3], r["_pred"][0] == r["_pred"][1]))
            common = [i for i in mine if i in ref]
            only_best = sum(ref[i] and not mine[i] for i in common)
            only_mine = sum(mine[i] and not ref[i] for i in common)
            p = binomtest(only_best, only_best + only_mine).pvalue if only_best + only_mine else 1.0
            r["p_vs_best"], r["same_as_best"] = float(p), bool(p >= 0.05)


def _label_files(labels: Sequence[str | os.PathLike]) -> list[Path]:
    """Label files, a folder standing for every ``*.csv`` in it."""
    files = []
    for item in map(Path, labels):
        if item.is_dir():
            found = sorted(item.glob("*.csv"))
            if not found:
                raise PipelineError(f"label folder {item} holds no *.csv label files")
            files += found
        else:
            files.append(item)
    return files


def _head_label(head: str, params: dict | None) -> str:
    """The leaderboard name of a head: ``module:Class(key=value,...)`` when it has parameters."""
    return f"{head}({','.join(f'{k}={v}' for k, v in params.items())})" if params else head


def _run_jobs(jobs: list, n_jobs: int, progress: bool) -> list[dict]:
    out = []
    with progress_bar(progress) as bar:
        task = bar.add_task("fit", total=len(jobs))
        for res in Parallel(n_jobs=n_jobs, return_as="generator")(jobs):
            out.append(res)
            bar.advance(task)
    return out


def _save(estimator, out: Path, row: dict, cache_attrs: dict, classes: list[str]) -> Path:
    """Save a fitted head and, beside it, the JSON naming the backbone, weights and preprocessing it needs."""
    stem = _slug(f"{Path(row['cache']).stem}__{row['tap']}__{row['task']}__{row['head']}")
    path = out / "heads" / f"{stem}.skops"
    with atomic_path(path) as tmp:
        save_head(estimator, tmp)
    card = dict(
        head=row["head"], task=row["task"], tap=row["tap"], classes=[str(c) for c in classes],
        backbone=cache_attrs["backbone"], weights_sha256=cache_attrs["weights_sha256"],
        weights_source=cache_attrs.get("weights_source", ""), data_config=cache_attrs["data_config"],
        dtype=cache_attrs["dtype"], cache=row["cache"], eval=row["eval"],
        metrics={k: row[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "n_train", "n_test")},
    )
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(card, indent=1))
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)
