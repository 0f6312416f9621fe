"""The fine-tune stage: go back into the network where a probe is not enough, and show whether it paid.

A fine-tune is scored like every other row of its task: on the images of the task's evaluation
protocol (:mod:`pipeline.evaluation`), taken from the run (``--run``, default ``--init``) so they are the
probes' images. Three rules keep its row honest:

- **It never learns from the images it is scored on.** With a ``val``/``test`` split the network trains
  on ``train``; a cross-validated task is fine-tuned once per fold (``OUT/fold<k>``, trained on the other
  folds), the out-of-fold predictions make its row, and ``OUT`` itself holds a final model trained on
  every image, as a cross-validated head is refit on every image.
- **Its start never saw them either.** ``lp-ft`` starts the classifier from the run's best linear head
  for this task, backbone and weights (its standardisation folded in), refit from the cache on exactly
  the images the network learns from in that fold.
- **Its epoch is chosen without them.** ``select_fraction`` of the training images (seeded, stratified)
  are held out of training and score each epoch; the best of those is kept (``0``: no selection, the
  last epoch is kept and every training image trains).

Strategies come from :mod:`pipeline.strategies`. Each phase (head only, then blocks) has a linear warmup
and a cosine decay. The kept weights are ``model.safetensors`` with timm's ``config.json`` (see
:mod:`pipeline.modeldir`); ``last.pt`` holds the latest state, loaded with ``weights_only=True`` by
``resume`` after a kill or a budget stop.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.base import clone
from timm.data import create_transform
from timm.scheduler import CosineLRScheduler

from ..backbones import Backbone, file_sha256, load_backbone
from ..batches import default_workers, image_batches
from ..cache import FeatureCache
from ..data import Member, Sample, load_image
from ..sources import load_source
from ..errors import Interrupted, PipelineError
from ..evaluation import TRAIN_ONLY, HeadCard, Labelled, Protocol, Row, RunFolder, best_row, open_task, score_row
from ..featurizer import Featurizer
from ..files import atomic_path
from ..heads import read_head
from ..kinds import TaskKind, get_kind
from ..modeldir import MODEL_FILE, write_config
from ..progress import progress_bar, say
from ..report import publish
from ..spec import DECODE_NEW, SPEC_INPUTS, FeatureSpec
from ..strategies import UNFREEZE, get_strategy, list_strategies
from ..tasks import read_labels
from ..validation import Settings, at_least, between, one_of, optional, positive, registered, validate_params

AUGMENTATIONS = ("light", "standard", "none")
BN_MODES = ("freeze", "train")
STATE_FILE, METRICS_FILE = "last.pt", "metrics.json"
_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


@dataclass
class FinetuneConfig(Settings):
    """How to fine-tune. ``strategy`` None means ``lp-ft`` with ``--init``, else ``freeze-unfreeze``;
    ``lr`` None means 1e-4 with ``--init`` (the classifier starts trained; a large step would undo it)
    and 1e-3 without. ``epochs`` counts all epochs, the first ``head_epochs`` training the classifier
    alone. The effective batch is ``batch_size * accum_steps``. ``patience`` epochs without a better
    selection accuracy stop early (None: never). ``cv`` and ``seed`` make the protocol of a task the run
    does not hold yet, ``seed`` also the selection split and the shuffling."""

    strategy: str | None = None
    epochs: int = 5
    head_epochs: int = 1
    unfreeze: str | int = 2
    lr: float | None = None
    backbone_lr_scale: float = 0.1
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    aug: str = "light"
    bn: str = "freeze"
    amp: str = SPEC_INPUTS["amp"].default
    batch_size: int = 32
    accum_steps: int = 1
    patience: int | None = 3
    select_fraction: float = 0.2
    cv: int = 5
    seed: int = 0

    RULES = dict(
        strategy=optional(registered(list_strategies)), unfreeze=UNFREEZE, epochs=at_least(1), head_epochs=at_least(0),
        lr=optional(positive()), backbone_lr_scale=positive(),
        layer_decay=between(0, 1, low_open=True), weight_decay=at_least(0), warmup_epochs=at_least(0),
        label_smoothing=between(0, 1, high_open=True), aug=one_of(*AUGMENTATIONS), bn=one_of(*BN_MODES),
        amp=SPEC_INPUTS["amp"].rule(), batch_size=at_least(1), accum_steps=at_least(1), patience=optional(at_least(1)),
        select_fraction=between(0, 0.5, high_open=True), cv=at_least(2),
    )

    def resolved(self, init: str | os.PathLike | None) -> "FinetuneConfig":
        """Checked, with the defaults that depend on ``init`` filled in."""
        self.check()
        strategy = get_strategy(self.strategy or ("lp-ft" if init is not None else "freeze-unfreeze"))
        if strategy.needs_init and init is None:
            raise PipelineError(f"--strategy {strategy.name} starts the classifier from a fit run's linear head: "
                                "give --init RUN_DIR, or use --strategy freeze-unfreeze")
        return replace(self, strategy=strategy.name, unfreeze=str(self.unfreeze),
                       lr=self.lr if self.lr is not None else (1e-4 if init is not None else 1e-3))


@dataclass
class FinetuneResult:
    """What a fine-tune produced. ``metrics`` are its row's, on the protocol's scored images (out of fold
    for a cross-validated task); ``history`` is the deployed model's training (epoch 0 is the start,
    ``accuracy`` there is on the selection images); ``folds`` summarises each fold's training."""

    out: Path
    strategy: str
    classes: list[str]
    eval_split: str
    n_train: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)
    stopped: str = "finished"  # finished, early-stopping or budget
    steps: int = 0
    resumed_from: dict | None = None
    estimate: dict | None = None
    row: Row | None = None  # the leaderboard row written to ``run``
    folds: list[dict] = field(default_factory=list)
    n_select: int = 0


@dataclass
class _Control:
    """What governs a run but not its result: may change between a killed run and its ``resume``."""

    deadline: float
    checkpoint_minutes: float
    workers: int
    progress: bool
    log: Callable[[str], None]
    device: str
    weights: str | os.PathLike | None


@dataclass
class _Fold:
    """One training: ``folder`` (``OUT`` or ``OUT/fold<k>``), the protocol indices the network learns
    from (selection images included) and those it is scored on (none for a final model)."""

    name: str
    train: np.ndarray
    scored: np.ndarray


@validate_params(dict(budget_minutes=optional(positive()), checkpoint_minutes=at_least(0), workers=optional(at_least(0))))
def finetune(data: str | os.PathLike, backbone: str, out: str | os.PathLike, init: str | os.PathLike | None = None, *,
             run: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
             config: FinetuneConfig | None = None, resume: bool = False, budget_minutes: float | None = None,
             checkpoint_minutes: float = 1.0, workers: int | None = None, weights: str | os.PathLike | None = None,
             device: str = "auto", progress: bool = True, log: Callable[[str], None] | None = None,
             keep_checkpoints: bool = False, **settings) -> FinetuneResult:
    """Fine-tune ``backbone`` on the labels of ``data`` (or of the label file ``labels``) and write the
    kept model to ``out``; its row goes into ``run`` (default ``init``), scored under that run's protocol.

    Settings are :class:`FinetuneConfig`'s fields, as keywords or a whole ``config``. Training stops
    cleanly (resumable) when ``budget_minutes`` would be exceeded; ``last.pt`` is saved after every epoch
    and every ``checkpoint_minutes`` within one; once every training has ended, the checkpoints and the
    folds' own models go (the final model, metrics and predictions stay) unless ``keep_checkpoints``.
    ``log`` receives the lines a user should see."""
    started = time.monotonic()
    cfg = replace(config or FinetuneConfig(), **settings).resolved(init)
    out = Path(out)
    run_dir = Path(run if run is not None else init) if (run or init) is not None else None
    identity = dict(data=str(Path(data).resolve()), backbone=backbone, init=str(Path(init).resolve()) if init else None,
                    labels=str(Path(labels).resolve()) if labels else None, **asdict(cfg))
    if not resume:
        _check_fresh(out)
    ctl = _Control(started + 60 * budget_minutes if budget_minutes else math.inf, checkpoint_minutes,
                   default_workers() if workers is None else workers, progress, log or (lambda message: None), device,
                   weights)
    if cfg.epochs <= cfg.head_epochs:
        ctl.log(f"--epochs {cfg.epochs} with --head-epochs {cfg.head_epochs}: every epoch trains the classifier "
                f"alone and no block of the backbone is trained; --epochs {cfg.head_epochs + 1} or more trains the blocks")
    task_name, kind, by_id = _task(data, labels)
    protocol = _protocol(task_name, kind, by_id, run_dir, cfg, ctl.log)
    folds = _folds(protocol)
    if resume:
        _check_resumable(out, folds)
    samples = [by_id[i][0] for i in protocol.ids]
    bb = load_backbone(backbone, weights, device, cfg.amp, channels_last=True)
    if bb.source != "timm":
        raise PipelineError(f"fine-tuning needs a timm backbone (its classifier and block groups); {backbone} is "
                            f"from {bb.source}: extract it and fit heads on its features instead")
    probe = _Probe(init, protocol, bb.name, bb.weights_sha256) if init is not None else None
    classes = protocol.names
    spec = probe.spec if probe else FeatureSpec(bb.name, bb.weights_sha256, bb.data_config, "float32", bb.amp,
                                                decode=DECODE_NEW)

    done = []
    try:
        for k, fold in enumerate(folds):
            if k:
                bb = load_backbone(backbone, weights, device, cfg.amp, channels_last=True)  # every fold starts afresh
            training = _FoldTraining(fold, out, bb, cfg, protocol, samples, classes, spec, identity, ctl)
            done.append(training.run(probe, resume, len(folds) if k == 0 else 0))
            if done[-1]["stopped"] == "budget":
                break
    except KeyboardInterrupt:
        raise Interrupted(f"{len(done)} of {len(folds)} training(s) finished in {out}; the one under way keeps its "
                          f"{STATE_FILE} (saved after every epoch and every {checkpoint_minutes:g} min); the same "
                          "command with --resume goes on from there") from None
    last = done[-1]
    if not keep_checkpoints and last["stopped"] != "budget":
        _drop_checkpoints(out, folds)
    result = FinetuneResult(out, cfg.strategy, classes, protocol.eval, last["n_train"], last["history"],
                            last["best_epoch"], {}, last["stopped"], last["steps"],
                            next((d["resumed_from"] for d in done if d["resumed_from"]), None),
                            next((d["estimate"] for d in done if d["estimate"]), None), None, done, last["n_select"])
    if len(done) >= sum(1 for f in folds if len(f.scored)):  # every scored image has a prediction
        run_folder = RunFolder(run_dir) if run_dir is not None else None
        row = _row(run_folder, protocol, _Predicted.gather(done), result,
                   dict(backbone=bb.name, weights=spec.weights_sha256[:12], spec=spec.key))
        result.row, result.metrics = row, {**row.metrics, "n_test": row.n_test}
        if run_folder is not None:
            run_folder.record("finetune", identity, time.monotonic() - started)
            result.row = next(r for r in run_folder.add_rows([row]) if r.key == row.key)
            publish(run_folder)
    return result


def _task(data: str | os.PathLike, labels: str | os.PathLike | None) -> tuple[str, TaskKind, dict[str, tuple[Sample, object]]]:
    """The task's name, kind, and labelled samples by id with their label values: the data's own labels
    and splits (classification), or a label file's (its split column, else the data's splits)."""
    src = load_source(data)
    if labels is None:
        kind = get_kind(src.label_kind)
        labelled = [s for s in src.samples if s.label]
        values = kind.parse([s.label for s in labelled], [f"{data}: {s.id}" for s in labelled])
        return src.name, kind, {s.id: (s, v) for s, v in zip(labelled, values)}
    table = read_labels(labels)
    by_id = {s.id: s for s in src.samples}
    missing = [i for i in table.ids if i not in by_id]
    if missing:
        raise PipelineError(f"{labels}: {len(missing)} id(s) not in {data}, e.g. {missing[0]!r}")
    splits = table.splits if table.splits is not None else [by_id[i].split for i in table.ids]
    return table.name, get_kind(table.kind), {i: (replace(by_id[i], split=s), y)
                                             for i, y, s in zip(table.ids, table.labels, splits)}


def _protocol(task: str, kind: TaskKind, by_id: dict[str, tuple[Sample, object]], run_dir: Path | None,
              cfg: FinetuneConfig, log: Callable[[str], None]) -> Protocol:
    """The run's protocol of ``task`` on the images the data labels (the evaluation service's ``within``
    policy), or a new one decided as ``fit`` decides, stored in the run so the row is ranked with the
    heads a later fit adds."""
    run = RunFolder(run_dir) if run_dir is not None else None
    ids = list(by_id)
    labelled = Labelled(task, kind.name, np.array(ids, dtype=object), kind.values([by_id[i][1] for i in ids]),
                        np.array([by_id[i][0].split for i in ids], dtype=object))
    protocol, note = open_task(labelled, cfg.cv, cfg.seed, run, "within")
    if note:
        log(note)
    if run is not None and run.protocol(task) is None:
        run.save_protocol(protocol)
    return protocol


def _folds(protocol: Protocol) -> list[_Fold]:
    """One training for a split; for cross-validation one per fold, then the final one on every image."""
    if not protocol.cross_validated:
        train, scored = protocol.splits()[0]
        return [_Fold("", train, scored)]
    folds = [_Fold(f"fold{k}", train, scored) for k, (train, scored) in enumerate(protocol.splits())]
    return folds + [_Fold("", protocol.refit(), np.array([], np.int64))]


class _Probe:
    """The run's best linear head on pooled features for this task, backbone and weights: where ``lp-ft``
    starts its classifier, and whose cache's feature spec scores the fine-tune."""

    def __init__(self, run_dir: str | os.PathLike, protocol: Protocol, backbone: str, weights_sha256: str):
        run = RunFolder(run_dir)
        rows = [r for r in run.rows() if r.tap == "pooled"]
        row = best_row(rows, protocol.task, linear=True, backbone=backbone, weights=weights_sha256[:12])
        if row is None:
            raise PipelineError(
                f"{run_dir}: no linear head for task {protocol.task!r} fit on {backbone} with these weights; "
                "run `pipeline fit` on this data's cache first")
        self.path = run.resolve(row.head_file)
        part = HeadCard.read(self.path).parts[0]
        self.spec, self.caches = part.spec, part.caches(self.path.parent)
        self.head = read_head(self.path)
        self.kind, self.names = protocol.task_kind, protocol.names

    def start(self, ids: list[str], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Last-layer weights on raw features from the probe's head refit (same hyperparameter search)
        from the cache on exactly the images the network will learn from: it has seen neither the scored
        images nor those that choose the epoch, so epoch 0 is scored as fairly as the others."""
        head = clone(self.head).fit(self._features(ids), self.kind.target(y, self.names))
        return self.kind.linear_start(head, self.names)

    def _features(self, ids: list[str]) -> np.ndarray:
        path = next((c for c in self.caches if c.is_file()), None)
        if path is None:
            raise PipelineError(f"lp-ft refits the probe from its cache on the images the network learns from, "
                                f"and the cache is gone: {', '.join(map(str, self.caches))}")
        with FeatureCache(path) as cache:
            where = {sid: r for r, (sid, ok) in enumerate(zip(cache.ids, cache.valid)) if ok}
            return cache.features("pooled", np.array([where[i] for i in ids]))


@dataclass
class _Training:
    """Where a fold's training stands; saved in ``last.pt`` so a killed run continues from here."""

    epoch: int = 1  # the epoch in progress (1-based)
    done: int = 0  # images of it already trained on
    step: int = 0  # optimizer steps so far, all epochs
    loss_sum: float = 0.0
    loss_n: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    bad_epochs: int = 0
    seconds: float = 0.0  # training time so far, evaluation excluded
    finished: str | None = None  # why it ended (finished, early-stopping); None while it can be resumed


class _FoldTraining:
    """One fold's training, from its start to its kept model and that model's predictions. It runs the
    epochs; its images are a :class:`_FoldData`, its network a :class:`_Network`, its ``last.pt`` a
    :class:`_Checkpoint`, the epoch it keeps an :class:`_EpochSelector`'s choice, its time a :class:`_Clock`."""

    def __init__(self, fold: _Fold, out: Path, bb: Backbone, cfg: FinetuneConfig, protocol: Protocol,
                 samples: list[Sample], classes: list[str], spec: FeatureSpec, identity: dict, ctl: _Control):
        self.fold, self.folder, self.bb, self.cfg, self.ctl = fold, out / fold.name, bb, cfg, ctl
        self.identity, self.spec = identity, spec
        self.data = _FoldData.split(fold, protocol, samples, classes, cfg.select_fraction)
        self.eval = Featurizer(spec, bb)
        self.transform = _train_transform(bb, cfg.aug)
        self.checkpoint = _Checkpoint(self.folder, identity, bb)

    def run(self, probe: "_Probe | None", resume: bool, estimate_folds: int) -> dict:
        """Train (or continue, or skip when finished), then score the kept model; the fold's summary."""
        if resume and _finished(self.folder):
            return json.loads((self.folder / METRICS_FILE).read_text())
        state = self.checkpoint.load() if resume else None
        self.folder.mkdir(parents=True, exist_ok=True)
        resumed_from = self._start(probe, state)
        if not self.t.history:
            self._evaluate(0)
        estimate = self._estimate(estimate_folds) if estimate_folds and self.t.epoch <= self.cfg.epochs else None
        stopped = self._train()
        self.t.finished = stopped if stopped != "budget" else None
        self.checkpoint.save(self.net, self.t)
        return self._finish(stopped, resumed_from, estimate)

    def _start(self, probe: "_Probe | None", state: dict | None) -> dict | None:
        """The network and where training stands: fresh (the classifier from ``probe``'s refit when there
        is one, else a new last layer) or as ``state`` left them; where it resumed from (None: fresh)."""
        data, cfg = self.data, self.cfg
        if probe is not None and state is None:
            start = probe.start([s.id for s in data.train], data.labels(data.train))
        else:
            start = (None, data.kind.initial_bias(data.labels(data.train), data.classes))
        self.net = _Network(self.bb, cfg, data, start)
        self.t = _Training() if state is None else self.checkpoint.restore(state, self.net)
        self.selector = _EpochSelector(self.t, self.folder / MODEL_FILE, cfg.patience if data.select else None)
        if state is None:
            write_config(self.net.model, self.folder, data.classes, self._config())
            return None
        t = self.t
        self.ctl.log(f"resuming {self.checkpoint.path}: epoch {t.epoch} of {cfg.epochs}, {t.done} of "
                     f"{len(data.train)} images done, step {t.step} of {cfg.epochs * self.net.steps_per_epoch}")
        return dict(epoch=t.epoch, done=t.done, step=t.step)

    def _train(self) -> str:
        """Train the epochs left, evaluating after each and saving ``last.pt`` between them; why training
        ended (finished, early-stopping or budget)."""
        cfg, t = self.cfg, self.t
        clock = _Clock(t, self.ctl, t.history[-1]["eval_seconds"])
        with progress_bar(self.ctl.progress) as bar:
            while t.epoch <= cfg.epochs:
                epoch = t.epoch
                if not self._train_epoch(bar, clock):
                    self._evaluate(epoch, partial=True)
                    return "budget"
                self._evaluate(epoch)
                t.epoch, t.done, t.loss_sum, t.loss_n = epoch + 1, 0, 0.0, 0
                if t.epoch > cfg.epochs:
                    break
                if self.selector.exhausted():
                    return "early-stopping"
                if clock.over_budget(time.monotonic()):
                    return "budget"
                self._save(clock)
        return "finished"

    def _train_epoch(self, bar, clock: _Clock) -> bool:
        """Train the rest of epoch ``t.epoch`` (its shuffled order from image ``t.done`` on); False when the
        budget runs out before its end."""
        cfg, t, data, net = self.cfg, self.t, self.data, self.net
        sched = net.start_epoch(t.epoch, t.step)
        todo = [data.train[i] for i in _epoch_order(len(data.train), cfg.seed, t.epoch)[t.done:]]
        label = f"{self.fold.name or 'model'} epoch {t.epoch}/{cfg.epochs} ({_phase(t.epoch, cfg.head_epochs)})"
        task = bar.add_task(label, total=len(data.train), completed=t.done)
        batches = image_batches(todo, self.transform, cfg.batch_size, self.ctl.workers, pin_memory=net.cuda)
        pending = 0
        clock.start()
        for idx, x, failed in batches:
            if x is not None:
                loss = net.backward(x, data.targets([todo[i] for i in idx]))
                t.loss_sum, t.loss_n = t.loss_sum + loss * len(idx), t.loss_n + len(idx)
                pending += 1
            t.done += len(idx) + len(failed)
            bar.update(task, completed=t.done, description=f"{label} loss {t.loss_sum / max(t.loss_n, 1):.4f}")
            if pending == cfg.accum_steps or (t.done == len(data.train) and pending):
                t.step += 1
                net.step(sched, t.epoch, t.step)
                pending = 0
                if t.done < len(data.train) and not self._checkpoint_or_stop(clock):
                    return False
        clock.lap(time.monotonic())
        return True

    def _checkpoint_or_stop(self, clock: _Clock) -> bool:
        """After a step within an epoch: False when one more evaluation would pass the budget (the time
        trained counted); else ``last.pt`` is saved when ``checkpoint_minutes`` have passed."""
        now = time.monotonic()
        if clock.over_budget(now):
            clock.lap(now)
            return False
        if clock.checkpoint_due(now):
            clock.lap(now)
            self._save(clock)
        return True

    def _save(self, clock: _Clock) -> None:
        self.checkpoint.save(self.net, self.t)
        clock.saved()

    def _evaluate(self, epoch: int, partial: bool = False) -> None:
        """Score the selection images (no score without them) and record the evaluation: the selector
        keeps the weights when they are the best so far."""
        t, data = self.t, self.data
        self.net.model.eval()
        begin = time.perf_counter()
        score = self._selection_score() if data.select else None
        entry = dict(epoch=epoch, phase=_phase(epoch, self.cfg.head_epochs), partial=partial,
                     train_loss=t.loss_sum / t.loss_n if t.loss_n else None, metric=data.kind.primary, score=score,
                     n_select=len(data.select), eval_seconds=round(time.perf_counter() - begin, 2),
                     train_seconds=round(t.seconds, 2))
        self.selector.record(entry, self.net.model)
        say(_epoch_line(self.fold.name or "model", entry), fold=self.fold.name or "model", **entry)

    def _selection_score(self) -> float:
        """The task kind's primary metric on the selection images that load."""
        data = self.data
        pred, _ = self._predict(data.select)
        kept = [s for s in data.select if s.id in pred]
        return data.kind.primary_score(data.labels(kept), np.array([pred[s.id] for s in kept]), data.classes)

    def _predict(self, samples: list[Sample], scores: bool = False) -> tuple[dict[str, object], dict[str, list]]:
        """The prediction per sample id, in the task kind's form, through the evaluation feature spec
        (images that fail are left out); with ``scores``, also each one's scores (class probabilities)."""
        kind, classes = self.data.kind, self.data.classes
        out, scored = {}, {}
        for idx, feats, _ in self.eval.batches(samples, ("logits",), self.cfg.batch_size, self.ctl.workers):
            if idx:
                ids = [samples[i].id for i in idx]
                out.update(zip(ids, kind.from_logits(feats["logits"], classes)))
                if scores:
                    scored.update(zip(ids, kind.logit_scores(feats["logits"]).tolist()))
        return out, scored

    def _finish(self, stopped: str, resumed_from: dict | None, estimate: dict | None) -> dict:
        """Load the kept weights, predict the scored images, write the model's config and ``metrics.json``."""
        data, t, model = self.data, self.t, self.net.model
        self.selector.load_kept(model)
        model.eval()
        predicted, scores = self._predict(data.scored, data.kind.needs_scores) if data.scored else ({}, {})
        predictions = dict(zip(predicted, data.kind.format_predictions(np.array(list(predicted.values())), data.classes)))
        write_config(model, self.folder, data.classes, self._config(file_sha256(self.selector.path)))
        summary = dict(fold=self.fold.name, n_train=len(data.train), n_select=len(data.select), n_scored=len(data.scored),
                       best_epoch=t.best["epoch"], stopped=stopped, steps=t.step, seconds=round(t.seconds, 2),
                       resumed_from=resumed_from, estimate=estimate, history=t.history, predictions=predictions,
                       scores=scores, ids=data.ids(), settings=self.identity)
        with atomic_path(self.folder / METRICS_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        return summary

    def _config(self, weights_sha: str | None = None) -> dict:
        """The ``pipeline`` section of the model's ``config.json`` (``weights_sha``: the kept weights')."""
        base_sha = self.bb.weights_sha256
        return dict(backbone=self.bb.name, base_weights_sha256=base_sha, task_kind=self.data.kind.name,
                    feature_spec=self.spec.with_weights(weights_sha or base_sha).to_dict(), settings=self.identity)

    def _estimate(self, folds: int) -> dict:
        """Seconds per epoch, from forward+backward timed on one real batch (:meth:`_Network.seconds_per_pass`)
        and the start's evaluation time; logged with the total for ``folds`` trainings like this one."""
        cfg, data = self.cfg, self.data
        first = data.train[:cfg.batch_size]
        x = next(iter(image_batches(first, self.transform, cfg.batch_size, 0)))[1]
        if x is None:
            raise PipelineError("the first training images failed to load; check the data with `pipeline extract`")
        per_batch = self.net.seconds_per_pass(x, data.targets(data.train[:len(x)])) * len(first) / len(x)
        eval_seconds = self.t.history[-1]["eval_seconds"]
        batches = math.ceil(len(data.train) / cfg.batch_size)
        blocks_epoch = batches * per_batch + eval_seconds
        head_epoch = len(data.train) / max(len(data.select), 1) * eval_seconds + eval_seconds  # forward only
        left = range(self.t.epoch, cfg.epochs + 1)
        total = folds * sum(head_epoch if e <= cfg.head_epochs else blocks_epoch for e in left)
        trainings = f" x {folds} trainings (one per fold, then the final model)" if folds > 1 else ""
        message = (f"estimated {blocks_epoch:.1f} s per epoch with blocks training ({batches} batches x {per_batch:.2f} s "
                   f"forward+backward, measured on one batch, + {eval_seconds:.1f} s evaluation), {head_epoch:.1f} s per "
                   f"head-only epoch; {len(left)} epoch(s){trainings} ~ {total / 60:.1f} min")
        self.ctl.log(message)
        if total > self.ctl.deadline - time.monotonic():
            self.ctl.log("--budget-minutes is less than that: training will stop cleanly when it runs out, keeping "
                         "the best epoch so far (continue with --resume)")
        return dict(seconds_per_batch=round(per_batch, 3), blocks_epoch_seconds=round(blocks_epoch, 1),
                    head_epoch_seconds=round(head_epoch, 1), total_seconds=round(total, 1), message=message)


@dataclass
class _FoldData:
    """A fold's images: ``train`` (the network learns from them), ``select`` (held out of the fold's
    training images, seeded and stratified, to choose the epoch) and ``scored`` (the row's, never learnt
    from), with every image's label by id."""

    train: list[Sample]
    select: list[Sample]
    scored: list[Sample]
    kind: TaskKind
    classes: list[str]
    y: dict[str, object]

    @classmethod
    def split(cls, fold: _Fold, protocol: Protocol, samples: list[Sample], classes: list[str],
              select_fraction: float) -> "_FoldData":
        parts = protocol.subsplit(fold.train, select_fraction) if select_fraction > 0 else None
        learn, select = parts if parts is not None else (fold.train, np.array([], np.int64))
        return cls([samples[i] for i in learn], [samples[i] for i in select], [samples[i] for i in fold.scored],
                   protocol.task_kind, classes, dict(zip(protocol.ids, protocol.y)))

    def labels(self, samples: list[Sample]) -> np.ndarray:
        return self.kind.values([self.y[s.id] for s in samples])

    def targets(self, samples: list[Sample]) -> torch.Tensor:
        """Their labels as the tensor the loss compares the logits with."""
        return self.kind.targets(self.labels(samples), self.classes)

    def ids(self) -> dict[str, list[str]]:
        return dict(train=[s.id for s in self.train], select=[s.id for s in self.select],
                    scored=[s.id for s in self.scored])


class _Network:
    """The network being fine-tuned and how it learns: a new last layer from ``start`` (weights, bias;
    None: timm's initialisation), the strategy's parameter groups (``body`` trains after the head
    epochs), AdamW with a gradient scaler, and each phase's warmup and cosine decay."""

    def __init__(self, bb: Backbone, cfg: FinetuneConfig, data: _FoldData, start: tuple):
        self.bb, self.cfg, self.kind = bb, cfg, data.kind
        self.cuda = bb.device.type == "cuda"
        self.scale = data.kind.loss_scale(data.labels(data.train))
        self.model = _prepare(bb, data.kind.outputs(data.classes), *start)
        groups, self.body = get_strategy(cfg.strategy).param_groups(self.model, cfg)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda and bb.amp == "fp16")
        self.steps_per_epoch = math.ceil(math.ceil(len(data.train) / cfg.batch_size) / cfg.accum_steps)

    def start_epoch(self, epoch: int, step: int) -> CosineLRScheduler:
        """Train the body from the first epoch after the head epochs, in training mode; the schedule of
        ``epoch``'s phase, at global ``step``."""
        for p in self.body:
            p.requires_grad_(epoch > self.cfg.head_epochs)
        _train_mode(self.model, self.cfg.bn)
        return _scheduler(self.opt, self.cfg, self.steps_per_epoch, epoch, step)

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Add a batch's gradients, scaled for accumulation; its loss."""
        loss = self.loss(x.to(self.bb.device, non_blocking=self.cuda), y.to(self.bb.device))
        self.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss.item()

    def step(self, sched: CosineLRScheduler, epoch: int, step: int) -> None:
        """Apply the gradients as optimizer step ``step`` (global, from 1) of ``epoch``'s phase."""
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        sched.step_update(step - _phase_start(epoch, self.cfg.head_epochs, self.steps_per_epoch))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.bb.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.bb.autocast():
            logits = self.model(x)
        return self.kind.loss(logits, y, self.scale, self.cfg.label_smoothing)

    def seconds_per_pass(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward+backward seconds on one batch with the body training: the median of two timed passes
        after a warm-up, with no optimizer step, and the BatchNorm buffers and trained parameters as
        they were."""
        model, device = self.model, self.bb.device
        x, y = x.to(device), y.to(device)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        flags = [p.requires_grad for p in self.body]
        for p in self.body:
            p.requires_grad_(True)
        _train_mode(model, self.cfg.bn)
        timings = []
        for _ in range(3):
            begin = time.perf_counter()
            self.loss(x, y).backward()
            if self.cuda:
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - begin)
        model.zero_grad(set_to_none=True)
        for p, flag in zip(self.body, flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        return float(np.median(timings[1:]))

    def state(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict())

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class _Checkpoint:
    """A training's ``last.pt``: the network's, optimizer's and gradient scaler's states, torch's random
    state and the :class:`_Training` record, with the settings and base weights a resume must match.
    Loaded with ``weights_only=True``, so a foreign file executes no code."""

    def __init__(self, folder: Path, identity: dict, bb: Backbone):
        self.path, self.identity, self.bb = folder / STATE_FILE, identity, bb

    def load(self) -> dict | None:
        """The saved state (None when there is none), after checking it is this run's: same settings,
        same base weights."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a foreign or damaged file
            raise PipelineError(f"{self.path} is not a readable fine-tuning checkpoint: {type(e).__name__}: {e}") from e
        saved = state["settings"]
        diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in self.identity.items() if saved.get(k) != v]
        if diff:
            raise PipelineError(f"--resume continues {self.path} with the settings it started with; these differ: "
                                + ", ".join(diff))
        sha, bb = state["base_weights_sha256"], self.bb
        if sha != bb.weights_sha256:
            raise PipelineError(f"{self.path} was trained from other {bb.name} weights ({sha[:12]}, now "
                                f"{bb.weights_sha256[:12]}); --resume needs the same")
        return state

    def restore(self, state: dict, net: _Network) -> _Training:
        """Put ``net`` and torch's random state back as saved; where training stood."""
        net.load(state)
        torch.set_rng_state(state["torch_rng"])
        return _Training(**state["training"])

    def save(self, net: _Network, t: _Training) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(dict(**net.state(), torch_rng=torch.get_rng_state(), training=t.__dict__,
                            settings=self.identity, base_weights_sha256=self.bb.weights_sha256), tmp)


class _EpochSelector:
    """Which epoch is kept: every evaluation joins the history; the best selection score so far (with no
    selection images every evaluation, so the last) has its weights written to ``path``; ``patience``
    whole epochs in a row without a better one end the training (None: never)."""

    def __init__(self, t: _Training, path: Path, patience: int | None):
        self.t, self.path, self.patience = t, path, patience

    def record(self, entry: dict, model: torch.nn.Module) -> None:
        t = self.t
        t.history.append(entry)
        if t.best is None or entry["score"] is None or entry["score"] > t.best["score"]:
            t.best, t.bad_epochs = entry, 0
            state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            with atomic_path(self.path) as tmp:
                save_file(state_dict, str(tmp))
        elif not entry["partial"]:
            t.bad_epochs += 1

    def exhausted(self) -> bool:
        return self.patience is not None and self.t.bad_epochs >= self.patience

    def load_kept(self, model: torch.nn.Module) -> None:
        model.load_state_dict(load_file(str(self.path)))


class _Clock:
    """A training's time: ``lap`` adds the time trained since the last lap (or ``start``) to
    ``t.seconds``; ``over_budget`` is whether one more evaluation would pass the deadline;
    ``checkpoint_due`` whether ``checkpoint_minutes`` have passed since the last save."""

    def __init__(self, t: _Training, ctl: _Control, eval_seconds: float):
        self.t, self.ctl, self.eval_seconds = t, ctl, eval_seconds
        self.began = self.last_save = time.monotonic()

    def start(self) -> None:
        self.began = time.monotonic()

    def lap(self, now: float) -> None:
        self.t.seconds, self.began = self.t.seconds + now - self.began, now

    def over_budget(self, now: float) -> bool:
        return now + self.eval_seconds > self.ctl.deadline

    def checkpoint_due(self, now: float) -> bool:
        return now - self.last_save >= 60 * self.ctl.checkpoint_minutes

    def saved(self) -> None:
        self.last_save = time.monotonic()


@dataclass
class _Predicted:
    """The scored images' predictions (text cells) and scores (class probabilities, where the kind has a
    metric that ranks), by id, over every fold's training."""

    predictions: dict[str, str]
    scores: dict[str, list]

    @classmethod
    def gather(cls, done: list[dict]) -> "_Predicted":
        return cls({i: p for d in done for i, p in d["predictions"].items()},
                   {i: s for d in done for i, s in d.get("scores", {}).items()})

    def scores_of(self, ids: np.ndarray) -> np.ndarray | None:
        """Their scores in ``ids`` order, or None unless every one has them (a fold trained before scores
        were kept)."""
        return np.array([self.scores[i] for i in ids]) if all(i in self.scores for i in ids) else None


def _row(run: RunFolder | None, protocol: Protocol, predicted: _Predicted, result: FinetuneResult,
         identity: dict) -> Row:
    """The fine-tune's row, scored like every other row of the task (on fewer images, and then not
    ranked with them, only when some could not be decoded); its predictions saved into ``run`` if any."""
    keep = (protocol.folds == TRAIN_ONLY) | np.array([i in predicted.predictions for i in protocol.ids], bool)
    scored_on = protocol if keep.all() else protocol.restricted(keep)
    ids = scored_on.ids[scored_on.scored]
    y_pred = protocol.task_kind.parse_predictions([predicted.predictions[i] for i in ids], protocol.names)
    scores = predicted.scores_of(ids) if protocol.task_kind.needs_scores else None
    note = [f"best epoch {result.best_epoch} of {len(result.history) - 1}"
            + (f" (chosen on {result.n_select} training images held out)" if result.n_select else " (the last)")]
    if result.best_epoch == 0:
        note.append("no gain over the start")
    if result.stopped != "finished":
        note.append(f"stopped by {result.stopped}")
    if protocol.cross_validated:
        note.append(f"{len(result.folds) - 1} fold trainings + a final model on every image")
    identity = dict(identity, tap="finetuned", head=f"finetune:{result.strategy}", stage="finetune",
                    n_train=result.n_train, fit_seconds=round(sum(f["seconds"] for f in result.folds), 2),
                    error="; ".join(note))
    if run is None:
        return score_row(scored_on, y_pred, scores, **identity)
    return run.score(scored_on, y_pred, scores, head_file=run.relative(result.out), **identity)


def _drop_checkpoints(out: Path, folds: list[_Fold]) -> None:
    """Remove what only a resume or an audit of one fold needs: every ``last.pt``, and the models of the
    cross-validation folds (the refit on all images in ``out`` is the model)."""
    for fold in folds:
        (out / fold.name / STATE_FILE).unlink(missing_ok=True)
        if fold.name:
            (out / fold.name / MODEL_FILE).unlink(missing_ok=True)


def _finished(folder: Path) -> str | None:
    """Why the training in ``folder`` ended (finished, early-stopping), or None when it can go on."""
    try:
        stopped = json.loads((folder / METRICS_FILE).read_text())["stopped"]
    except (OSError, ValueError, KeyError):
        return None
    return stopped if stopped != "budget" else None


def _check_resumable(out: Path, folds: list[_Fold]) -> None:
    if all(_finished(out / f.name) for f in folds):
        raise PipelineError(f"nothing to resume: the run in {out} ended ({_finished(out / folds[-1].name)}); its "
                            f"best model is {out / MODEL_FILE}")
    if not any((out / f.name / STATE_FILE).is_file() for f in folds):
        done = " (it finished: its model is there)" if (out / MODEL_FILE).is_file() else ""
        raise PipelineError(f"nothing to resume: {out / STATE_FILE} does not exist{done}")


def _check_fresh(out: Path) -> None:
    """Refuse to train over an earlier run's checkpoints: nothing is lost by a repeated command."""
    for name in (STATE_FILE, MODEL_FILE, f"fold0/{STATE_FILE}"):
        if (out / name).exists():
            raise PipelineError(f"{out} already holds a fine-tuning run ({name}); pass --resume to continue it "
                                "if it was interrupted, or choose another --out")


def _prepare(bb: Backbone, outputs: int, weight: np.ndarray | None, bias: np.ndarray | None) -> torch.nn.Module:
    """The network with a new last layer of ``outputs`` units, starting from ``weight`` and ``bias`` where given."""
    model = bb.model
    model.reset_classifier(outputs)
    head = model.get_classifier().to(bb.device)
    with torch.no_grad():
        if weight is not None:
            head.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            head.bias.copy_(torch.from_numpy(bias))
    return model


def _scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig, steps_per_epoch: int, epoch: int,
               step: int) -> CosineLRScheduler:
    """Warmup then cosine decay over the phase ``epoch`` is in (head only, then blocks), so the blocks
    join at a warmed-up small learning rate, not at the head's peak; set to global ``step``."""
    length = cfg.head_epochs if epoch <= cfg.head_epochs else cfg.epochs - cfg.head_epochs
    for g in opt.param_groups:
        g["initial_lr"] = cfg.lr  # the base the scheduler scales by each group's lr_scale
    steps = max(1, length * steps_per_epoch)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), steps - 1)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=cfg.lr * 0.01, warmup_t=warmup,
                              warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)
    sched.step_update(step - _phase_start(epoch, cfg.head_epochs, steps_per_epoch))
    return sched


def _phase_start(epoch: int, head_epochs: int, steps_per_epoch: int) -> int:
    """The global optimizer step at which ``epoch``'s phase began."""
    return 0 if epoch <= head_epochs else head_epochs * steps_per_epoch


def _epoch_line(name: str, h: dict) -> str:
    """``fold1 epoch 2 (blocks): train loss 0.4123, selection accuracy 0.9130, 41 s``: one evaluation."""
    loss = f"{h['train_loss']:.4f}" if h["train_loss"] is not None else "-"
    chosen = f"selection {h['metric']} {h['score']:.4f}" if h["score"] is not None else "no selection"
    partial = " (partial epoch)" if h["partial"] else ""
    return f"{name} epoch {h['epoch']} ({h['phase']}){partial}: train loss {loss}, {chosen}, {h['train_seconds']:.0f} s"


def _phase(epoch: int, head_epochs: int) -> str:
    return "start" if epoch == 0 else "head" if epoch <= head_epochs else "blocks"


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of an epoch, the same after a resume."""
    order = list(range(n))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def _train_transform(bb: Backbone, aug: str) -> Callable[[Path | Member], torch.Tensor]:
    """An image file to a training tensor. ``none``: the eval transform. ``light``: random resized crop
    of 50-100 % and flips (small data). ``standard``: timm's training defaults (crop of 8-100 %, flips,
    colour jitter 0.4)."""
    cfg = bb.data_config
    if aug == "none":
        transform = create_transform(**cfg, is_training=False)
    else:
        kw = dict(scale=(0.5, 1.0), color_jitter=None) if aug == "light" else {}
        transform = create_transform(cfg["input_size"], is_training=True, interpolation=cfg["interpolation"],
                                     mean=cfg["mean"], std=cfg["std"], **kw)
    return lambda where: transform(load_image(where))


def _train_mode(model: torch.nn.Module, bn: str) -> None:
    """Dropout and drop-path on; BatchNorm running statistics frozen with ``bn="freeze"``."""
    model.train()
    if bn == "freeze":
        for m in model.modules():
            if isinstance(m, _BATCHNORMS):
                m.eval()

