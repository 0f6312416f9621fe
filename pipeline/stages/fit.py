"""The fit stage: train and compare heads on cached features, one leaderboard row per
(cache, tap, task, head), each fitted head saved with the feature specs it needs to be used again.

Which images train and which are scored is the task's evaluation protocol, decided on the first fit
into a run and reused by every later one, by few-shot curves and by ``finetune``; rows are scored, saved
and read through the evaluation service (:mod:`pipeline.evaluation`). A cross-validated head is scored out of fold, then refit on all rows for saving.

Heads hold their training features in memory, except the ``chunked`` ones (``sgd``), which read them
from the cache file ``chunk_rows`` rows at a time, so a cache larger than memory can be fit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from joblib import Parallel, delayed
from joblib.parallel import get_active_backend
from sklearn import config_context
from sklearn.base import clone

from ..cache import FeatureCache, find_caches
from ..errors import Interrupted, PipelineError
from ..fewshot import SHOTS, parse_shots, plan_draws, plot_fewshot, summarise
from ..batched import SLOW_CHUNK, RowChunks, chunk_memory, rows_per_chunk, slow_reads
from ..heads import (check_head_name, create_head, fit_by_chunks, fit_subsets, fits_on_chunks, has_head, head_spec, is_chunked,
                     list_heads)
from ..kinds import TaskKind, get_kind
from ..ood import Reference, reference_name, reference_sample
from ..parallel import local_workers, parallel_backend
from ..progress import progress_bar, say
from ..evaluation import HeadCard, Labelled, Protocol, Row, RunFolder, clean_ranking, open_task, unused_split_note
from ..report import markdown_table, publish, time_summary, write_fewshot
from ..copies import Images, copy_groups, find_copies, leak_message, leaked
from ..similarity import normalized
from ..tasks import Task, TaskData, cache_task, join_task, label_files, read_labels
from ..validation import Settings, at_least, instance_of, jobs, list_of, optional, parse_size, size



COPIES = 3  # float32 copies of a tap's features a head in memory holds: loaded, a fold's rows, their standardised copy


@dataclass
class FitConfig(Settings):
    """How ``fit`` fits: the heads (registry names or ``module:Class`` with ``head_params``; None: each
    task kind's defaults), the taps (default: every tap of each cache), the folds and seed of a task
    without a split, the parallel jobs and where they run, the row chunk of chunked heads, the
    concatenation of all caches as one more backbone, few-shot ``shots`` x ``draws`` (classification),
    ``overwrite`` (replace a run evaluated otherwise), ``max_memory``: the features a head may hold
    (``8GB``, powers of 1024, or a number of bytes; None: no bound; over it, chunked heads read chunks sized to it, shared by the jobs that run
    at once, and the others are refused)
    and ``portable``: knn heads that carry their training features (else they keep the images' ids and
    ``predict`` reads the features from the cache)."""

    heads: Sequence[str] | None = None
    taps: Sequence[str] | None = None
    cv: int = 5
    seed: int = 0
    n_jobs: int = -1
    chunk_rows: int = 65536
    head_params: dict | None = None
    concat: bool = False
    shots: Sequence[int | str] = ()
    draws: int = 5
    backend: str = "loky"
    cluster: str | None = None
    overwrite: bool = False
    max_memory: str | int | None = None
    portable: bool = False

    RULES = dict(heads=optional(list_of(instance_of(str, words="head names"), nonempty=True)), cv=at_least(2), n_jobs=jobs(),
                 chunk_rows=at_least(1), shots=SHOTS, draws=at_least(1), max_memory=optional(size()))

    def checked(self) -> tuple[list[str] | None, dict[str, dict]]:
        """Validate; the heads (each once; None for the kinds' defaults) and the parameters of each
        ``module:Class`` head."""
        self.check()
        heads = None if self.heads is None else list(dict.fromkeys(self.heads))
        user_heads = [h for h in heads or () if ":" in h]
        if self.head_params and not user_heads:
            raise PipelineError("--head-param sets parameters of module:Class heads, and --heads names none")
        for h in heads or ():
            check_head_name(h)  # unknown names fail here, before any work
        return heads, {h: dict(self.head_params or {}) for h in user_heads}

    def heads_for(self, kind: TaskKind, heads: list[str] | None, params: dict[str, dict]) -> list[str]:
        """The heads a task of ``kind`` is fit with: those asked for that the kind has (all its defaults
        when none were asked for); a ``module:Class`` head and its parameters are checked here."""
        chosen = list(kind.default_heads) if heads is None else [h for h in heads if has_head(h, kind.name)]
        for h in chosen:
            create_head(h, self.seed, params.get(h), kind.name)
        return chosen

    def fits_in_memory(self, rows: int, dims: int) -> bool:
        """Whether a head may hold ``rows`` x ``dims`` features in memory (with its copies) under ``max_memory``."""
        return self.max_memory is None or self.memory_to_hold(rows, dims) <= parse_size(self.max_memory)

    @staticmethod
    def memory_to_hold(rows: int, dims: int) -> int:
        """The least ``max_memory`` under which a head holds ``rows`` x ``dims`` features in memory."""
        return rows * dims * 4 * COPIES

    def chunk_rows_for(self, dims: int) -> int:
        """The rows a chunked head reads at a time: ``chunk_rows``, fewer where ``max_memory`` needs."""
        if self.max_memory is None:
            return self.chunk_rows
        return min(self.chunk_rows, rows_per_chunk(self._share(), dims))

    def memory_for_rows(self, rows: int, dims: int) -> int:
        """The least ``max_memory`` under which a chunked head reads ``rows`` rows at a time (the inverse
        of :meth:`chunk_rows_for`)."""
        return chunk_memory(rows, dims) * (1 if self.cluster else local_workers(self.n_jobs))

    def working_memory(self) -> int | None:
        """scikit-learn's ``working_memory`` (MiB) for a job: its share of ``max_memory`` (None: no bound)."""
        return None if self.max_memory is None else max(1, self._share() // 2 ** 20)

    def _share(self) -> int:
        """A job's bytes of ``max_memory``: the jobs that run at once on this machine share it (a
        cluster's workers each have it whole)."""
        return parse_size(self.max_memory) // (1 if self.cluster else local_workers(self.n_jobs))


@dataclass
class FitResult:
    """The run's leaderboard after this fit (best first within each task), the few-shot rows, and where
    everything was written."""

    rows: list[Row]
    out: Path
    files: dict[str, Path]
    fewshot: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not fit, and why
    near_copies: dict[str, str] = field(default_factory=dict)  # task -> "12 val images have a near-copy in train"
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # "stages": wall s; "heads": summed job s

    def markdown(self) -> str:
        return markdown_table(self.rows)

    def time_summary(self) -> str:
        """Where the time went, one line."""
        return time_summary(self.timings)


@dataclass
class _Source:
    """One task's features on one tap of one backbone (or of a concatenation of backbones), in the order
    of its protocol's samples."""

    backbone: str
    weights: str
    spec: str
    tap: str
    data: TaskData
    protocol: Protocol
    parts: list[tuple[Path, FeatureCache]]  # (cache file, its reader): one, or one per concatenated backbone

    def rows(self, head: str, cfg: FitConfig) -> "_Rows":
        """What ``head`` fits on: the features in memory, or read by chunks for a chunked head, in chunks
        within ``cfg.max_memory``; a head that needs the features whole and would exceed it is refused (its
        row says why, and which heads can)."""
        kind, dims = self.protocol.kind, self.dims()
        spec, fits = head_spec(head, kind), cfg.fits_in_memory(len(self.data.rows), dims) and self.data.X is not None
        chunked = spec.chunked or (spec.streams is not None and not fits)
        refused = ""
        if not chunked and not fits:
            can = [h for h in list_heads(kind) if head_spec(h, kind).chunked or head_spec(h, kind).streams]
            refused = (f"{head} holds the features in memory: {len(self.data.rows)} x {dims} float32 with its "
                       f"copies exceed --max-memory {cfg.max_memory}; heads that read by chunks: {', '.join(can)}")
        source = _OnDisk(str(self.parts[0][0]), self.tap, cfg.chunk_rows_for(dims), dims) if chunked else None
        return _Rows(self.data, source, cfg.seed, kind, self.protocol.names, refused)

    def head_name(self, label: str) -> str:
        """What the head ``label`` (see :func:`_head_label`) fitted on this source is saved as in a run."""
        return f"{'+'.join(p.stem for p, _ in self.parts)}__{self.tap}__{self.protocol.task}__{label}"

    def dims(self) -> int:
        """Features per row (the parts' side by side)."""
        if self.data.X is not None:
            return self.data.X.shape[1]
        return sum(cache.info()["taps"][self.tap] for _, cache in self.parts)


def fit(caches: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
        labels: Sequence[str | os.PathLike] = (), *, config: FitConfig | None = None, progress: bool = True,
        **settings) -> FitResult:
    """Fit every head on every (cache, tap, task) and write the run folder ``out``: leaderboard, heads,
    protocols, plots and ``report.html``.

    ``labels`` are label files or folders of them (every ``*.csv``), one task each, beside the caches'
    own labels. Settings are :class:`FitConfig`'s fields, as keywords (``heads=["logreg"], cv=5``) or a
    whole ``config``. Each row has the task kind's metrics with their interval, its chance baseline and
    tests against chance and against the task's best row (see :mod:`pipeline.evaluation.protocol`).

    Into a run that has rows, rows are merged by key; a task whose protocol would differ (other images,
    folds or seed) is refused unless ``overwrite``. The fits run through joblib on ``backend``."""
    started = time.time()
    cfg = replace(config or FitConfig(), **settings)
    heads, params = cfg.checked()
    paths = find_caches([caches] if isinstance(caches, (str, os.PathLike)) else list(caches))
    if cfg.concat and len(paths) < 2:
        raise PipelineError(f"--concat joins the features of several caches, and {len(paths)} was given")
    shots = parse_shots(cfg.shots)
    extra_tasks = [read_labels(p) for p in label_files(labels)]
    run = RunFolder(out)
    _check_writable(run.path)
    made = not run.path.exists()  # by this fit: an interrupted one that kept nothing takes it away again
    load = cfg.concat or bool(shots) or heads is None or any(not is_chunked(h) for h in heads)
    stages: dict[str, float] = {}

    with ExitStack() as stack:
        with _stage(stages, "read features"):
            opened = [(p, stack.enter_context(FeatureCache(p))) for p in paths]
            protocols, sources, joined_notes = _sources(opened, extra_tasks, cfg, run, load)
        with _stage(stages, "near-copy check"):
            copies = _near_copies(sources)
        if cfg.concat:
            sources += _concatenate(sources, len(paths))
        by_kind = {k: cfg.heads_for(get_kind(k), heads, params) for k in dict.fromkeys(p.kind for p in protocols.values())}
        notes = _skipped(heads, by_kind, protocols) + _unseen(protocols) + _left_out(sources) + joined_notes
        notes += [note for p in protocols.values() if (note := p.group_note())]
        warm = _Warm(tuple((h, params.get(h), k) for k, hs in by_kind.items() for h in hs), cfg.working_memory())
        done = {} if cfg.overwrite else _fitted(run, protocols)
        jobs, meta, chunked = [], [], []
        for src in sources:
            splits, refit = src.protocol.splits(), src.protocol.refit() if src.protocol.cross_validated else None
            for head in by_kind[src.protocol.kind]:
                if _current(run, done.get(_key(src, head, params.get(head))), src):
                    continue
                rows = src.rows(head, cfg)
                saved_as = _Keep(run.path, src.head_name(_head_label(head, params.get(head))), cfg.portable)
                jobs.append(delayed(_in_worker)(warm, _fit_one, head, params.get(head), cfg.seed, rows, splits, refit, saved_as))
                meta.append((src, head))
                chunked += [(head, rows.source, len(rows.data.rows))] if rows.source else []
        _say_chunks(chunked, cfg)
        few_jobs, few_meta = _fewshot_jobs(sources, by_kind, params, shots, cfg, warm)
        if shots and any(not get_kind(p.kind).fewshot for p in protocols.values()):
            notes.append("few-shot curves are drawn for classification tasks only")
        kept = sum(len(by_kind[src.protocol.kind]) for src in sources) - len(jobs)
        if kept:
            notes.append(f"{kept} row(s) already in {run.path} under the same protocols and caches: kept, not fitted "
                         "again (--overwrite fits every row again)")
        if cfg.overwrite:
            run.clear()
        for protocol in protocols.values():
            run.save_protocol(protocol)
        rows: list[Row] = []

        def keep(n: int, res: dict) -> None:
            """Save a finished row at once (its head, predictions, leaderboard line): an interrupted fit keeps
            it. What was saved then leaves memory (a row's scores alone are images x classes)."""
            if n < len(jobs):
                with _stage(stages, "save heads"):
                    rows.append(_row(run, *meta[n], params.get(meta[n][1]), res))
                    run.add_rows(rows[-1:])
                _say_row(rows[-1], n, len(jobs))
                for saved in ("y_pred", "scores"):
                    res.pop(saved, None)

        try:
            with _stage(stages, "fit heads"), parallel_backend(cfg.backend, cfg.cluster, cfg.n_jobs):
                results = _run_jobs(jobs + [j for j in few_jobs if j is not None], cfg.n_jobs, progress, keep)
        except KeyboardInterrupt:
            if not rows and made:
                shutil.rmtree(run.path, ignore_errors=True)
                raise Interrupted(f"no row was fitted yet, so {run.path} is not kept; the same command starts "
                                  "again") from None
            raise Interrupted(f"{len(rows)} of {len(jobs)} row(s) fitted and saved in {run.path}; the same command "
                              "fits the others") from None
        stages["fit heads"] = round(stages["fit heads"] - stages.get("save heads", 0.0), 3)
        with _stage(stages, "ood reference"):
            for src in sources:
                _save_ood_reference(run, src, cfg.chunk_rows_for(src.dims()))
    few_results = iter(results[len(jobs):])
    fewshot = [_few_summary(m, next(few_results) if job is not None else None) for m, job in zip(few_meta, few_jobs)]
    per_head: dict[str, float] = {}
    for (_, head), res in zip(meta, results):
        per_head[head] = round(per_head.get(head, 0.0) + res["job_seconds"], 3)

    with _stage(stages, "write leaderboard"):
        all_rows = run.add_rows([])
        notes += list(clean_ranking(all_rows).values())
        files = {"csv": run.artifact("leaderboard_csv"), "json": run.artifact("leaderboard")}
        if fewshot:
            files.update(write_fewshot(fewshot, run))
            for task in dict.fromkeys(r["task"] for r in fewshot):
                files[f"fewshot_{task}"] = plot_fewshot(fewshot, task, run.artifact("fewshot_plot", task))
    timings = dict(stages=stages, heads=per_head)  # the report is written from run.json, so it holds no time of its own
    run.record("fit", dict(caches=[str(p) for p in paths], labels=[str(x) for x in labels],
                           **{**asdict(cfg), "heads": heads}), time.time() - started, timings, notes)
    files.update(publish(run))
    return FitResult(all_rows, run.path, files, fewshot, notes, copies, timings)


@contextmanager
def _stage(stages: dict[str, float], name: str):
    """Add the wall seconds of the block to ``stages[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - start, 3)


def _skipped(heads: list[str] | None, by_kind: dict[str, list[str]], protocols: dict[str, Protocol]) -> list[str]:
    """A note per task kind that was asked for heads it does not have."""
    notes = []
    for kind, chosen in by_kind.items():
        missing = [h for h in heads or () if h not in chosen]
        tasks = ", ".join(t for t, p in protocols.items() if p.kind == kind)
        if missing:
            notes.append(f"{', '.join(missing)}: no {kind} version, not fit on {tasks}")
        if not chosen:
            raise PipelineError(f"none of --heads {','.join(heads)} fits {kind} tasks ({tasks}); "
                                f"{kind} heads: {', '.join(list_heads(kind))}")
    return notes



def _near_copies(sources: list[_Source]) -> dict[str, str]:
    """Per task, how many scored images have a copy among the images their model trains on (pooled
    features of the task's first backbone; candidates across folds confirmed by the images the cache was
    made from, see :mod:`pipeline.copies`), for tasks that have any: ``pipeline audit`` lists them. They
    are set aside in the task's protocol, so every row also has its score without them."""
    found = {}
    for src in sources:
        if src.protocol.cross_validated:
            continue  # its confirmed copies were put in one fold (_copy_groups): none crosses folds
        if src.tap == "pooled" and src.data.X is not None and src.data.task not in found:
            images = Images.of_cache(src.parts[0][1])
            rows, copies = leaked(normalized(src.data.X), src.protocol.ids, src.protocol, images)
            src.protocol.set_aside(rows)
            unread = "" if copies.by_pixels else f" ({copies.rule()})"
            found[src.data.task] = leak_message(len(rows), src.protocol) + unread if len(rows) else ""
    return {task: message for task, message in found.items() if message}


def _copy_groups(labelled: Labelled, cache: FeatureCache, cfg: FitConfig) -> np.ndarray | None:
    """For a task without a split, a group per sample joining its confirmed copies (pooled features of the
    first cache, :mod:`pipeline.copies`), so cross-validation keeps each copy with its original; None for
    a task with a split (its copies across train and val are set aside instead) or features over budget."""
    tap = "pooled" if "pooled" in cache.taps else cache.taps[0]
    if (labelled.splits != "").any() or not cfg.fits_in_memory(len(labelled.ids), cache.info()["taps"][tap]):
        return None
    X = normalized(cache.features(tap, cache.rows_of(labelled.ids)))
    return copy_groups(find_copies(X, labelled.ids, Images.of_cache(cache)), len(labelled.ids))


def _sources(opened: list[tuple[Path, FeatureCache]], extra_tasks: list[Task], cfg: FitConfig, run: RunFolder,
             load: bool) -> tuple[dict[str, Protocol], list[_Source], list[str]]:
    """Each task's protocol (decided on its labelled images that every cache holds valid features of,
    checked against the run's), a source per (cache, tap, task) on the protocol's samples, and a note per
    task on the labelled images this leaves out (in some caches only, or in a split no row uses)."""
    by_task: dict[str, list[tuple[Path, FeatureCache, Task]]] = {}
    given = {t.name for t in extra_tasks}  # a label file replaces a cache's own task of its name
    for path, cache in opened:
        own = [cache_task(cache)] if (cache.labels != "").any() else []
        tasks = [t for t in own if t.name not in given] + extra_tasks
        if not tasks:
            raise PipelineError(f"{path.name} stores no labels; give a label file with --labels id,label[,split][,group]")
        for task in tasks:
            by_task.setdefault(task.name, []).append((path, cache, task))
    protocols, sources, notes = {}, [], []
    for name, entries in by_task.items():
        joined = [join_task(cache, task, load=False) for _, cache, task in entries]
        ref, id_sets = joined[0], [set(j.ids) for j in joined]
        everywhere = set.intersection(*id_sets)
        if not everywhere:
            raise PipelineError(f"task {name!r}: no labelled image has features in every one of its caches "
                                f"({', '.join(path.name for path, _, _ in entries)}); caches fitted together must "
                                "hold the same images: give one of them, or one folder per source")
        keep = np.array([i in everywhere for i in ref.ids], bool)
        notes += [n for n in (_not_everywhere(name, entries, id_sets, everywhere),
                              unused_split_note(name, ref.splits[keep])) if n]
        _check_same_labels(name, joined)
        labelled = Labelled(name, entries[0][2].kind, ref.ids[keep], ref.y[keep], ref.splits[keep],
                            None if ref.groups is None else ref.groups[keep])
        copies = _copy_groups(labelled, entries[0][1], cfg)
        protocol, _ = open_task(labelled, cfg.cv, cfg.seed, run, "replace" if cfg.overwrite else "exact", copies)
        protocols[name] = protocol
        for (path, cache, _), data in zip(entries, joined):
            rows = cache.rows_of(protocol.ids)
            for tap in cfg.taps or cache.taps:
                within = cfg.fits_in_memory(len(rows), cache.info()["taps"][tap]) if tap in cache.taps else True
                task_data = TaskData(task=name, ids=protocol.ids, X=cache.features(tap, rows) if load and within else None,
                                     y=protocol.y, splits=np.full(len(rows), ""), left_out=data.left_out, rows=rows,
                                     kind=protocol.kind)
                sources.append(_Source(cache.backbone, cache.spec.weights_sha256[:12], cache.spec.key, tap, task_data,
                                       protocol, [(path, cache)]))
    return protocols, sources, notes


def _not_everywhere(task: str, entries: list, id_sets: list[set], everywhere: set) -> str:
    """A note when some of a task's labelled images have features in some of its caches but not all
    (``id_sets``: each cache's): caches fitted together are scored on the images they all hold, so these
    are left out."""
    some = len(set().union(*id_sets)) - len(everywhere)
    if not some:
        return ""
    return (f"task {task!r}: {some} labelled image(s) have features in some of its caches but not in every one "
            f"({', '.join(path.name for path, _, _ in entries)}): left out, so that every row is scored on the same images")


def _check_same_labels(task: str, joined: list[TaskData]) -> None:
    ref = dict(zip(joined[0].ids, joined[0].y))
    for data in joined[1:]:
        differ = [i for i, y in zip(data.ids, data.y) if i in ref and ref[i] != y]
        if differ:
            raise PipelineError(f"task {task!r} labels {differ[0]!r} differently in two caches; give its labels "
                                f"as a label file named {task}.csv (--labels {task}.csv), which replaces the "
                                "caches' own")


def _concatenate(sources: list[_Source], n_caches: int) -> list[_Source]:
    """One more source per (tap, task) that every cache has: the caches' features side by side (every
    source of a task holds the same samples in the same order: its protocol's)."""
    groups: dict[tuple[str, str], list[_Source]] = {}
    for src in sources:
        groups.setdefault((src.tap, src.data.task), []).append(src)
    joined = []
    for (tap, task), group in groups.items():
        if len(group) != n_caches:
            continue
        first = group[0]
        data = replace(first.data, X=np.hstack([s.data.X for s in group]))
        joined.append(_Source("+".join(s.backbone for s in group), "+".join(s.weights for s in group),
                              "+".join(s.spec for s in group), tap, data, first.protocol, [p for s in group for p in s.parts]))
    if not joined:
        raise PipelineError("--concat: no tap and task is in every cache")
    return joined


def _fewshot_jobs(sources: list[_Source], by_kind: dict[str, list[str]], params: dict, shots: list, cfg: FitConfig,
                  warm: "_Warm"):
    """A job per (source, head, k) fitting its draws (None where k cannot be drawn), and each job's row;
    for the task kinds that draw few-shot curves."""
    jobs, meta = [], []
    for src in sources:
        if not shots or not get_kind(src.protocol.kind).fewshot:
            continue
        plans, test, split = plan_draws(src.protocol, shots, cfg.draws)
        for head in by_kind[src.protocol.kind]:
            rows = src.rows(head, cfg)
            for k, plan in plans.items():
                meta.append(dict(backbone=src.backbone, weights=src.weights, tap=src.tap, task=src.data.task,
                                 head=_head_label(head, params.get(head)), shots=k,
                                 draws=0 if isinstance(plan, str) else len(plan), eval=split, n_test=len(test),
                                 _skip=plan if isinstance(plan, str) else "", _scored=(src.protocol, test)))
                jobs.append(None if isinstance(plan, str) else
                            delayed(_in_worker)(warm, _fit_draws, head, params.get(head), cfg.seed, rows, plan, test))
    return jobs, meta


def _few_summary(meta: dict, result: dict | None) -> dict:
    """A few-shot row: each draw's predictions scored by the task's protocol on its scored images."""
    meta = dict(meta)
    skip, (protocol, test) = meta.pop("_skip"), meta.pop("_scored")
    preds = result["predictions"] if result else None
    accs = None if preds is None else [protocol.primary_score(test, p) for p in preds]
    return dict(**meta, **summarise(accs), accuracies=accs, error=skip or (result or {}).get("error", ""))


class _OnDisk(NamedTuple):
    """Where a chunked head reads its features: the cache file, its tap, rows per read and features per row."""

    path: str
    tap: str
    step: int
    dims: int


class _Rows:
    """Fit and predict on index sets of a task's rows: features from memory, or, for a chunked head,
    read from the cache file ``chunk_rows`` rows at a time (``source``); a head ``refused`` (the reason)
    fits nothing."""

    def __init__(self, data: TaskData, source: "_OnDisk | None", seed: int, kind: str, names: list[str],
                 refused: str = ""):
        self.data, self.source, self.seed, self.kind, self.names = data, source, seed, kind, names
        self.refused = refused

    @cached_property
    def _y(self) -> np.ndarray:
        """The task's targets as the heads fit them."""
        return get_kind(self.kind).target(self.data.y, self.names)

    @contextmanager
    def _chunks(self) -> Iterator[RowChunks]:
        """The task's rows read from the cache ``source.step`` at a time (from memory where they are loaded)."""
        with FeatureCache(self.source.path) as cache:
            yield RowChunks(lambda rows: self._read(cache, rows), len(self.data.rows), self.source.dims,
                            self.source.step)

    def fit(self, est, idx: np.ndarray):
        if self.source is None:
            return est.fit(self.data.X[idx], self._y[idx])
        rng = np.random.default_rng(self.seed)
        with self._chunks() as X:

            def chunks(epoch: int):
                order = idx if epoch < 0 else rng.permutation(idx)
                for where, x in X.take(order):
                    yield x, self._y[order[where]]

            return fit_by_chunks(est, chunks, np.unique(self._y))

    def fit_subsets(self, est, subsets: list[np.ndarray]) -> Iterable:
        """Clones of ``est`` fitted on each index set (one batched problem where the head allows it; one
        pass over the rows of them all for a head fitted from sums over the rows; else fitted one by one
        as they are iterated)."""
        if self.refused:
            raise PipelineError(self.refused)
        if self.source is None:
            return fit_subsets(est, self.data.X, self._y, subsets)
        if fits_on_chunks(est):
            with self._chunks() as X:
                return fit_subsets(est, X, self._y, subsets)
        return (self.fit(clone(est), idx) for idx in subsets)  # one at a time, as asked: each holds its own state

    def predict_scored(self, est, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Predictions in the task kind's form (classes, tag probabilities, numbers) and what its ranking
        metrics read (class probabilities; None where the head gives none), from one pass over the rows."""
        if self.source is None:
            return get_kind(self.kind).predict_scored(est, self.data.X[idx], self.names)
        with self._chunks() as X:
            parts = [get_kind(self.kind).predict_scored(est, x, self.names) for _, x in X.take(idx)]
        scores = [s for _, s in parts]
        return (np.concatenate([p for p, _ in parts]),
                None if any(s is None for s in scores) else np.concatenate(scores))

    def _read(self, cache: FeatureCache, part: np.ndarray) -> np.ndarray:
        if self.data.X is not None:  # loaded for other heads (or a concatenation): the same rows from memory
            return self.data.X[part]
        return cache.features(self.source.tap, self.data.rows[part])


class _Warm(NamedTuple):
    """What every job sets up first: the sweep's heads (head, params, kind) and scikit-learn's
    ``working_memory`` in MiB (None: its default)."""

    heads: tuple[tuple[str, dict | None, str], ...]
    working_memory: int | None


def _in_worker(warm: _Warm, fn, *args):
    """``fn(*args)`` after building every head of the sweep once, so that a worker's first job loads
    what building any head imports (the mlp's torch). loky takes a worker's memory baseline after its
    first job and replaces a worker that grows 300 MB beyond it: without this, each later job that first
    imported torch got its worker replaced, and the next one paid for the import again. The torch linear
    heads import torch when they fit, not when built: warming that too in every worker raised the
    200,000-row split's peak under ``--max-memory 512MB`` from 1,072 MB to 1,270 MB, so a worker whose
    first torch-logreg fit comes after another head's job may be replaced once, at about 2 s. Under
    ``--max-memory`` scikit-learn's blocks of pairwise distances (a knn head's search, 1 GiB by default)
    get the job's share of it."""
    for head, params, kind in warm.heads:
        create_head(head, 0, params, kind)
    with config_context(**({} if warm.working_memory is None else {"working_memory": warm.working_memory})):
        return fn(*args)


class _Keep(NamedTuple):
    """Where a job saves the model it keeps (the run folder, the head's name), so that the model never
    travels back to ``fit``'s process (a knn index of 10^6 rows x 1,280 features is 1.3 GB, and pickled
    there it was held several times over in both processes); ``portable``: see ``RunFolder.save_model``."""

    run: Path
    name: str
    portable: bool

    def save(self, estimator, training_ids: np.ndarray) -> None:
        RunFolder(self.run).save_model(estimator, self.name, None if self.portable else training_ids)


def _row_error(e: Exception) -> str:
    """A failed row's ``error``, on one line: our own refusals as said, another library's with its type."""
    said = str(e) if isinstance(e, PipelineError) else f"{type(e).__name__}: {e}"
    return " ".join(said.split())[:300]


def _fit_one(head: str, params: dict | None, seed: int, rows: _Rows, splits: list[tuple[np.ndarray, np.ndarray]],
             refit: np.ndarray | None, keep: _Keep) -> dict:
    """Fit ``head`` on each split's training rows and predict its scored rows; after cross-validation,
    also on ``refit`` (all rows). The last model is saved as ``keep`` says. Returns the predictions of the
    scored rows in sample order, their scores, the seconds all of the row's models took to fit, and the
    job's seconds."""
    job_start = time.perf_counter()
    est = create_head(head, seed, params, rows.kind, by_chunks=rows.source is not None)
    scored = np.concatenate([test for _, test in splits])
    order = np.argsort(scored, kind="stable")  # in sample order, as the protocol scores
    place = np.empty(len(order), dtype=np.int64)
    place[order] = np.arange(len(order))  # where each fold's scored rows go in that order
    bounds = np.cumsum([0] + [len(test) for _, test in splits])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start, preds, scores = time.perf_counter(), [], _Scores(len(order))
            subsets = [train for train, _ in splits] + ([] if refit is None else [refit])
            fitted = _timed(rows.fit_subsets(est, subsets))
            seconds = time.perf_counter() - start  # a batched head's whole fit; a generator's comes as it is iterated
            for i, (_, test) in enumerate(splits):
                model, took = next(fitted)
                seconds += took
                y_pred, fold_scores = rows.predict_scored(model, test)
                preds.append(y_pred)
                scores.put(place[bounds[i]:bounds[i + 1]], fold_scores)
                if refit is not None:
                    del model  # before the next fold's model is fitted (a knn index over 10^6 rows is 1 GB)
            if refit is not None:
                model, took = next(fitted)
                seconds += took
            notes = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught})
        keep.save(model, rows.data.ids[subsets[-1]])
    except Exception as e:  # a head that cannot fit this task is a row with an error, not a failed run
        return dict(error=_row_error(e), job_seconds=time.perf_counter() - job_start)
    return dict(y_pred=np.concatenate(preds)[order], seconds=round(seconds, 4),
                scores=scores.values, error="", warnings="; ".join(notes),
                job_seconds=time.perf_counter() - job_start)


class _Scores:
    """A row's scores of its scored samples, in sample order, filled fold by fold (a row of 10^6 images x
    100 classes is then 800 MB once, not three times); None once a fold gives none. float64, as the
    heads give them: a confident head's probabilities near 1 tie in float32, which moves its AUROC
    (sgd on hymenoptera: 0.9411 against 0.9433)."""

    def __init__(self, n: int):
        self.n, self.values, self.missing = n, None, False

    def put(self, at: np.ndarray, fold: np.ndarray | None) -> None:
        if fold is None or self.missing:
            self.missing, self.values = True, None
            return
        if self.values is None:
            self.values = np.empty((self.n, *fold.shape[1:]), dtype=fold.dtype)
        self.values[at] = fold


def _timed(models: Iterable) -> Iterator[tuple[object, float]]:
    """Each model of ``models`` (a list, or a generator fitting each as it is asked for) with the seconds
    it took to come; none is held here once the next is asked for."""
    models, start = iter(models), time.perf_counter()
    for model in models:
        yield model, time.perf_counter() - start
        del model
        start = time.perf_counter()


def _fit_draws(head: str, params: dict | None, seed: int, rows: _Rows, draws: list[np.ndarray], test: np.ndarray) -> dict:
    """Fit ``head`` on each few-shot draw's rows as the leaderboard fits it (the draws as one batched
    problem where the head allows it), and predict ``test``: each draw's predictions, or the first error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = rows.fit_subsets(create_head(head, seed, params, rows.kind, by_chunks=rows.source is not None), draws)
            preds = [rows.predict_scored(est, test)[0] for est in models]  # (a generator fits each draw here)
    except Exception as e:  # a head that cannot fit k shots is a row with an error, not a failed sweep
        return dict(predictions=None, error=_row_error(e))
    return dict(predictions=preds, error="")


def _row(run: RunFolder, src: _Source, head: str, params: dict | None, res: dict) -> Row:
    """The leaderboard row of one fit, scored by the task's protocol, with its predictions saved into the
    run and a card beside the head its job saved (:class:`_Keep`)."""
    protocol, label = src.protocol, _head_label(head, params)
    identity = dict(backbone=src.backbone, weights=src.weights, spec=src.spec, tap=src.tap, head=label,
                    cache=" + ".join(run.relative(p) for p, _ in src.parts), error=res["error"],
                    warnings=res.get("warnings", ""))
    if res["error"]:
        return run.score(protocol, None, **identity)
    card = HeadCard(label, protocol.task, protocol.kind, src.tap, protocol.names, src.backbone, protocol.eval,
                    protocol.id)
    path = run.head_path(src.head_name(label))
    card.parts = [HeadCard.part(cache.spec, str(cache.attrs.get("weights_source", "")), p, path)
                  for p, cache in src.parts]
    card.write(path)
    return run.score(protocol, res["y_pred"], res["scores"], fit_seconds=res["seconds"], head_file=run.relative(path),
                     **identity)


def _save_ood_reference(run: RunFolder, src: _Source, chunk: int) -> None:
    """What ``predict``'s ``ood_score`` of the source's models is a percentile of: the nearest-neighbour
    distances among the images they train on, or a sample of them (:mod:`pipeline.ood`), read from the
    cache ``chunk`` rows at a time when the features are not in memory."""
    train = src.protocol.refit()
    sample = reference_sample(len(train))
    rows = train if sample is None else train[sample]
    if src.data.X is not None:
        X = src.data.X[rows]
    else:
        ids = src.protocol.ids[rows]
        X = np.vstack([np.hstack([cache.features(src.tap, cache.rows_of(ids[k:k + chunk])) for _, cache in src.parts])
                       for k in range(0, len(ids), chunk)])
    reference = Reference.of(X, src.protocol.id, None if sample is None else src.protocol.ids[rows])
    if reference is not None:
        reference.save(run.ood_path(reference_name([p for p, _ in src.parts], src.tap, src.data.task)))


def _head_label(head: str, params: dict | None) -> str:
    """The leaderboard name of a head: ``module:Class(key=value,...)`` when it has parameters."""
    return f"{head}({','.join(f'{k}={v}' for k, v in params.items())})" if params else head


def _left_out(sources: list[_Source]) -> list[str]:
    """A note per task and cache that lacks the features of some of the task's labelled images."""
    said = {(src.data.task, src.parts[0][0]): src.data for src in sources if len(src.parts) == 1 and src.data.dropped}
    return [f"task {task!r}: {data.left_out_note(path.name)} (not extracted yet, unreadable, or no longer in its "
            "source): left out" for (task, path), data in said.items()]


def _unseen(protocols: dict[str, Protocol]) -> list[str]:
    """A note per task whose scored images hold classes or tags no training fold has, and per task with
    classes or tags no scored image has."""
    notes = []
    for p in protocols.values():
        if unseen := p.unseen():
            where = "the " + p.eval + " split" if not p.cross_validated else "a fold's scored images"
            notes.append(f"task {p.task!r}: {', '.join(map(repr, unseen))} only in {where}, never in the images "
                         "trained on: no head can predict it, and every row counts those images wrong")
        if unscored := p.unscored():
            notes.append(f"task {p.task!r}: {', '.join(map(repr, unscored))} in no scored image: the rows' scores say "
                         "nothing of it" + (" (map is the mean over the tags scored images have)" if p.kind == "multilabel" else ""))
    return notes


def _check_writable(out: Path) -> None:
    """Fail before any work when the run folder cannot be made or written (nothing is created yet)."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".pipeline-probe-"):
            pass
    except OSError as e:
        raise PipelineError(f"cannot write the run directory {out}: {e.strerror} ({existing})") from None


def _say_chunks(chunked: list[tuple[str, _OnDisk, int]], cfg: FitConfig) -> None:
    """Before any fit, a line per chunk size saying which heads read their features from the cache by
    chunks and how many rows at a time, under which bound: a small bound makes many small reads."""
    by_step: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for head, source, n in chunked:
        by_step.setdefault((source.step, source.dims), []).append((head, n))
    bound = f" (--max-memory {cfg.max_memory}, shared by the jobs that run at once)" if cfg.max_memory else ""
    for (step, dims), members in by_step.items():
        heads, most = dict.fromkeys(h for h, _ in members), max(n for _, n in members)
        say(f"{', '.join(heads)} read the features from the cache {step:,} row(s) at a time, "
            f"{dims:,} features each{bound}{_slow_reads(step, dims, most, cfg)}")


def _slow_reads(step: int, dims: int, rows: int, cfg: FitConfig) -> str:
    """Where ``--max-memory`` makes reads of fewer than :data:`SLOW_CHUNK` rows (of ``rows``): that it
    costs, and the bound that avoids it (or under which the heads hold the features, if that is less)."""
    if step >= SLOW_CHUNK or not cfg.max_memory:
        return ""
    over = ("; a row is more than a job's share of it, and is read anyway"
            if cfg.memory_for_rows(1, dims) > parse_size(cfg.max_memory) else "")
    return over + slow_reads(step, cfg.memory_for_rows(SLOW_CHUNK, dims), cfg.memory_to_hold(rows, dims))


def _say_row(row: Row, n: int, total: int) -> None:
    """``fit 3/18: knn on hymenoptera (pooled, tf_efficientnet_lite0.in1k): accuracy 0.9608, 0.1 s``: a
    row as it lands, for whoever follows a long fit in its log."""
    kind = get_kind(row.task_kind)
    result = f"{kind.primary} {row.score:.4f}" if row.scored else f"not scored: {row.error}"
    say(f"fit {n + 1}/{total}: {row.head} on {row.task} ({row.tap}, {row.backbone}): {result}, "
        f"{row.fit_seconds or 0:.1f} s", row=n + 1, rows=total, head=row.head, task=row.task, tap=row.tap,
        backbone=row.backbone, **{kind.primary: row.score})


def _run_jobs(jobs: list, n_jobs: int, progress: bool, done: Callable[[int, dict], None] = lambda n, res: None
              ) -> list[dict]:
    """Run joblib jobs (on the backend configured around the call), with a progress bar that advances
    per job, and ``done(n, result)`` called on each, as the backend returns them (in order; Ray's all at
    the end)."""
    backend, _ = get_active_backend()
    streams = getattr(backend, "supports_return_generator", False)
    out = []
    with progress_bar(progress) as bar, warnings.catch_warnings():
        # loky replaces a worker whose memory grew (torch-logreg imports torch) and says so; no job is lost
        warnings.filterwarnings("ignore", "A worker stopped while some jobs were given", UserWarning)
        task = bar.add_task("fit", total=len(jobs))
        for res in Parallel(n_jobs=n_jobs, return_as="generator" if streams else "list")(jobs):
            done(len(out), res)
            out.append(res)
            bar.advance(task)
    return out


def _key(src: _Source, head: str, params: dict | None) -> tuple:
    """The key of the leaderboard row ``head`` makes on ``src`` (:attr:`Row.key`)."""
    return ("fit", src.backbone, src.spec, src.tap, src.data.task, _head_label(head, params), "")


def _fitted(run: RunFolder, protocols: dict[str, Protocol]) -> dict[tuple, Row]:
    """The run's scored rows fitted under the protocols of this fit, by key: a re-run of the same fit (an
    interrupted one, a study with one more head) fits only the others (see :func:`_current`)."""
    return {r.key: r for r in run.rows() if r.stage == "fit" and r.scored and r.task in protocols
            and r.protocol == protocols[r.task].id}


def _current(run: RunFolder, row: Row | None, src: _Source) -> bool:
    """Whether ``row`` is there to keep: its head file exists and is newer than every cache it was fitted
    on (a cache extracted into since, with new or changed images, makes its rows fit again)."""
    head = run.resolve(row.head_file) if row is not None and row.head_file else None
    return head is not None and head.is_file() and all(head.stat().st_mtime >= p.stat().st_mtime for p, _ in src.parts)
