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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from joblib import Parallel, delayed
from joblib.parallel import get_active_backend
from sklearn.base import clone
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from scipy.stats import binomtest, false_discovery_control
from sklearn.model_selection import StratifiedKFold

from .cache import FeatureCache, find_caches
from .errors import PipelineError
from .fewshot import parse_shots, plan_draws, plot_fewshot, summarise
from .files import atomic_path
from .heads import create_head, fit_by_chunks, head_spec, list_heads, save_head
from .parallel import parallel_backend
from .progress import progress_bar
from .report import (markdown_table, plot_confusion, rank_key, sort_rows, write_fewshot, write_html_report,
                     slug, write_leaderboard, write_predictions, write_run_info)
from .tasks import Task, TaskData, cache_task, join_task, read_labels

DEFAULT_HEADS = ("logreg", "mlp", "knn")


@dataclass
class FitResult:
    """The leaderboard rows (best first within each task), the few-shot rows, and where everything was written."""

    rows: list[dict]
    out: Path
    files: dict[str, Path]
    fewshot: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        return markdown_table(self.rows)


@dataclass
class _Source:
    """One task's features on one tap of one backbone (or of a concatenation of backbones)."""

    backbone: str
    weights: str
    tap: str
    data: TaskData
    parts: list[tuple[Path, dict]]  # (cache file, its attributes): one, or one per concatenated backbone

    @property
    def cache(self) -> str:
        return " + ".join(str(p.resolve()) for p, _ in self.parts)

    def rows(self, head: str, chunk_rows: int, seed: int) -> "_Rows":
        """What ``head`` fits on: the features in memory, or read by chunks for a chunked head."""
        return _Rows(self.data, (str(self.parts[0][0]), self.tap, chunk_rows) if head_spec(head).chunked else None, seed)


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
    concat: bool = False,
    shots: Sequence[int | str] = (),
    draws: int = 5,
    backend: str = "loky",
    cluster: str | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit every head on every (cache, tap, task) and write the leaderboard, heads, plots and ``report.html``.

    Chunked heads read ``chunk_rows`` rows of features at a time from the cache; the others load a
    task's features whole (when only chunked heads are asked for, no features are loaded at all).
    ``labels`` are label files or folders of them (every ``*.csv``), one task each. ``head_params`` set
    the parameters of every ``module:Class`` head. ``concat`` adds the concatenation of all the caches'
    features (on the images they share) as one more backbone.

    Each row has a 95 % Wilson interval of its accuracy (``acc_low``, ``acc_high``), the standard
    deviation over folds for cross-validation (``acc_std``), and an exact McNemar test against its
    task's best row on the same samples (``p_vs_best``; ``same_as_best`` when p >= 0.05).

    ``shots`` (e.g. ``[1, 2, 5, 10, "all"]``) adds few-shot curves: each head fit on k examples per
    class in ``draws`` seeded draws (see :mod:`pipeline.fewshot`). The fits run through joblib on
    ``backend`` (loky, threading, dask or ray; ``cluster`` is a Dask scheduler or Ray address)."""
    started = time.time()
    call = dict(caches=[str(c) for c in ([caches] if isinstance(caches, (str, os.PathLike)) else caches)],
                out=str(out), labels=[str(x) for x in labels], heads=list(heads), taps=list(taps or []), cv=cv,
                seed=seed, n_jobs=n_jobs, chunk_rows=chunk_rows, head_params=head_params or {}, concat=concat,
                shots=[str(k) for k in shots], draws=draws, backend=backend, cluster=cluster)
    paths = find_caches(call["caches"])
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
    if draws < 1:
        raise PipelineError(f"--draws must be at least 1, got {draws}")
    if concat and len(paths) < 2:
        raise PipelineError(f"--concat joins the features of several caches, and {len(paths)} was given")
    shots = parse_shots(shots)
    load = concat or bool(shots) or any(not head_spec(h).chunked for h in heads)
    extra_tasks = [read_labels(p) for p in _label_files(labels)]
    out = Path(out)
    try:
        (out / "heads").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot write the run directory {out}: {e.strerror}") from None

    sources = _sources(paths, extra_tasks, taps, load)
    if concat:
        sources += _concatenate(sources, paths)
    warm = tuple((h, params.get(h)) for h in heads)
    jobs, meta = [], []
    for src in sources:
        plan = _plan(src.data, cv, src.parts[0][0])
        for head in heads:
            rows = src.rows(head, chunk_rows, seed)
            jobs.append(delayed(_in_worker)(warm, _fit_one, head, params.get(head), seed, rows, plan, cv))
            meta.append(dict(
                backbone=src.backbone, weights=src.weights, tap=src.tap, task=src.data.task,
                head=_head_label(head, params.get(head)), eval=plan, cache=src.cache,
                _parts=src.parts, _classes=sorted(set(src.data.y)),
            ))
    few_jobs, few_meta = _fewshot_jobs(sources, heads, params, shots, draws, seed, chunk_rows, warm)

    with parallel_backend(backend, cluster, n_jobs):
        results = _run_jobs(jobs + [j for j in few_jobs if j is not None], n_jobs, progress)
    few_results = iter(results[len(jobs):])
    rows = []
    for m, res in zip(meta, results):
        parts, classes = m.pop("_parts"), m.pop("_classes")
        row = {**m, **res["metrics"]}
        if res["estimator"] is not None:
            row["head_file"] = str(_save(res["estimator"], out, row, parts, classes))
            row["predictions"] = str(write_predictions(res["ids"], res["y_true"], res["y_pred"],
                                                       Path(row["head_file"]).with_suffix(".predictions.csv")))
        row["_pred"] = (res["y_true"], res["y_pred"], classes, res["ids"])
        rows.append(row)
    rows = sort_rows(rows)
    _compare_with_best(rows)
    fewshot = [{**m, **_few_summary(m, next(few_results) if job is not None else None)}
               for m, job in zip(few_meta, few_jobs)]

    files = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        best = best_row([r for r in rows if r["task"] == task])
        if best is not None:
            y_true, y_pred, classes, _ = best["_pred"]
            title = f"{best['backbone']} / {best['tap']} / {best['head']} on {task} ({best['eval']}): acc {best['accuracy']:.3f}"
            files[f"confusion_{task}"] = plot_confusion(y_true, y_pred, classes, out / f"confusion_{slug(task)}.png", title)
    for r in rows:
        r.pop("_pred")
    if fewshot:
        files.update(write_fewshot(fewshot, out))
        for task in dict.fromkeys(r["task"] for r in fewshot):
            files[f"fewshot_{task}"] = plot_fewshot(fewshot, task, out / f"fewshot_{slug(task)}.png")
    write_run_info(out, "fit", call, time.time() - started)
    files.update(write_leaderboard(rows, out))
    files["report"] = write_html_report(out)
    return FitResult(rows, out, files, fewshot)


def _sources(paths: list[Path], extra_tasks: list[Task], taps: Sequence[str] | None, load: bool) -> list[_Source]:
    sources = []
    for path in paths:
        with FeatureCache(path) as cache:
            attrs = cache.attrs
            tasks = ([cache_task(cache)] if (cache.labels != "").any() else []) + extra_tasks
            if not tasks:
                raise PipelineError(f"{path.name} stores no labels; give a label file with --labels id,label[,split]")
            for tap in taps or cache.taps:
                for task in tasks:
                    sources.append(_Source(cache.backbone, attrs["weights_sha256"][:12], tap,
                                           join_task(cache, task, tap, load=load), [(path, attrs)]))
    return sources


def _concatenate(sources: list[_Source], paths: list[Path]) -> list[_Source]:
    """One more source per (tap, task) that every cache has: the caches' features side by side, on the
    samples valid in all of them."""
    groups: dict[tuple[str, str], list[_Source]] = {}
    for src in sources:
        groups.setdefault((src.tap, src.data.task), []).append(src)
    joined = []
    for (tap, task), group in groups.items():
        if len(group) != len(paths):
            continue
        first = group[0].data
        common = set(first.ids).intersection(*(set(s.data.ids) for s in group[1:]))
        if not common:
            raise PipelineError(f"--concat: the caches share no valid samples of task {task!r} on tap {tap!r}; "
                                "concatenate caches extracted from the same images")
        keep = np.array([i in common for i in first.ids])
        Xs = []
        for s in group:
            where = {sid: i for i, sid in enumerate(s.data.ids)}
            Xs.append(s.data.X[[where[sid] for sid in first.ids[keep]]])
        data = TaskData(task=task, ids=first.ids[keep], X=np.hstack(Xs), y=first.y[keep], splits=first.splits[keep],
                        dropped=first.dropped + int((~keep).sum()), rows=first.rows[keep])
        joined.append(_Source("+".join(s.backbone for s in group), "+".join(s.weights for s in group), tap, data,
                              [p for s in group for p in s.parts]))
    if not joined:
        raise PipelineError("--concat: no tap and task is in every cache")
    return joined


def _fewshot_jobs(sources: list[_Source], heads: list[str], params: dict, shots: list, draws: int, seed: int,
                  chunk_rows: int, warm: tuple):
    """A job per (source, head, k) fitting its draws (None where k cannot be drawn), and each job's row."""
    jobs, meta = [], []
    for src in sources:
        if not shots:
            break
        plans, test, split = plan_draws(src.data, shots, draws, seed)
        for head in heads:
            rows = src.rows(head, chunk_rows, seed)
            for k, plan in plans.items():
                meta.append(dict(backbone=src.backbone, weights=src.weights, tap=src.tap, task=src.data.task,
                                 head=_head_label(head, params.get(head)), shots=k,
                                 draws=0 if isinstance(plan, str) else len(plan), eval=split, n_test=len(test),
                                 _skip=plan if isinstance(plan, str) else ""))
                jobs.append(None if isinstance(plan, str) else
                            delayed(_in_worker)(warm, _fit_draws, head, params.get(head), seed, rows, plan, test))
    return jobs, meta


def _few_summary(meta: dict, result: dict | None) -> dict:
    skip = meta.pop("_skip")
    accs = result["accuracies"] if result else None
    return dict(**summarise(accs), accuracies=accs, error=skip or (result or {}).get("error", ""))


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
        if self.data.X is not None:  # loaded for other heads (or a concatenation): the same rows from memory
            return self.data.X[part]
        return cache.features(self.source[1], self.data.rows[part])


def _in_worker(warm: tuple[tuple[str, dict | None], ...], fn, *args):
    """``fn(*args)`` after building every head of the sweep once, so that a worker's first job loads
    what any head imports (torch, for torch-logreg). loky takes a worker's memory baseline after its
    first job and replaces a worker that grows 300 MB beyond it: without this, each later job that first
    imported torch got its worker replaced, and the next one paid for the import again."""
    for head, params in warm:
        create_head(head, 0, params)
    return fn(*args)


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
            labels, counts = np.unique(y[train], return_counts=True)
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
        chance=float(np.mean(y_true == labels[np.argmax(counts)])),
        acc_std=float(np.std(fold_acc)) if fold_acc else None,
        balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)),
        f1_macro=float(f1_score(y_true, y_pred, average="macro")),
        fit_seconds=round(seconds, 4), error="; ".join(notes),
    ))


def _fit_draws(head: str, params: dict | None, seed: int, rows: _Rows, draws: list[np.ndarray], test: np.ndarray) -> dict:
    """Fit ``head`` on each few-shot draw's rows as the leaderboard fits it, and score it on ``test``:
    the accuracies, or the first error."""
    y, accs = rows.data.y, []
    try:
        for idx in draws:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = rows.fit(create_head(head, seed, params), idx)
            accs.append(float((rows.predict(est, test) == y[test]).mean()))
    except Exception as e:  # a head that cannot fit k shots is a row with an error, not a failed sweep
        return dict(accuracies=None, error=" ".join(f"{type(e).__name__}: {e}".split())[:300])
    return dict(accuracies=accs, error="")


def _compare_with_best(rows: list[dict]) -> None:
    """Per task, with p-values adjusted for the number of rows (Benjamini-Hochberg): ``p_vs_best`` (exact
    McNemar test on the samples both rows predicted) and ``same_as_best``; ``p_above_chance`` (one-sided
    exact binomial test against ``chance``, the accuracy of always predicting the majority training
    class) and ``above_chance``."""
    for task in dict.fromkeys(r["task"] for r in rows):
        scored = [r for r in rows if r["task"] == task and r.get("accuracy") is not None]
        best = best_row(scored)
        if best is None:
            continue
        ref = dict(zip(best["_pred"][3], best["_pred"][0] == best["_pred"][1]))
        for r in scored:
            mine = dict(zip(r["_pred"][3], r["_pred"][0] == r["_pred"][1]))
            common = [i for i in mine if i in ref]
            only_best = sum(ref[i] and not mine[i] for i in common)
            only_mine = sum(mine[i] and not ref[i] for i in common)
            r["p_vs_best"] = float(binomtest(only_best, only_best + only_mine).pvalue) if only_best + only_mine else 1.0
            correct = round(r["accuracy"] * r["n_test"])
            r["p_above_chance"] = float(binomtest(correct, r["n_test"], r["chance"], alternative="greater").pvalue)
        for key, flag, keep_if_low in (("p_vs_best", "same_as_best", False), ("p_above_chance", "above_chance", True)):
            adjusted = false_discovery_control([r[key] for r in scored])
            for r, p in zip(scored, adjusted):
                r[flag] = bool(p < 0.05) if keep_if_low else bool(p >= 0.05)
        best["p_vs_best"], best["same_as_best"] = None, True


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
    """Run joblib jobs (on the backend configured around the call), with a progress bar that advances
    per job where the backend returns results as they come (Ray's returns them all at the end)."""
    backend, _ = get_active_backend()
    streams = getattr(backend, "supports_return_generator", False)
    out = []
    with progress_bar(progress) as bar, warnings.catch_warnings():
        # loky replaces a worker whose memory grew (torch-logreg imports torch) and says so; no job is lost
        warnings.filterwarnings("ignore", "A worker stopped while some jobs were given", UserWarning)
        task = bar.add_task("fit", total=len(jobs))
        for res in Parallel(n_jobs=n_jobs, return_as="generator" if streams else "list")(jobs):
            out.append(res)
            bar.advance(task)
    return out


def _save(estimator, out: Path, row: dict, parts: list[tuple[Path, dict]], classes: list[str]) -> Path:
    """Save a fitted head and, beside it, the JSON naming the backbone(s), weights and preprocessing it
    needs (``parts``: one per concatenated backbone, in the order of their features)."""
    stem = slug(f"{'+'.join(p.stem for p, _ in parts)}__{row['tap']}__{row['task']}__{row['head']}")
    path = out / "heads" / f"{stem}.skops"
    with atomic_path(path) as tmp:
        save_head(estimator, tmp)
    card = dict(
        head=row["head"], task=row["task"], tap=row["tap"], classes=[str(c) for c in classes],
        backbone=row["backbone"], eval=row["eval"],
        metrics={k: row[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "n_train", "n_test")},
        parts=[dict(backbone=a["backbone"], weights_sha256=a["weights_sha256"], weights_source=a.get("weights_source", ""),
                    data_config=a["data_config"], dtype=a["dtype"], cache=str(p.resolve())) for p, a in parts],
    )
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(card, indent=1))
    return path

