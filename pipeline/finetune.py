"""The fine-tune stage: go back into the network where a probe is not enough, and show whether it paid.

A fine-tune is scored like every other row of its task: on the images of the task's evaluation
protocol (:mod:`pipeline.protocol`), taken from the run (``--run``, default ``--init``) so they are the
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

from .backbones import Backbone, file_sha256, load_backbone
from .devices import AMP
from .batches import default_workers, image_batches
from .cache import FeatureCache
from .data import Member, Sample, load_image
from .sources import load_source
from .errors import PipelineError
from .featurizer import Featurizer
from .files import atomic_path
from .heads import load_head
from .kinds import TaskKind, get_kind
from .modeldir import MODEL_FILE, write_config
from .progress import progress_bar
from .protocol import TRAIN_ONLY, Protocol, decide
from .report import publish
from .runs import Row, RunFolder, best_row
from .spec import FeatureSpec
from .strategies import get_strategy, parse_unfreeze
from .tasks import read_labels
from .validation import at_least, between, check, one_of, optional, positive

AUGMENTATIONS = ("light", "standard", "none")
BN_MODES = ("freeze", "train")
STATE_FILE, METRICS_FILE = "last.pt", "metrics.json"
_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


@dataclass
class FinetuneConfig:
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
    amp: str = "auto"
    batch_size: int = 32
    accum_steps: int = 1
    patience: int | None = 3
    select_fraction: float = 0.2
    cv: int = 5
    seed: int = 0

    RULES = dict(
        epochs=at_least(1), head_epochs=at_least(0), lr=optional(positive()), backbone_lr_scale=positive(),
        layer_decay=between(0, 1, low_open=True), weight_decay=at_least(0), warmup_epochs=at_least(0),
        label_smoothing=between(0, 1, high_open=True), aug=one_of(*AUGMENTATIONS), bn=one_of(*BN_MODES),
        amp=one_of(*AMP), batch_size=at_least(1), accum_steps=at_least(1), patience=optional(at_least(1)),
        select_fraction=between(0, 0.5, high_open=True), cv=at_least(2),
    )

    def resolved(self, init: str | os.PathLike | None) -> "FinetuneConfig":
        """Checked, with the defaults that depend on ``init`` filled in."""
        strategy = get_strategy(self.strategy or ("lp-ft" if init is not None else "freeze-unfreeze"))
        if strategy.needs_init and init is None:
            raise PipelineError(f"--strategy {strategy.name} starts the classifier from a fit run's linear head: "
                                "give --init RUN_DIR, or use --strategy freeze-unfreeze")
        check(asdict(self), self.RULES)
        parse_unfreeze(self.unfreeze)
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


def finetune(data: str | os.PathLike, backbone: str, out: str | os.PathLike, init: str | os.PathLike | None = None, *,
             run: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
             config: FinetuneConfig | None = None, resume: bool = False, budget_minutes: float | None = None,
             checkpoint_minutes: float = 1.0, workers: int | None = None, weights: str | os.PathLike | None = None,
             device: str = "auto", progress: bool = True, log: Callable[[str], None] | None = None,
             **settings) -> FinetuneResult:
    """Fine-tune ``backbone`` on the labels of ``data`` (or of the label file ``labels``) and write the
    kept model to ``out``; its row goes into ``run`` (default ``init``), scored under that run's protocol.

    Settings are :class:`FinetuneConfig`'s fields, as keywords or a whole ``config``. Training stops
    cleanly (resumable) when ``budget_minutes`` would be exceeded; ``last.pt`` is saved after every epoch
    and every ``checkpoint_minutes`` within one. ``log`` receives the lines a user should see."""
    started = time.monotonic()
    cfg = replace(config or FinetuneConfig(), **settings).resolved(init)
    check(dict(budget_minutes=budget_minutes, checkpoint_minutes=checkpoint_minutes, workers=workers),
          dict(budget_minutes=optional(positive()), checkpoint_minutes=at_least(0), workers=optional(at_least(0))))
    out = Path(out)
    run_dir = Path(run if run is not None else init) if (run or init) is not None else None
    identity = dict(data=str(Path(data).resolve()), backbone=backbone, init=str(Path(init).resolve()) if init else None,
                    labels=str(Path(labels).resolve()) if labels else None, **asdict(cfg))
    if not resume:
        _check_fresh(out)
    ctl = _Control(started + 60 * budget_minutes if budget_minutes else math.inf, checkpoint_minutes,
                   default_workers() if workers is None else workers, progress, log or (lambda message: None), device,
                   weights)
    task_name, kind, by_id = _task(data, labels)
    protocol = _protocol(task_name, kind, by_id, run_dir, cfg)
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
    spec = probe.spec if probe else FeatureSpec(bb.name, bb.weights_sha256, bb.data_config, "float32", bb.amp)

    done = []
    for k, fold in enumerate(folds):
        if k:
            bb = load_backbone(backbone, weights, device, cfg.amp, channels_last=True)  # every fold starts afresh
        training = _FoldTraining(fold, out, bb, cfg, protocol, samples, classes, spec, identity, ctl)
        done.append(training.run(probe, resume, len(folds) if k == 0 else 0))
        if done[-1]["stopped"] == "budget":
            break
    last = done[-1]
    result = FinetuneResult(out, cfg.strategy, classes, protocol.eval, last["n_train"], last["history"],
                            last["best_epoch"], {}, last["stopped"], last["steps"],
                            next((d["resumed_from"] for d in done if d["resumed_from"]), None),
                            next((d["estimate"] for d in done if d["estimate"]), None), None, done, last["n_select"])
    if len(done) >= sum(1 for f in folds if len(f.scored)):  # every scored image has a prediction
        result.row, scored = _row(protocol, {i: p for d in done for i, p in d["predictions"].items()}, result,
                                  bb.name, spec)
        result.metrics = {**result.row.metrics, "n_test": result.row.n_test}
        if run_dir is not None:
            result.row = _add_row(RunFolder(run_dir), result.row, scored, out, identity, time.monotonic() - started)
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
              cfg: FinetuneConfig) -> Protocol:
    """The run's protocol of ``task`` (checked against the data), or a new one decided as ``fit`` decides
    (and stored in the run, so the row is ranked with the heads a later fit adds)."""
    run = RunFolder(run_dir) if run_dir is not None else None
    stored = run.protocol(task) if run is not None else None
    if stored is None:
        ids = list(by_id)
        y = np.empty(len(ids), dtype=object)
        y[:] = [by_id[i][1] for i in ids]
        protocol = decide(task, kind, ids, y if kind.name != "regression" else y.astype(np.float64),
                          [by_id[i][0].split for i in ids], cfg.cv, cfg.seed)
        if run is not None:
            run.save_protocol(protocol)
        return protocol
    missing = [i for i in stored.ids if i not in by_id]
    if missing:
        raise PipelineError(f"{run_dir}: task {task!r} is scored on {len(stored.ids)} images, {len(missing)} of them "
                            f"not labelled in the data, e.g. {missing[0]!r}")
    cells = dict(zip(stored.ids, kind.format(stored.y)))
    differ = [i for i in stored.ids if kind.format(np.array([by_id[i][1]], dtype=object))[0] != cells[i]]
    if differ:
        raise PipelineError(f"{run_dir}: task {task!r} labels {differ[0]!r} {cells[differ[0]]!r}, the data "
                            f"{by_id[differ[0]][1]!r}")
    return stored


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
        card = json.loads(self.path.with_suffix(".json").read_text())
        part = card["parts"][0]
        self.spec = FeatureSpec.from_dict(part["spec"])
        self.caches = [self.path.parent / part["cache"], Path(part["cache_abs"])]
        self.head = load_head(self.path)
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

    epoch: int  # the epoch in progress (1-based)
    done: int  # images of it already trained on
    step: int  # optimizer steps so far, all epochs
    loss_sum: float
    loss_n: int
    history: list
    best: dict | None
    bad_epochs: int
    seconds: float  # training time so far, evaluation excluded
    finished: str | None = None  # why it ended (finished, early-stopping); None while it can be resumed


class _FoldTraining:
    """One fold's training, from its start to its kept model and that model's predictions."""

    def __init__(self, fold: _Fold, out: Path, bb: Backbone, cfg: FinetuneConfig, protocol: Protocol,
                 samples: list[Sample], classes: list[str], spec: FeatureSpec, identity: dict, ctl: _Control):
        self.fold, self.folder, self.bb, self.cfg, self.ctl = fold, out / fold.name, bb, cfg, ctl
        self.identity = identity
        parts = protocol.subsplit(fold.train, cfg.select_fraction) if cfg.select_fraction > 0 else None
        learn, select = parts if parts is not None else (fold.train, np.array([], np.int64))
        self.train = [samples[i] for i in learn]
        self.select = [samples[i] for i in select]
        self.scored = [samples[i] for i in fold.scored]
        self.kind, self.classes = protocol.task_kind, classes
        self.y = dict(zip(protocol.ids, protocol.y))
        self.scale = self.kind.loss_scale(self._labels(self.train))
        self.eval = Featurizer(spec, bb)
        self.spec = spec
        self.model: torch.nn.Module | None = None

    def run(self, probe: "_Probe | None", resume: bool, estimate_folds: int) -> dict:
        """Train (or continue, or skip when finished), then score the kept model; the fold's summary."""
        if resume and _finished(self.folder):
            return json.loads((self.folder / METRICS_FILE).read_text())
        state = _load_state(self.folder, self.identity) if resume and (self.folder / STATE_FILE).is_file() else None
        cfg, bb = self.cfg, self.bb
        if state is not None and state["base_weights_sha256"] != bb.weights_sha256:
            raise PipelineError(f"{self.folder / STATE_FILE} was trained from other {bb.name} weights "
                                f"({state['base_weights_sha256'][:12]}, now {bb.weights_sha256[:12]}); --resume needs the same")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.base_sha = bb.weights_sha256
        if probe is not None and state is None:
            start = probe.start([s.id for s in self.train], self._labels(self.train))
        else:
            start = (None, self.kind.initial_bias(self._labels(self.train), self.classes))
        self.model = _prepare(bb, self.kind.outputs(self.classes), *start)
        groups, self.body = get_strategy(cfg.strategy).param_groups(self.model, cfg)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=bb.device.type == "cuda" and bb.amp == "fp16")
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train) / cfg.batch_size) / cfg.accum_steps)
        t = _Training(epoch=1, done=0, step=0, loss_sum=0.0, loss_n=0, history=[], best=None, bad_epochs=0, seconds=0.0)
        resumed_from = None
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["torch_rng"])
            t = _Training(**state["training"])
            resumed_from = dict(epoch=t.epoch, done=t.done, step=t.step)
            self.ctl.log(f"resuming {self.folder / STATE_FILE}: epoch {t.epoch} of {cfg.epochs}, {t.done} of "
                         f"{len(self.train)} images done, step {t.step} of {cfg.epochs * self.steps_per_epoch}")
        else:
            write_config(self.model, self.folder, self.classes, self._config(self.base_sha))
        self.t = t
        if not t.history:
            self._evaluate(0)
        estimate = None
        if estimate_folds and t.epoch <= cfg.epochs:
            estimate = self._estimate(estimate_folds)
        stopped = self._train()
        t.finished = stopped if stopped != "budget" else None
        self._save_state()
        return self._finish(stopped, resumed_from, estimate)

    def _train(self) -> str:
        cfg, bb, t = self.cfg, self.bb, self.t
        cuda = bb.device.type == "cuda"
        transform = _train_transform(bb, cfg.aug)
        last_save = time.monotonic()
        eval_seconds = t.history[-1]["eval_seconds"]
        with progress_bar(self.ctl.progress) as bar:
            while t.epoch <= cfg.epochs:
                epoch, head_epochs = t.epoch, cfg.head_epochs
                for p in self.body:
                    p.requires_grad_(epoch > head_epochs)
                sched = _scheduler(self.opt, cfg, self.steps_per_epoch, epoch, t.step)
                todo = [self.train[i] for i in _epoch_order(len(self.train), cfg.seed, epoch)[t.done:]]
                label = f"{self.fold.name or 'model'} epoch {epoch}/{cfg.epochs} ({_phase(epoch, head_epochs)})"
                task = bar.add_task(label, total=len(self.train), completed=t.done)
                _train_mode(self.model, cfg.bn)
                pending, began = 0, time.monotonic()
                for idx, x, failed in image_batches(todo, transform, cfg.batch_size, self.ctl.workers, pin_memory=cuda):
                    if x is not None:
                        y = self.kind.targets([self.y[todo[i].id] for i in idx], self.classes).to(bb.device)
                        loss = self._loss(x.to(bb.device, non_blocking=cuda), y)
                        self.scaler.scale(loss / cfg.accum_steps).backward()
                        t.loss_sum, t.loss_n = t.loss_sum + loss.item() * len(idx), t.loss_n + len(idx)
                        pending += 1
                    t.done += len(idx) + len(failed)
                    bar.update(task, completed=t.done, description=f"{label} loss {t.loss_sum / max(t.loss_n, 1):.4f}")
                    if pending == cfg.accum_steps or (t.done == len(self.train) and pending):
                        self._step(sched, epoch)
                        pending = 0
                        now = time.monotonic()
                        if t.done < len(self.train) and now + eval_seconds > self.ctl.deadline:
                            t.seconds += now - began
                            self._evaluate(epoch, partial=True)
                            return "budget"
                        if t.done < len(self.train) and now - last_save >= 60 * self.ctl.checkpoint_minutes:
                            t.seconds, began = t.seconds + now - began, now
                            self._save_state()
                            last_save = time.monotonic()
                t.seconds += time.monotonic() - began
                self._evaluate(epoch)
                t.epoch, t.done, t.loss_sum, t.loss_n = epoch + 1, 0, 0.0, 0
                if t.epoch > cfg.epochs:
                    break
                if cfg.patience is not None and self.select and t.bad_epochs >= cfg.patience:
                    return "early-stopping"
                if time.monotonic() + eval_seconds > self.ctl.deadline:
                    return "budget"
                self._save_state()
                last_save = time.monotonic()
        return "finished"

    def _step(self, sched: CosineLRScheduler, epoch: int) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.t.step += 1
        sched.step_update(self.t.step - _phase_start(epoch, self.cfg.head_epochs, self.steps_per_epoch))

    def _evaluate(self, epoch: int, partial: bool = False) -> None:
        """Score the selection images; keep the weights when they are the best so far (every epoch's when
        there is no selection: the last is kept)."""
        t = self.t
        self.model.eval()
        begin = time.perf_counter()
        score = None
        if self.select:
            pred = self._predict(self.select)
            kept = [s for s in self.select if s.id in pred]
            score = self.kind.primary_score(self._labels(kept), np.array([pred[s.id] for s in kept]), self.classes)
        entry = dict(epoch=epoch, phase=_phase(epoch, self.cfg.head_epochs), partial=partial,
                     train_loss=t.loss_sum / t.loss_n if t.loss_n else None, metric=self.kind.primary, score=score,
                     n_select=len(self.select), eval_seconds=round(time.perf_counter() - begin, 2),
                     train_seconds=round(t.seconds, 2))
        t.history.append(entry)
        if t.best is None or score is None or score > t.best["score"]:
            t.best, t.bad_epochs = entry, 0
            state_dict = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            with atomic_path(self.folder / MODEL_FILE) as tmp:
                save_file(state_dict, str(tmp))
        elif not partial:
            t.bad_epochs += 1

    def _predict(self, samples: list[Sample]) -> dict[str, object]:
        """The prediction per sample id, in the task kind's form, through the evaluation feature spec
        (images that fail are left out)."""
        out = {}
        for idx, feats, _ in self.eval.batches(samples, ("logits",), self.cfg.batch_size, self.ctl.workers):
            if idx:
                out.update(zip((samples[i].id for i in idx), self.kind.from_logits(feats["logits"], self.classes)))
        return out

    def _labels(self, samples: list[Sample]) -> np.ndarray:
        y = np.empty(len(samples), dtype=object)
        y[:] = [self.y[s.id] for s in samples]
        return y if self.kind.name != "regression" else y.astype(np.float64)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bb = self.bb
        if bb.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with bb.autocast():
            logits = self.model(x)
        return self.kind.loss(logits, y, self.scale, self.cfg.label_smoothing)

    def _finish(self, stopped: str, resumed_from: dict | None, estimate: dict | None) -> dict:
        """Load the kept weights, predict the scored images, write the model's config and ``metrics.json``."""
        kept = self.folder / MODEL_FILE
        self.model.load_state_dict(load_file(str(kept)))
        self.model.eval()
        predicted = self._predict(self.scored) if self.scored else {}
        predictions = dict(zip(predicted, self.kind.format_predictions(np.array(list(predicted.values())), self.classes)))
        write_config(self.model, self.folder, self.classes, self._config(self.base_sha, file_sha256(kept)))
        t = self.t
        summary = dict(fold=self.fold.name, n_train=len(self.train), n_select=len(self.select), n_scored=len(self.scored),
                       best_epoch=t.best["epoch"], stopped=stopped, steps=t.step, seconds=round(t.seconds, 2),
                       resumed_from=resumed_from, estimate=estimate, history=t.history, predictions=predictions,
                       ids=dict(train=[s.id for s in self.train], select=[s.id for s in self.select],
                                scored=[s.id for s in self.scored]),
                       settings=self.identity)
        with atomic_path(self.folder / METRICS_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        return summary

    def _config(self, base_sha: str, weights_sha: str | None = None) -> dict:
        return dict(backbone=self.bb.name, base_weights_sha256=base_sha, task_kind=self.kind.name,
                    feature_spec=self.spec.with_weights(weights_sha or base_sha).to_dict(), settings=self.identity)

    def _save_state(self) -> None:
        with atomic_path(self.folder / STATE_FILE) as tmp:
            torch.save(dict(
                model=self.model.state_dict(), optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                torch_rng=torch.get_rng_state(), training=self.t.__dict__, settings=self.identity,
                base_weights_sha256=self.base_sha,
            ), tmp)

    def _estimate(self, folds: int) -> dict:
        """Seconds per epoch, from forward+backward timed on one real batch with the blocks unfrozen (two
        timed passes after a warm-up, no optimizer step, BatchNorm buffers restored) and the start's
        evaluation time; logged with the total for ``folds`` trainings like this one."""
        cfg, bb, model = self.cfg, self.bb, self.model
        x = next(iter(image_batches(self.train[:cfg.batch_size], _train_transform(bb, cfg.aug), cfg.batch_size, 0)))[1]
        if x is None:
            raise PipelineError("the first training images failed to load; check the data with `pipeline extract`")
        y = self.kind.targets(self._labels(self.train[:len(x)]), self.classes).to(bb.device)
        x = x.to(bb.device)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        flags = [p.requires_grad for p in self.body]
        for p in self.body:
            p.requires_grad_(True)
        _train_mode(model, cfg.bn)
        timings = []
        for _ in range(3):
            begin = time.perf_counter()
            self._loss(x, y).backward()
            if bb.device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - begin)
        model.zero_grad(set_to_none=True)
        for p, flag in zip(self.body, flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        eval_seconds = self.t.history[-1]["eval_seconds"]
        per_batch = float(np.median(timings[1:])) * len(self.train[:cfg.batch_size]) / len(x)
        batches = math.ceil(len(self.train) / cfg.batch_size)
        blocks_epoch = batches * per_batch + eval_seconds
        head_epoch = len(self.train) / max(len(self.select), 1) * eval_seconds + eval_seconds  # forward only
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


def _row(protocol: Protocol, predictions: dict[str, str], result: FinetuneResult, backbone: str,
         spec: FeatureSpec) -> tuple[Row, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The fine-tune's row, scored like every other row of the task (on fewer images, and then not
    ranked with them, only when some could not be decoded), and its (ids, true, predicted)."""
    keep = (protocol.folds == TRAIN_ONLY) | np.array([i in predictions for i in protocol.ids], bool)
    scored_on = protocol if keep.all() else protocol.restricted(keep)
    ids = scored_on.ids[scored_on.scored]
    y_pred = protocol.task_kind.parse_predictions([predictions[i] for i in ids], protocol.names)
    note = [f"best epoch {result.best_epoch} of {len(result.history) - 1}"
            + (f" (chosen on {result.n_select} training images held out)" if result.n_select else " (the last)")]
    if result.best_epoch == 0:
        note.append("no gain over the start")
    if result.stopped != "finished":
        note.append(f"stopped by {result.stopped}")
    if protocol.cross_validated:
        note.append(f"{len(result.folds) - 1} fold trainings + a final model on every image")
    metrics = scored_on.score(y_pred)
    n_test, p_above_chance = metrics.pop("n_test"), metrics.pop("p_above_chance")
    metrics.pop("n_train")
    row = Row(backbone=backbone, weights=spec.weights_sha256[:12], spec=spec.key, tap="finetuned", task=protocol.task,
              head=f"finetune:{result.strategy}", eval=protocol.eval, protocol=scored_on.id, stage="finetune",
              task_kind=protocol.kind, n_train=result.n_train, n_test=n_test, metrics=metrics,
              fit_seconds=round(sum(f["seconds"] for f in result.folds), 2), p_above_chance=p_above_chance,
              error="; ".join(note))
    return row, (ids, scored_on.y[scored_on.scored], y_pred)


def _add_row(run: RunFolder, row: Row, scored: tuple, out: Path, identity: dict, seconds: float) -> Row:
    """Merge the row into ``run`` (its predictions saved there), rank and test the task again."""
    row.head_file = run.relative(out)
    run.write_predictions(row, *scored)
    run.record("finetune", identity, seconds)
    rows = run.add_rows([row])
    publish(run)
    return next(r for r in rows if r.key == row.key)


def _finished(folder: Path) -> str | None:
    """Why the training in ``folder`` ended (finished, early-stopping), or None when it can go on."""
    try:
        stopped = json.loads((folder / METRICS_FILE).read_text())["stopped"]
    except (OSError, ValueError, KeyError):
        return None
    return stopped if stopped != "budget" else None


def _check_resumable(out: Path, folds: list[_Fold]) -> None:
    if not any((out / f.name / STATE_FILE).is_file() for f in folds):
        done = " (it finished: its model is there)" if (out / MODEL_FILE).is_file() else ""
        raise PipelineError(f"nothing to resume: {out / STATE_FILE} does not exist{done}")
    if all(_finished(out / f.name) for f in folds):
        raise PipelineError(f"nothing to resume: the run in {out} ended ({_finished(out / folds[-1].name)}); its "
                            f"best model is {out / MODEL_FILE}")


def _check_fresh(out: Path) -> None:
    """Refuse to train over an earlier run's checkpoints: nothing is lost by a repeated command."""
    for name in (STATE_FILE, MODEL_FILE, f"fold0/{STATE_FILE}"):
        if (out / name).exists():
            raise PipelineError(f"{out} already holds a fine-tuning run ({name}); pass --resume to continue it "
                                "if it was interrupted, or choose another --out")


def _load_state(folder: Path, identity: dict) -> dict:
    """``last.pt``, loaded without executing code (``weights_only``), after checking it is this run's."""
    path = folder / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file
        raise PipelineError(f"{path} is not a readable fine-tuning checkpoint: {type(e).__name__}: {e}") from e
    diff = [f"{k} {state['settings'].get(k)!r} -> {v!r}" for k, v in identity.items() if state["settings"].get(k) != v]
    if diff:
        raise PipelineError(f"--resume continues {path} with the settings it started with; these differ: "
                            + ", ".join(diff))
    return state


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

