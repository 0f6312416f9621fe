"""The audit stage: what a feature cache says about the data itself, the questions that most often make a
leaderboard lie or a model fail.

- **Label issues**, per task of any kind: out-of-fold predictions (class or tag probabilities, numbers)
  from a head, under the task's evaluation protocol (a run's stored one, or one decided as ``fit``
  decides it), scored by cleanlab (the label quality of every image, ranked most suspicious first;
  its finders mark the label issues).
- **Copies**: pairs of images that are one picture re-encoded, found by :mod:`pipeline.copies`
  (candidates from the embeddings, confirmed by the pixels), pairs across training and evaluation splits
  first; per task, how many scored images have a copy among the images their model trains on (possible
  leakage).
- **Outliers**: images whose ``k`` nearest neighbours are far (mean cosine distance), beyond the upper
  fence of the scores' box plot.
- **A map**: the embeddings in 2-D (UMAP when installed, else t-SNE), coloured by label.

Everything is written into ``out`` as CSV, with ``audit.html``, one static page to look at.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from sklearn.base import BaseEstimator

from ..cache import FeatureCache, find_caches
from ..sources import load_source, location_exists
from ..errors import Interrupted, PipelineError
from ..files import atomic_path
from ..batched import SLOW_CHUNK, RowChunks, chunk_memory, rows_per_chunk, slow_reads
from ..heads import create_head, fit_subsets, fits_on_chunks, has_head, list_heads
from ..progress import say
from ..kinds import get_kind, list_kinds
from ..evaluation import HOLDOUT_SPLITS, Labelled, Protocol, RunFolder, clean_ranking, open_task, unused_split_note
from ..findings import DUPLICATES, MAP, MAP_CSV, OUTLIERS, PAGE, STAGING, AuditResult, Rows, TaskAudit, audit_files, cells, label_issues_file
from ..copies import CANDIDATE_K, Copies, Images, find_copies
from ..copies import leaked as leaked_rows
from ..similarity import BLOCK, Nearest, nearest_others, normalized
from ..tasks import Task, TaskData, cache_task, join_task, label_files, read_labels
from ..validation import Rule, Settings, at_least, between, one_of, optional, parse_size, size, unknown

MAP_METHODS = ("auto", "umap", "tsne", "none")
# float32 copies of the joined features an audit holds at its peak: the features, the search index's
# copy, a fold's rows and the label head's copy (200,000 x 512: the peak less the imports is 3.1 of them)
COPIES = 4
# copies of the class probabilities cleanlab's label-issue finder holds at its peak: the input and two of
# its own (10^6 x 100 float32: 0.8 GB over the input's 0.4 GB)
FINDER_COPIES = 3
FINDER_BATCH = 100_000  # rows its batched finder reads at a time (100 classes, float32: 40 MB)


def scores_labels(head: str, kind: str) -> bool:
    """Whether ``head`` can score labels of ``kind``: a version of it for that kind, with class
    probabilities (``predict_proba``) where one class per image is given, which cleanlab reads."""
    return has_head(head, kind) and (not get_kind(kind).single_label
                                     or hasattr(create_head(head, kind=kind), "predict_proba"))


def _label_head_name(head) -> bool:
    return isinstance(head, str) and (head in ("auto", "run") or any(scores_labels(head, k) for k in list_kinds()))


def held_bytes(rows: int, dims: int) -> int:
    """What an audit holding ``rows`` x ``dims`` float32 features needs: they and their copies."""
    return rows * dims * 4 * COPIES


@dataclass
class AuditConfig(Settings):
    """How ``audit`` looks: the tap; the head whose out-of-fold predictions cleanlab reads (``auto``: see
    :func:`label_head`) and the folds and seed of a task without a split (or of its training images);
    the cosine from which two images are copies when their pixels cannot be read (None: the cache's own,
    see :mod:`pipeline.copies`); the neighbours an outlier score averages over; the map's method and
    most points; how many examples of each finding the page shows; the search block; ``max_memory``, the
    bound on the features and their copies (``8GB``, powers of 1024, or a number of bytes; None: none):
    under it the audit holds every image's features, over it it reads them from the caches by chunks;
    ``overwrite``: replace an earlier audit in the folder (refused otherwise)."""

    tap: str = "pooled"
    head: str = "auto"
    cv: int = 5
    seed: int = 0
    dup_threshold: float | None = None
    k: int = 10
    map: str = "auto"
    map_points: int = 5000
    top: int = 24
    block: int = BLOCK
    max_memory: str | int | None = None
    overwrite: bool = False

    RULES = dict(head=Rule(_label_head_name, "auto, run, a head with class probabilities (logreg, torch-logreg, sgd, ...) "
                                             "or one of tags or numbers (ridge, ...)"),
                 cv=at_least(2), dup_threshold=optional(between(0, 1, low_open=True)), k=at_least(1), map=one_of(*MAP_METHODS),
                 map_points=at_least(10), top=at_least(1), block=at_least(1), max_memory=optional(size()))

    def rows_per_read(self, rows: int, dims: int) -> int | None:
        """None where ``rows`` x ``dims`` features and their copies fit in ``max_memory`` (the audit then
        holds them); else the rows it reads from the caches at a time."""
        if self.max_memory is None or held_bytes(rows, dims) <= parse_size(self.max_memory):
            return None
        return rows_per_chunk(parse_size(self.max_memory), dims)

    def finds_in_batches(self, scores: np.ndarray) -> bool:
        """Whether cleanlab's label-issue finder with its copies of ``scores`` exceeds ``max_memory``: its
        batched finder then flags the label issues, holding a block of rows at a time."""
        return self.max_memory is not None and scores.nbytes * FINDER_COPIES > parse_size(self.max_memory)

    def neighbours(self) -> int:
        """How many nearest others of each image the audit's one search finds: what the outliers and the
        copies' candidates need."""
        return max(self.k, CANDIDATE_K)


def audit(caches: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
          labels: Sequence[str | os.PathLike] = (), *, run: str | os.PathLike | None = None,
          data: str | os.PathLike | None = None, config: AuditConfig | None = None, progress: bool = True,
          **settings) -> AuditResult:
    """Audit the images of ``caches`` (several caches: several backbones over the same images, their
    normalised features side by side) and write the findings into ``out``.

    Tasks are the caches' own labels and each label file in ``labels``. ``run``: a fit run folder whose
    stored protocols score the label issues (else each is decided as ``fit`` decides it); the audit is
    recorded there and its ``report.html`` links to the page. ``data``: the image folder or manifest,
    for thumbnails on the page. ``progress``: say each step as it ends. Settings are :class:`AuditConfig`'s fields."""
    started = time.time()
    cfg = replace(config or AuditConfig(), **settings)
    cfg.check()
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise PipelineError(f"--out must be a folder for the audit's files, got the file {existing}"
                            + (f" (in --out {out})" if existing != out else ""))
    if (out / PAGE).is_file() and not cfg.overwrite:
        raise PipelineError(f"{out} holds an earlier audit ({PAGE}); pass --overwrite to replace it, or another --out")
    run_folder = RunFolder(run) if run is not None else None
    if run_folder is not None and not run_folder.exists:
        raise PipelineError(f"{run} is not a fit run folder (no leaderboard.json)")
    step = _Steps(started, progress)
    with step.said_when_stopped(out), ExitStack() as stack:
        images = _image_paths(data)
        paths = find_caches([caches] if isinstance(caches, (str, os.PathLike)) else list(caches))
        opened = [stack.enter_context(FeatureCache(p)) for p in paths]  # open while an audit by chunks reads them
        found = _load(opened, [read_labels(p) for p in label_files(labels)], cfg, data)
        heads = label_heads([t for t, _ in found.tasks], run_folder, cfg.head)  # a bad --head fails before any work
        if isinstance(found.X, RowChunks):
            for (task, _), head in zip(found.tasks, heads):
                label_head_by_chunks(head, task.kind, cfg.seed)
        step.done(f"features of {len(found.ids)} images, {len(found.tasks)} task{'s' * (len(found.tasks) != 1)}"
                  f"{_read_note(found.X, cfg)}")
        audits = []
        for (task, task_data), head in zip(found.tasks, heads):
            audits.append(_audit_task(task, task_data, head, found, run_folder, cfg))
            if cfg.head not in ("auto", "run", head):
                audits[-1].note = f"--head {cfg.head} cannot score {task.kind} labels, so auto's head did; {audits[-1].note}"
            step.done(f"task {task.name}: labels ranked by {head}, {len(audits[-1].issues)} flagged; "
                      f"{len(audits[-1].leaked)} scored images leaked")
        copies = find_copies(found.X, found.ids, found.pixels, embedding_cosine=cfg.dup_threshold, block=cfg.block,
                             nearest=found.nearest(cfg.neighbours(), cfg.block))
        duplicates = duplicate_rows(copies, found.ids, found.splits)
        step.done(f"copies: {int(copies.confirmed.sum())} pairs confirmed of {len(duplicates)} listed")
        outliers = find_outliers(found.ids, found.labels, found.splits, found.nearest(cfg.neighbours(), cfg.block), cfg.k)
        step.done(f"outliers: {len(outliers.where('outlier'))} of {len(outliers)} images beyond the fence")
        result = AuditResult(out, audits, duplicates, outliers, "", copy_rule=copies.rule(), search=found.search)
        drawn = None
        if cfg.map != "none" and len(found.ids) >= 5:
            coords, shown, result.map_method = embed_2d(found.X, cfg.map, cfg.seed, cfg.map_points)
            drawn = found.ids[shown], coords, found.colour()[shown]
            step.done(f"map: {result.map_method} of {len(shown)} images")
        from ..audit_page import write_page

        with _staged(out) as folder:
            result.files = _write(result, folder)
            if drawn is not None:
                result.files.update(_write_map(folder, *drawn, audits))
            result.files["page"] = write_page(result, images, cfg.top, folder)
        result.files = {name: out / path.name for name, path in result.files.items()}
        if run_folder is not None:
            result.set_aside = _set_aside_suspects(run_folder, audits)
            _record(run_folder, result, paths, labels, cfg, time.time() - started)
    return result


class _Steps:
    """Says each finished step of an audit as it ends (:func:`pipeline.progress.say`): a long audit in a
    log is followed step by step, with the seconds each took."""

    def __init__(self, started: float, progress: bool = True):
        self.last, self.count, self.progress = started, 0, progress

    @contextmanager
    def said_when_stopped(self, out: Path) -> Iterator[None]:
        """Ctrl-C or SIGTERM becomes :class:`Interrupted` saying what the stopped audit left in ``out``."""
        try:
            yield
        except KeyboardInterrupt:
            raise Interrupted(f"audit stopped after {self.count} finished step(s); its files are written only once "
                              f"every step has ended, so {out} holds none of them (an earlier audit's files there "
                              "are untouched); the same command starts it again") from None

    def done(self, what: str) -> None:
        now = time.time()
        if self.progress:
            say(f"audit: {what} ({now - self.last:.1f} s)", step=what, seconds=round(now - self.last, 1))
        self.last, self.count = now, self.count + 1


@dataclass
class _Found:
    """The images every cache holds valid features of: ids, their rows in the first cache, joined
    features, the first cache's labels and splits, and each task with its labelled images."""

    ids: np.ndarray
    cache: FeatureCache  # the first
    rows: np.ndarray
    X: np.ndarray | RowChunks  # read by chunks over --max-memory
    tasks: list[tuple[Task, TaskData]]
    pixels: Images | None  # the images, for the copies' pixel check (None where unreachable)
    _nearest: Nearest | None = None

    @cached_property
    def labels(self) -> np.ndarray:
        return self.cache.labels[self.rows]

    @cached_property
    def splits(self) -> np.ndarray:
        return self.cache.splits[self.rows]

    @cached_property
    def at_row(self) -> np.ndarray:
        """The image (its position in ``ids``) of each row of the first cache, -1 where none is."""
        at = np.full(len(self.cache.ids), -1, dtype=np.int64)
        at[self.rows] = np.arange(len(self.rows))
        return at

    def find(self, ids: np.ndarray) -> np.ndarray:
        """The position of each of ``ids`` among the images, -1 where it is none of them."""
        rows = self.cache.find_rows(ids)
        return np.where(rows >= 0, self.at_row[rows], -1)

    def nearest(self, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Every image's ``k`` nearest others (similarities, indices): one search, made at the first ask
        and shared by the leak check, the copies and the outliers (each takes the first columns it needs)."""
        if self._nearest is None or self._nearest.idx.shape[1] < min(k, len(self.ids) - 1):
            self._nearest = nearest_others(self.X, k, block)
        return self._nearest.sims, self._nearest.idx

    @property
    def search(self) -> str:
        """How the nearest others were found (:func:`~pipeline.similarity.describe_search`), once they were."""
        return self._nearest.search if self._nearest is not None else ""

    def colour(self) -> np.ndarray:
        """What the map colours points by: the first task's labels ("" where it has none)."""
        by_id = dict(zip(self.tasks[0][0].ids, self.tasks[0][0].labels)) if self.tasks else {}
        return np.array([str(by_id.get(i, "")) for i in self.ids], dtype=object)


def _load(opened: list[FeatureCache], extra: list[Task], cfg: AuditConfig, data: str | os.PathLike | None) -> _Found:
    ids, X = joined_features(opened, cfg.tap, cfg.rows_per_read)
    first = opened[0]
    tasks = ([cache_task(first)] if (first.labels != "").any() else []) + extra
    return _Found(ids, first, first.find_rows(ids), X, [(t, join_task(first, t, load=False)) for t in tasks],
                  Images.of_cache(first, data))


def _read_note(X: np.ndarray | RowChunks, cfg: AuditConfig) -> str:
    """What the first step says of an audit over ``--max-memory``: how it reads the features."""
    if not isinstance(X, RowChunks):
        return ""
    slow = slow_reads(X.step, chunk_memory(SLOW_CHUNK, X.shape[1]), held_bytes(*X.shape))
    return (f"; {X.shape[0]} x {X.shape[1]} float32 with its copies exceed --max-memory {cfg.max_memory}, so the "
            f"audit reads them {X.step} rows at a time and searches an index of a byte per feature{slow}")


def joined_features(caches: list[FeatureCache], tap: str,
                    rows_per_read: Callable[[int, int], int | None] | None = None) -> tuple[np.ndarray, np.ndarray | RowChunks]:
    """The ids of the source's images valid in every cache (``FeatureCache.current``, in the first cache's
    order) and their features: each cache's rows
    normalised, side by side, scaled so each row has unit length (cosine similarity is then the mean of
    the backbones'). Where ``rows_per_read(rows, dims)`` gives a number, the features stay in the caches
    (open while they are read), as :class:`~pipeline.batched.RowChunks` reading that many rows at a time."""
    _refuse_several_sources(caches)
    first = caches[0]
    ids, positions = first.ids[first.current].astype(object), [np.flatnonzero(first.current)]
    for c in caches[1:]:
        rows = c.find_rows(ids)
        valid = rows >= 0
        valid[valid] = c.current[rows[valid]]
        ids, positions = ids[valid], [p[valid] for p in positions] + [rows[valid]]
    if not len(ids):
        raise PipelineError("no image of the source has valid features in every cache; several caches must be "
                            "backbones over the same images")
    for c in caches:
        if tap not in c.taps:
            raise unknown("tap", tap, c.taps, f"(the taps of {c.path.name})")

    def read(rows: np.ndarray) -> np.ndarray:
        parts = [normalized(c.features(tap, where[rows]), copy=False) for c, where in zip(caches, positions)]
        if len(parts) == 1:
            return parts[0]
        X = np.hstack(parts)
        X /= np.sqrt(len(parts))
        return X

    dims = sum(c.info()["taps"][tap] for c in caches)
    step = rows_per_read(len(ids), dims) if rows_per_read is not None else None
    return ids, read(np.arange(len(ids))) if step is None else RowChunks(read, len(ids), dims, step)


# The head that scores the labels of one class per image unless --head names one: scikit-learn's plain L2
# logistic regression (C=1) on the unit-length features. On planted flips (benchmarks/label_issues.py)
# it ranks them above logreg (standardised, C tuned by CV to the noisy labels), mlp and knn.
CLASS_LABEL_HEAD = "sklearn.linear_model:LogisticRegression"


def _refuse_several_sources(caches: list[FeatureCache]) -> None:
    """Several caches are backbones over one source's images: caches of sources at different places that
    both still exist (a cache folder holding two sources' caches) are refused, not intersected."""
    places = sorted({str(c.attrs.get("source_location", "")) for c in caches} - {""})
    if sum(map(location_exists, places)) > 1:
        raise PipelineError(f"the caches hold the images of {len(places)} sources ({', '.join(places)}); several caches "
                            "are read as backbones over the same images, so audit one source's caches at a time "
                            "(give their .h5 files)")


def label_head(kind: str, task: str, run: RunFolder | None, head: str = "auto") -> str:
    """The head whose out-of-fold predictions score a task's labels: ``head`` when named; ``auto``:
    :data:`CLASS_LABEL_HEAD` for classes, the kind's first default head for the others (``logreg`` for
    tags, ``ridge`` for numbers); ``run``: the best fitted head of the task in ``run`` that can score
    them (:func:`scores_labels`), else ``auto``'s."""
    if head not in ("auto", "run"):
        if not scores_labels(head, kind):
            raise PipelineError(f"--head {head} cannot score the labels of task {task!r} ({kind}): it needs a "
                                f"{kind} version" + (" with class probabilities" if get_kind(kind).single_label else ""))
        return head
    default = CLASS_LABEL_HEAD if get_kind(kind).single_label else get_kind(kind).default_heads[0]
    rows = run.rows() if run is not None and head == "run" else []
    return next((r.head for r in rows if r.task == task and r.stage == "fit" and r.comparable and r.scored
                 and scores_labels(r.head, kind)), default)


def label_heads(tasks: Sequence[Task], run: RunFolder | None, head: str = "auto") -> list[str]:
    """Each task's :func:`label_head`: a named ``head`` scores the tasks whose kind it can score, the
    others get ``auto``'s (a tags or numbers file beside the classes needs no head of its own); a head
    that can score none of them is an error."""
    named = head not in ("auto", "run")
    if named and tasks and not any(scores_labels(head, t.kind) for t in tasks):
        label_head(tasks[0].kind, tasks[0].name, run, head)  # raises, naming what it lacks
    return [label_head(t.kind, t.name, run, "auto" if named and not scores_labels(head, t.kind) else head)
            for t in tasks]


def label_head_by_chunks(head: str, kind: str, seed: int) -> BaseEstimator:
    """``head`` as it fits on features read by chunks (an audit over ``--max-memory``): the default class
    head, scikit-learn's ``LogisticRegression`` at C=1, is the same model solved by torch's batched L-BFGS
    (:class:`~pipeline.linear_probe.TorchLogisticRegression` with ``Cs=(1.0,)``, scikit-learn's ``tol``
    and ``max_iter``); a head that holds the
    features in memory is refused, naming those that read by chunks."""
    from ..linear_probe import TorchLogisticRegression

    if head == CLASS_LABEL_HEAD:
        return TorchLogisticRegression(Cs=(1.0,), tol=1e-4, max_iter=100, random_state=seed)  # scikit-learn's defaults
    est = create_head(head, seed, kind=kind, by_chunks=True)
    if fits_on_chunks(est):
        return est
    can = [h for h in list_heads(kind) if scores_labels(h, kind) and fits_on_chunks(create_head(h, seed, kind=kind, by_chunks=True))]
    raise PipelineError(f"--head {head} holds the features in memory, which exceed --max-memory here; the {kind} heads "
                        f"that score labels reading by chunks: {', '.join(can)} (or auto)")


def out_of_fold(X: np.ndarray | RowChunks, protocol: Protocol, head: str, cv: int, seed: int) -> np.ndarray:
    """The kind's scores of every sample of ``protocol`` (rows of ``X`` in its order) from a ``head``
    that never saw its label: class or tag probabilities (a column per name of the protocol), or numbers.
    The protocol's own splits predict the scored samples, and ``cv`` folds of the training-only samples
    predict those among themselves; a row is NaN where no fold could. Features read by chunks
    (:class:`~pipeline.batched.RowChunks`) fit :func:`label_head_by_chunks` on every fold at once, and
    their scores are float32, as the features are (half the memory of ten million images' probabilities)."""
    kind, names, y = protocol.task_kind, protocol.names, protocol.y
    out = np.full((len(y), len(names)) if names else len(y), np.nan,
                  dtype=np.float32 if isinstance(X, RowChunks) else np.float64)
    plan = []
    for train, test in protocol.oof_plan(cv, seed):
        try:
            kind.check(y[train], protocol.task, None)
        except PipelineError:
            continue  # one class, no varied tag or one number: nothing to learn from
        plan.append((train, test))
    if isinstance(X, RowChunks):
        models = fit_subsets(label_head_by_chunks(head, kind.name, seed), X, kind.target(y, names), [t for t, _ in plan])
        scorer = np.full(len(y), -1)  # the model that scores each row (-1: none can)
        for i, (_, test) in enumerate(plan):
            scorer[test] = i
        for where, x in X:  # one pass in order, not a scattered read per fold (20 minutes at 10^7)
            here = scorer[where]
            for i in np.unique(here[here >= 0]):  # a class a fold never shows gets probability 0
                at = np.flatnonzero(here == i)
                out[where.start + at] = kind.scores(models[i], x[at], names)
        return out
    for train, test in plan:
        seen = kind.names(y[train])  # a class or tag the fold never shows gets probability 0
        est = create_head(head, seed, kind=kind.name).fit(X[train], kind.target(y[train], seen))
        if names:
            out[test] = 0.0
            out[np.ix_(test, np.searchsorted(names, seen))] = kind.scores(est, X[test], seen)
        else:
            out[test] = kind.scores(est, X[test], seen)
    return out


def _class_issues(y: np.ndarray, names: list[str], probs: np.ndarray,
                  batched: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Self-confidence (the probability of the given class) and confident learning's label issues;
    ``batched``: cleanlab's batched finder (the lowest self-confidence, as many as confident learning
    counts, read a block of rows at a time) instead of pruning by noise rate, which copies ``probs``."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    given = np.searchsorted(names, y.astype(str))
    if len(np.unique(given)) < 2:
        return np.full(len(y), np.nan), np.zeros(len(y), bool), ""
    flagged = _batched_class_issues(given, probs) if batched else find_label_issues(given, probs, n_jobs=1)
    return get_label_quality_scores(given, probs, method="self_confidence"), flagged, ""


def _batched_class_issues(given: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """What cleanlab's ``find_label_issues_batched`` flags (``return_mask=True``), its ``LabelInspector``
    driven as that function drives it, :data:`FINDER_BATCH` rows at a time, and its last step too (no
    issue where the given class is the top prediction) made a block at a time: cleanlab makes that step
    on a copy of every probability (``count._reduce_issues``), 4 GB at ten million images of 100 classes."""
    from cleanlab.experimental.label_issues_batched import LabelInspector
    from cleanlab.internal.constants import FLOATING_POINT_COMPARISON
    from cleanlab.rank import find_top_issues

    # store_results=False: the inspector would keep every score in a Python list (0.4 GB at ten million
    # images); the blocks' score arrays are joined here and ranked as its get_label_issues ranks them
    inspector = LabelInspector(num_class=probs.shape[1], store_results=False, verbose=False, n_jobs=1)
    blocks = [slice(start, start + FINDER_BATCH) for start in range(0, len(given), FINDER_BATCH)]
    for block in blocks:
        inspector.update_confident_thresholds(given[block], probs[block])
    scores = np.concatenate([inspector.score_label_quality(given[block], probs[block]) for block in blocks])
    flagged = np.zeros(len(given), bool)
    flagged[find_top_issues(scores, top=inspector.get_num_issues(silent=True))] = True
    for block in blocks:
        nudged = probs[block].copy()
        nudged[np.arange(len(nudged)), given[block]] += FLOATING_POINT_COMPARISON
        flagged[block] &= nudged.argmax(axis=1) != given[block]
    return flagged


def _tag_issues(y: np.ndarray, names: list[str], probs: np.ndarray,
                batched: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """cleanlab's multi-label quality (each tag's self-confidence, the worst weighted most) and label issues,
    over the tags that some images have and others lack and that the out-of-fold predictions learn
    (:func:`_learnt`); a note names the tags left out so. ``batched``: as :func:`_class_issues`'s."""
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    present = np.zeros((len(y), len(names)), bool)
    for r, tags in enumerate(y):
        present[r, np.searchsorted(names, list(tags))] = True
    varied = np.flatnonzero(present.any(axis=0) & ~present.all(axis=0))  # a tag on every image or none says nothing
    is_learnt = _learnt(present[:, varied], probs[:, varied])
    learnt, unlearnt = varied[is_learnt], [names[t] for t in varied[~is_learnt]]
    note = (f"tags no out-of-fold prediction learns, so not searched for label errors: {', '.join(unlearnt)}"
            if unlearnt else "")
    if not len(learnt):
        return np.full(len(y), np.nan), np.zeros(len(y), bool), note
    if len(learnt) == 1:  # one tag is a yes/no class (cleanlab's multi-label finder takes two tags or more)
        p = probs[:, learnt[0]]
        quality, flagged, _ = _class_issues(np.where(present[:, learnt[0]], "1", "0"), ["0", "1"], np.stack([1 - p, p], 1),
                                            batched)
        return quality, flagged, note
    given = [list(np.flatnonzero(row[learnt])) for row in present]
    return (get_label_quality_scores(given, probs[:, learnt]),
            find_label_issues(given, probs[:, learnt], n_jobs=1, low_memory=batched), note)


def _learnt(present: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per tag (column), whether its out-of-fold probabilities rank the images that have it above those
    that lack it (one-sided Mann-Whitney U, p < 0.05). Where no model learns a tag, disagreeing with the
    model says nothing about a given tag, as a task no row of which is above chance keeps its images
    (:func:`_set_aside_suspects`): a coin-flip tag flagged half the images."""
    from scipy.stats import mannwhitneyu

    return np.array([mannwhitneyu(p[t], p[~t], alternative="greater").pvalue < 0.05 for t, p in zip(present.T, probs.T)],
                    dtype=bool)


def _number_issues(y: np.ndarray, names: list[str], pred: np.ndarray,
                   batched: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """cleanlab's regression label quality (OUTRE: the residual and how unusual it is among its
    neighbours'); flagged: residuals "far out" among the absolute residuals (beyond Q3 + 3 IQR, Tukey's
    outer fence: a wrong label pulls the fit, which widens the others' residuals). One number per image
    holds no copy worth batching, so ``batched`` changes nothing."""
    from cleanlab.regression.rank import get_label_quality_scores

    y = np.asarray(y, dtype=np.float64)
    residual = np.abs(pred - y)
    q1, q3 = np.percentile(residual, [25, 75])
    return get_label_quality_scores(y, pred), residual > q3 + 3 * (q3 - q1), ""


# each kind's label-quality scores, label issues and a note from out-of-fold scores (``out_of_fold``'s rows),
# batched or not
LABEL_FINDERS = {"classification": _class_issues, "multilabel": _tag_issues, "regression": _number_issues}


class LabelRanking(NamedTuple):
    """What :func:`rank_label_issues` finds."""

    order: np.ndarray  # the samples with a score, most suspicious (lowest label quality) first
    quality: np.ndarray  # every sample's label quality (NaN without a score)
    flagged: np.ndarray  # which ones cleanlab's finder flags as label issues
    note: str = ""  # what the finder left out, and why


def rank_label_issues(protocol: Protocol, scores: np.ndarray, batched: bool = False) -> LabelRanking:
    """cleanlab on out-of-fold ``scores`` of ``protocol``'s samples (see :class:`LabelRanking`);
    ``batched``: its finder reading a block of rows at a time (:func:`_class_issues`)."""
    have = np.flatnonzero(~np.isnan(scores.reshape(len(scores), -1)).any(axis=1))
    quality, flagged, note = np.full(len(scores), np.nan), np.zeros(len(scores), bool), ""
    if len(have):
        every = len(have) == len(scores)  # no copy of ten million images' probabilities
        quality[have], flagged[have], note = LABEL_FINDERS[protocol.kind](
            protocol.y if every else protocol.y[have], protocol.names, scores if every else scores[have], batched)
    have = have[~np.isnan(quality[have])]
    return LabelRanking(have[np.argsort(quality[have], kind="stable")], quality, flagged, note)


def duplicate_rows(copies: Copies, ids: np.ndarray, splits: np.ndarray) -> list[dict]:
    """The rows of ``duplicates.csv``: the confirmed copies, then the candidates whose cosine alone would
    call them copies (the embeddings-only threshold) but whose pixels did not; within each, pairs across a
    training and an evaluation split first (the evaluation image as ``id_a``), then by similarity."""
    rows = []
    for n in np.flatnonzero(copies.confirmed | (copies.similarity >= copies.embedding_cosine)):
        i, j = copies.i[n], copies.j[n]
        cross = "train" in (splits[i], splits[j]) and bool({splits[i], splits[j]} & set(HOLDOUT_SPLITS))
        if cross and splits[i] == "train":
            i, j = j, i
        pixel = copies.pixel_similarity[n]
        rows.append(dict(id_a=ids[i], id_b=ids[j], similarity=round(float(copies.similarity[n]), 4),
                         split_a=splits[i], split_b=splits[j], cross=bool(cross),
                         pixel_similarity="" if np.isnan(pixel) else round(float(pixel), 4),
                         confirmed=bool(copies.confirmed[n])))
    return sorted(rows, key=lambda r: (not r["confirmed"], not r["cross"], -r["similarity"]))


def find_outliers(ids: np.ndarray, labels: np.ndarray, splits: np.ndarray, nearest: tuple[np.ndarray, np.ndarray],
                  k: int) -> Rows:
    """Every image's outlier score, the mean cosine distance to its ``k`` nearest other images (the
    first ``k`` of ``nearest``, each image's nearest others by similarity), most outlying first;
    ``outlier`` marks scores beyond the upper fence (Q3 + 1.5 IQR)."""
    sims, idx = (a[:, :k] for a in nearest)
    score = 1.0 - np.nanmean(sims, axis=1) if len(ids) > 1 else np.zeros(len(ids))
    q1, q3 = np.percentile(score, [25, 75])
    has = idx[:, 0] >= 0
    nearest_id, similarity = np.where(has, ids[np.maximum(idx[:, 0], 0)], ""), np.where(has, sims[:, 0], np.nan)
    return Rows(dict(id=cells(ids), label=cells(labels), split=cells(splits), score=cells(score, 4),
                     outlier=cells(score > q3 + 1.5 * (q3 - q1)), nearest_id=cells(nearest_id),
                     nearest_similarity=lambda at: ["" if np.isnan(v) else round(v, 4) for v in similarity[at].tolist()]),
                np.argsort(-score, kind="stable"))


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


def _audit_task(task: Task, data: TaskData, head: str, found: _Found, run: RunFolder | None,
                cfg: AuditConfig) -> TaskAudit:
    """The protocol of a task on the images that have features, the ranking of its labels by ``head``'s
    out-of-fold predictions, and its leaked images."""
    protocol, note = _protocol(task, data, found.at_row[data.rows] >= 0, run, cfg)
    rows = found.find(protocol.ids)
    X = found.X  # every image in order: no copy
    if not np.array_equal(rows, np.arange(len(found.X))):
        X = found.X.take(rows) if isinstance(found.X, RowChunks) else found.X[rows]
    nearest = found.nearest(cfg.neighbours(), cfg.block) if X is found.X else None
    leaked = list(protocol.ids[leaked_rows(X, protocol.ids, protocol, found.pixels, cfg.dup_threshold, cfg.block,
                                           nearest)[0]])
    if protocol.kind not in LABEL_FINDERS:
        return TaskAudit(task.name, protocol, Rows({}, np.arange(0)), leaked, f"no label-issue finder for {protocol.kind} labels")
    scores = out_of_fold(X, protocol, head, cfg.cv, cfg.seed)
    batched = cfg.finds_in_batches(scores)
    order, quality, flagged, found_note = rank_label_issues(protocol, scores, batched)
    kind, suggested = protocol.task_kind, np.empty(len(scores), dtype=object)
    for start in range(0, len(scores), FINDER_BATCH):  # what each suggests, not the scores, stays for the rows
        part = slice(start, start + FINDER_BATCH)  # rows hold text; a number to 4 digits
        suggested[part] = [f"{v:.4g}" if isinstance(v, float) else v for v in kind.prediction(protocol.names, scores[part])]
    ranking = Rows(dict(id=cells(protocol.ids), given=lambda at: kind.format(protocol.y[at]), suggested=cells(suggested),
                        score=cells(quality, 4), flagged=cells(flagged), split=cells(_splits(protocol.ids, data))), order)
    unranked = len(protocol.ids) - len(order)
    solved = " (solved in torch by chunks)" if isinstance(X, RowChunks) and head == CLASS_LABEL_HEAD else ""
    batched = (f"its probabilities with cleanlab's copies exceed --max-memory {cfg.max_memory}, so cleanlab's batched "
               "finder flagged the lowest label quality, as many as confident learning counts") if batched else ""
    note = "; ".join(filter(None, [note, f"labels scored by {head}'s out-of-fold predictions{solved}", batched, found_note,
                                   f"{unranked} images had no fold to predict them, so are not ranked" if unranked else ""]))
    return TaskAudit(task.name, protocol, ranking, leaked, note)


def _splits(ids: np.ndarray, data: TaskData) -> np.ndarray:
    """The split each of ``ids`` has in the task's labels ("" where it has none there)."""
    known, wanted = data.ids.astype(str), ids.astype(str)
    at = np.argsort(known)
    found = at[np.minimum(np.searchsorted(known, wanted, sorter=at), len(at) - 1)]
    return np.where(known[found] == wanted, data.splits[found], "")


def _protocol(task: Task, data: TaskData, keep: np.ndarray, run: RunFolder | None,
              cfg: AuditConfig) -> tuple[Protocol, str]:
    """The run's protocol of the task on its images with features here (``keep``: the evaluation
    service's ``within`` policy), else one decided as ``fit`` decides it."""
    labelled = Labelled(task.name, task.kind, data.ids[keep], data.y[keep], data.splits[keep])
    protocol, note = open_task(labelled, cfg.cv, cfg.seed, run, "within")
    if run is None or run.protocol(task.name) is None:  # decided here, from the labels' splits
        held = note if run is None else f"{run.path} holds no protocol for it; decided as fit decides"
        note = "; ".join(filter(None, [held, unused_split_note(task.name, labelled.splits)]))
    left = f"{data.left_out_note('the cache')}: left out" if data.dropped else ""
    return protocol, "; ".join(filter(None, [note, left]))


def _image_paths(data: str | os.PathLike | None) -> dict[str, Path]:
    """Where each id's image is, from the data folder or manifest (for thumbnails)."""
    if data is None:
        return {}
    return {s.id: s.path for s in load_source(data).samples}


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A folder inside ``out`` that the audit's files are written into; once all of them are, they take
    the place of an earlier audit's files in ``out`` (:func:`~pipeline.findings.audit_files`, removed as a
    whole). An audit stopped before leaves ``out`` as it was."""
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # a stopped audit's
    staging.mkdir(parents=True)
    try:
        yield staging
        for earlier in audit_files(out):
            earlier.unlink()
        for written in staging.iterdir():
            written.replace(out / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(result: AuditResult, out: Path) -> dict[str, Path]:
    files = {}
    for t in result.tasks:
        if t.ranking:
            files[f"label_issues_{t.task}"] = _write_csv(out / label_issues_file(t.task), t.ranking,
                                                         ("id", "given", "suggested", "score", "flagged", "split"))
    files["duplicates"] = _write_csv(out / DUPLICATES, result.duplicates,
                                     ("id_a", "id_b", "similarity", "split_a", "split_b", "cross", "pixel_similarity",
                                      "confirmed"))
    files["outliers"] = _write_csv(out / OUTLIERS, result.outliers,
                                   ("id", "label", "split", "score", "outlier", "nearest_id", "nearest_similarity"))
    return files


def _write_map(out: Path, ids: np.ndarray, coords: np.ndarray, labels: np.ndarray, audits: list[TaskAudit]) -> dict[str, Path]:
    """``map.csv`` (id, x, y, label) and ``map.png``: points coloured by label, the first task's label
    issues ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [dict(id=i, x=round(float(x), 3), y=round(float(y), 3), label=lab) for i, (x, y), lab in zip(ids, coords, labels)]
    files = {"map_csv": _write_csv(out / MAP_CSV, rows, ("id", "x", "y", "label"))}
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
    with atomic_path(out / MAP) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return {**files, "map": out / MAP}


def _write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _set_aside_suspects(run: RunFolder, audits: list[TaskAudit]) -> list[str]:
    """Set aside, in the run's protocol of each task, the scored images whose label the audit flags, and
    score the task's rows again without them: lines saying how many, and whether the ranking holds. (A
    clean score is higher by construction, the images models disagree with being gone: it is there to
    rank by, ``rank_clean``.) A task no row of which is above chance keeps its images."""
    lines = []
    for a in audits:
        protocol = run.protocol(a.task)
        if protocol is None or not a.issues:
            continue
        if not any(r.above_chance for r in run.rows() if r.task == a.task):
            lines.append(f"not set aside in {run.path}: the suspected label errors of {a.task}, as no row of it is above "
                         "chance (where no model learns the labels, disagreeing with one says nothing about it)")
            continue
        suspects = np.intersect1d(np.flatnonzero(np.isin(protocol.ids, [d["id"] for d in a.issues])), protocol.scored)
        if not len(suspects):
            continue
        rows = run.set_aside(a.task, suspects)
        holds = clean_ranking([r for r in rows if r.task == a.task]).get(a.task, "a single ranked row")
        lines.append(f"set aside in {run.path}: {len(suspects)} scored images of {a.task} with a suspected label "
                     f"error (each row's {get_kind(protocol.kind).set_aside_columns[0]}); {holds}")
    return lines


def _record(run: RunFolder, result: AuditResult, caches: list[Path], labels: Sequence, cfg: AuditConfig,
            seconds: float) -> None:
    """Note the audit in the run (``run.json``) and write its report again, which then links to the page."""
    from ..report import publish

    run.record("audit", dict(caches=[str(p) for p in caches], labels=[str(x) for x in labels],
                             out=run.relative(result.out), page=run.relative(result.files["page"]), **asdict(cfg)), seconds)
    publish(run)
