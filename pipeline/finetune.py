"""The fine-tune stage: go back into the network where a probe is not enough, and show whether it paid.

Strategies (``strategy``):

- ``lp-ft``: the classifier starts from the best linear head ``fit`` found (its standardisation folded
  into the weights), trains alone for ``head_epochs``, then the top ``unfreeze`` block groups join at
  ``lr * backbone_lr_scale`` (Kumar et al. 2022, "Fine-tuning can distort pretrained features").
- ``freeze-unfreeze``: the same two phases from a fresh classifier (or from ``init`` when given).
- ``discriminative``: after the head epochs every block trains, at ``lr * layer_decay ** depth`` with
  depth counted from the top (timm's layer-wise decay groups).

Each phase has a linear warmup and a cosine decay (timm's scheduler, per optimizer step). The held-out
split is evaluated before training and after every epoch with ``fit``'s metrics; the best epoch's
weights are ``model.safetensors`` with timm's ``config.json`` beside it (so ``timm.create_model
("local-dir:OUT")`` loads it too). ``last.pt`` holds the latest model and optimizer state, loaded
with ``weights_only=True`` by ``resume`` after a kill or a budget stop.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from timm.data import create_transform
from timm.models import group_parameters
from timm.models._hub import save_config_for_hf
from timm.optim import param_groups_layer_decay
from timm.scheduler import CosineLRScheduler

from .backbones import Backbone, load_backbone
from .data import Sample, load_source
from .errors import PipelineError
from .extract import default_workers, forward_batches, image_batches
from .files import atomic_path
from .fit import best_row
from .heads import load_head
from .progress import progress_bar
from .report import read_leaderboard, update_leaderboard, write_run_info
from .tasks import HOLDOUT_SPLITS

STRATEGIES = ("lp-ft", "freeze-unfreeze", "discriminative")
AUGMENTATIONS = ("light", "standard", "none")
BN_MODES = ("freeze", "train")
MODEL_FILE, CONFIG_FILE, STATE_FILE, METRICS_FILE = "model.safetensors", "config.json", "last.pt", "metrics.json"
_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
# Settings that may change between a killed run and its --resume; every other one must match.
_RESUMABLE = ("budget_minutes", "checkpoint_minutes", "workers", "device", "progress")


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced; ``metrics`` are the best epoch's, on ``eval_split``."""

    out: Path
    strategy: str
    classes: list[str]
    eval_split: str
    n_train: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per evaluation; epoch 0 is before training
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)
    stopped: str = "finished"  # finished, early-stopping or budget
    steps: int = 0
    resumed_from: dict | None = None
    estimate: dict | None = None
    row: dict | None = None  # the leaderboard row written to ``run``


def finetune(
    data: str | os.PathLike,
    backbone: str,
    out: str | os.PathLike,
    init: str | os.PathLike | None = None,
    strategy: str | None = None,
    epochs: int = 5,
    head_epochs: int = 1,
    unfreeze: str | int = 2,
    lr: float | None = None,
    backbone_lr_scale: float = 0.1,
    layer_decay: float = 0.75,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0.5,
    label_smoothing: float = 0.0,
    aug: str = "light",
    bn: str = "freeze",
    amp: str = "auto",
    batch_size: int = 32,
    accum_steps: int = 1,
    patience: int | None = 3,
    budget_minutes: float | None = None,
    checkpoint_minutes: float = 1.0,
    resume: bool = False,
    run: str | os.PathLike | None = None,
    workers: int | None = None,
    weights: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``backbone`` on the labels of ``data`` with ``strategy`` (default ``lp-ft`` with
    ``init``, else ``freeze-unfreeze``) and write the best checkpoint to ``out``.

    ``epochs`` counts all epochs, the first ``head_epochs`` of them training the classifier alone.
    ``lr=None`` means 1e-4 with ``init`` (the classifier starts trained; a large step would undo it) and
    1e-3 without. The effective batch is ``batch_size * accum_steps``. Training stops early after
    ``patience`` epochs without a better held-out accuracy, and cleanly (resumable) when
    ``budget_minutes`` would be exceeded. The result is appended to the leaderboard of ``run`` (default:
    ``init``) as the row ``finetune:<strategy>``. ``log`` receives the lines a user should see (the time
    estimate, a resume).
    """
    start_time = time.monotonic()
    log = log or (lambda message: None)
    strategy = strategy or ("lp-ft" if init is not None else "freeze-unfreeze")
    top = _check_settings(strategy, init, epochs, head_epochs, unfreeze, lr, backbone_lr_scale, layer_decay,
                          weight_decay, warmup_epochs, label_smoothing, aug, bn, batch_size, accum_steps, patience,
                          budget_minutes, checkpoint_minutes)
    out = Path(out)
    run = run if run is not None else init
    lr = lr if lr is not None else (1e-4 if init is not None else 1e-3)
    settings = dict(
        data=str(Path(data).resolve()), backbone=backbone, init=str(Path(init).resolve()) if init else None,
        strategy=strategy, epochs=epochs, head_epochs=head_epochs, unfreeze=str(unfreeze), lr=lr,
        backbone_lr_scale=backbone_lr_scale, layer_decay=layer_decay, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, aug=aug, bn=bn, amp=amp,
        batch_size=batch_size, accum_steps=accum_steps, patience=patience, seed=seed,
    )
    state = _load_state(out, settings) if resume else _check_fresh(out)

    torch.manual_seed(seed)
    src = load_source(data)
    train, held, split = _split(list(src.samples), seed)
    bb = load_backbone(backbone, weights, device, amp=amp, channels_last=True)
    if state is not None and state["base_weights_sha256"] != bb.weights_sha256:
        raise PipelineError(f"{out / STATE_FILE} was trained from other {backbone} weights "
                            f"({state['base_weights_sha256'][:12]}, now {bb.weights_sha256[:12]}); --resume needs the same")
    if init is not None:
        classes, weight, bias = _linear_init(init, src.name, backbone, bb.weights_sha256)
    else:
        classes, weight, bias = sorted({s.label for s in train}), None, None
    unknown = sorted({s.label for s in train + held} - set(classes))
    if unknown:
        raise PipelineError(f"labels {unknown} are not classes of the --init head ({classes})")
    index = {c: i for i, c in enumerate(classes)}
    base_sha = bb.weights_sha256
    model = _prepare(bb, len(classes), weight, bias)
    groups, body = _param_groups(model, strategy, top, backbone_lr_scale, layer_decay, weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    cuda = bb.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and bb.amp == "fp16")
    batches = math.ceil(len(train) / batch_size)
    steps_per_epoch = math.ceil(batches / accum_steps)
    workers = default_workers() if workers is None else workers
    train_tf = _train_transform(bb, aug)

    t = _Training(epoch=1, done=0, step=0, loss_sum=0.0, loss_n=0, history=[], best=None, bad_epochs=0, seconds=0.0)
    resumed_from = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        t = _Training(**state["training"])
        if t.finished:
            raise PipelineError(f"nothing to resume: the run in {out} ended ({t.finished}); its best model is "
                                f"{out / MODEL_FILE}")
        resumed_from = dict(epoch=t.epoch, done=t.done, step=t.step)
        log(f"resuming {out / STATE_FILE}: epoch {t.epoch} of {epochs}, {t.done} of {len(train)} images done, "
            f"step {t.step} of {epochs * steps_per_epoch}")
    else:
        _write_config(model, out, backbone, classes, base_sha, bb.data_config, settings)

    def save_state() -> None:
        with atomic_path(out / STATE_FILE) as tmp:
            torch.save(dict(
                model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                torch_rng=torch.get_rng_state(), training=t.__dict__, settings=settings,
                base_weights_sha256=base_sha,
            ), tmp)

    def evaluate(epoch: int, partial: bool = False) -> None:
        model.eval()
        begin = time.perf_counter()
        metrics = _evaluate(bb, held, index, batch_size, workers)
        entry = dict(epoch=epoch, phase=_phase(epoch, head_epochs), partial=partial,
                     train_loss=t.loss_sum / t.loss_n if t.loss_n else None, **metrics,
                     eval_seconds=round(time.perf_counter() - begin, 2), train_seconds=round(t.seconds, 2))
        t.history.append(entry)
        if t.best is None or entry["accuracy"] > t.best["accuracy"]:
            t.best, t.bad_epochs = entry, 0
            state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            with atomic_path(out / MODEL_FILE) as tmp:
                save_file(state_dict, str(tmp))
        elif not partial:
            t.bad_epochs += 1

    if not t.history:
        evaluate(0)
    eval_seconds = t.history[-1]["eval_seconds"]
    estimate = None
    if t.epoch <= epochs:
        estimate = _estimate(model, bb, train, train_tf, body, batch_size, accum_steps, label_smoothing, bn,
                             head_epochs, epochs, t.epoch, eval_seconds, len(held))
        log(estimate["message"])
        if budget_minutes is not None and estimate["total_seconds"] > 60 * budget_minutes:
            log(f"--budget-minutes {budget_minutes:g} is less than that: training will stop cleanly when it runs "
                f"out, keeping the best epoch so far (continue with --resume)")

    deadline = start_time + 60 * budget_minutes if budget_minutes is not None else math.inf
    last_save = time.monotonic()
    stopped = "finished"
    with progress_bar(progress) as bar:
        while t.epoch <= epochs and stopped == "finished":
            epoch = t.epoch
            blocks = epoch > head_epochs
            for p in body:
                p.requires_grad_(blocks)
            sched = _scheduler(opt, lr, head_epochs, epochs, steps_per_epoch, warmup_epochs, epoch, t.step)
            order = _epoch_order(len(train), seed, epoch)
            todo = [train[i] for i in order[t.done:]]
            task = bar.add_task(f"epoch {epoch}/{epochs} ({_phase(epoch, head_epochs)})", total=len(train),
                                completed=t.done)
            _train_mode(model, bn)
            loader = image_batches(todo, train_tf, batch_size, workers, pin_memory=cuda)
            pending = 0
            began = time.monotonic()
            for idx, x, failed in loader:
                if x is not None:
                    y = torch.tensor([index[todo[i].label] for i in idx], device=bb.device)
                    loss = _loss(model, bb, x.to(bb.device, non_blocking=cuda), y, label_smoothing)
                    scaler.scale(loss / accum_steps).backward()
                    t.loss_sum, t.loss_n = t.loss_sum + loss.item() * len(idx), t.loss_n + len(idx)
                    pending += 1
                t.done += len(idx) + len(failed)
                bar.update(task, completed=t.done,
                           description=f"epoch {epoch}/{epochs} ({_phase(epoch, head_epochs)}) loss {t.loss_sum / max(t.loss_n, 1):.4f}")
                if pending == accum_steps or (t.done == len(train) and pending):
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    pending = 0
                    t.step += 1
                    sched.step_update(t.step - _phase_start(epoch, head_epochs, steps_per_epoch))
                    now = time.monotonic()
                    if t.done < len(train) and now + eval_seconds > deadline:
                        stopped = "budget"
                        break
                    if t.done < len(train) and now - last_save >= 60 * checkpoint_minutes:
                        t.seconds += now - began
                        began = now
                        save_state()
                        last_save = time.monotonic()
            t.seconds += time.monotonic() - began
            if stopped == "budget":
                evaluate(epoch, partial=True)
                break
            evaluate(epoch)
            bar.update(task, description=f"epoch {epoch}/{epochs} ({_phase(epoch, head_epochs)}) "
                                         f"loss {t.history[-1]['train_loss'] or 0:.4f} {split} acc {t.history[-1]['accuracy']:.4f}")
            t.epoch, t.done, t.loss_sum, t.loss_n = epoch + 1, 0, 0.0, 0
            if patience is not None and t.bad_epochs >= patience and t.epoch <= epochs:
                stopped = "early-stopping"
            elif t.epoch <= epochs and time.monotonic() + eval_seconds > deadline:
                stopped = "budget"
            if t.epoch <= epochs and stopped == "finished":
                save_state()
                last_save = time.monotonic()
    t.finished = stopped if stopped != "budget" else None
    save_state()
    best = t.best
    metrics = {k: best[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "n_test")}
    n_train = len(train)
    with atomic_path(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(dict(
            strategy=strategy, eval_split=split, n_train=n_train, n_eval=len(held), classes=classes,
            best_epoch=best["epoch"], best=metrics, stopped=stopped, steps=t.step, resumed_from=resumed_from,
            estimate=estimate, epochs=t.history, settings=settings,
        ), indent=1))
    row = None
    if run is not None:
        note = [f"best epoch {best['epoch']} of {len(t.history) - 1}"]
        if best["epoch"] == 0:
            note.append("no gain over the start")
        if stopped != "finished":
            note.append(f"stopped by {stopped}")
        row = dict(backbone=backbone, weights=base_sha[:12], tap="finetuned", task=src.name,
                   head=f"finetune:{strategy}", eval=split, n_train=n_train, **metrics,
                   fit_seconds=round(t.seconds, 2),
                   head_file=str(out.resolve()), cache="", error="; ".join(note))
        write_run_info(run, "finetune", settings, time.monotonic() - start_time, append=True)
        update_leaderboard(run, [row], replace=lambda r: r.get("head_file") == row["head_file"])
    return FinetuneResult(out, strategy, classes, split, n_train, t.history, best["epoch"], metrics, stopped, t.step,
                          resumed_from, estimate, row)


@dataclass
class _Training:
    """Where training stands; saved in ``last.pt`` so a killed run continues from here."""

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


def _check_settings(strategy, init, epochs, head_epochs, unfreeze, lr, backbone_lr_scale, layer_decay, weight_decay,
                    warmup_epochs, label_smoothing, aug, bn, batch_size, accum_steps, patience, budget_minutes,
                    checkpoint_minutes) -> int | None:
    """Validate every setting before anything is loaded; returns the parsed ``unfreeze``."""
    if strategy not in STRATEGIES:
        raise PipelineError(f"unknown --strategy {strategy!r}; choose {', '.join(STRATEGIES)}")
    if strategy == "lp-ft" and init is None:
        raise PipelineError("--strategy lp-ft starts the classifier from a fit run's linear head: give --init RUN_DIR, "
                            "or use --strategy freeze-unfreeze")
    if aug not in AUGMENTATIONS:
        raise PipelineError(f"unknown --aug {aug!r}; choose {', '.join(AUGMENTATIONS)}")
    if bn not in BN_MODES:
        raise PipelineError(f"unknown --bn {bn!r}; choose {', '.join(BN_MODES)}")
    checks = [
        (epochs >= 1, f"--epochs must be at least 1, got {epochs}"),
        (head_epochs >= 0, f"--head-epochs must be 0 or more, got {head_epochs}"),
        (lr is None or lr > 0, f"--lr must be positive, got {lr}"),
        (backbone_lr_scale > 0, f"--backbone-lr-scale must be positive, got {backbone_lr_scale}"),
        (0 < layer_decay <= 1, f"--layer-decay must be in (0, 1], got {layer_decay}"),
        (weight_decay >= 0, f"--weight-decay must be 0 or more, got {weight_decay}"),
        (warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {warmup_epochs}"),
        (0 <= label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {label_smoothing}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (accum_steps >= 1, f"--accum-steps must be at least 1, got {accum_steps}"),
        (patience is None or patience >= 1, f"--patience must be at least 1, got {patience}"),
        (budget_minutes is None or budget_minutes > 0, f"--budget-minutes must be positive, got {budget_minutes}"),
        (checkpoint_minutes >= 0, f"--checkpoint-minutes must be 0 or more, got {checkpoint_minutes}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PipelineError(message)
    return _parse_unfreeze(unfreeze)


def _parse_unfreeze(unfreeze: str | int) -> int | None:
    """``all`` -> None (everything), else the number of top block groups to train."""
    if str(unfreeze) == "all":
        return None
    try:
        k = int(unfreeze)
    except ValueError:
        raise PipelineError(f"--unfreeze takes a number of top blocks or 'all', got {unfreeze!r}") from None
    if k < 0:
        raise PipelineError(f"--unfreeze must be 0 or more, got {k}")
    return k


def _check_fresh(out: Path) -> None:
    """Refuse to train over an earlier run's checkpoint: nothing is lost by a repeated command."""
    for name in (STATE_FILE, MODEL_FILE):
        if (out / name).exists():
            raise PipelineError(f"{out} already holds a fine-tuning run ({name}); pass --resume to continue it "
                                "if it was interrupted, or choose another --out")


def _load_state(out: Path, settings: dict) -> dict:
    """``last.pt``, loaded without executing code (``weights_only``), after checking it is this run's."""
    path = out / STATE_FILE
    if not path.is_file():
        done = " (it finished: its model is there)" if (out / MODEL_FILE).is_file() else ""
        raise PipelineError(f"nothing to resume: {path} does not exist{done}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file
        raise PipelineError(f"{path} is not a readable fine-tuning checkpoint: {type(e).__name__}: {e}") from e
    diff = [f"{k} {state['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
            if k not in _RESUMABLE and state["settings"].get(k) != v]
    if diff:
        raise PipelineError(f"--resume continues {path} with the settings it started with; these differ: "
                            + ", ".join(diff))
    return state


def _split(samples: list[Sample], seed: int) -> tuple[list[Sample], list[Sample], str]:
    """Train on ``train`` and evaluate on ``val`` (else ``test``), as ``fit`` does; data without splits
    gets a seeded stratified 20 % hold-out."""
    labelled = [s for s in samples if s.label]
    if len({s.label for s in labelled}) < 2:
        raise PipelineError("fine-tuning needs labelled images of at least 2 classes")
    train = [s for s in labelled if s.split == "train"]
    for split in HOLDOUT_SPLITS:
        held = [s for s in labelled if s.split == split]
        if train and held:
            return train, held, split
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(labelled, test_size=0.2, random_state=seed, stratify=[s.label for s in labelled])
    return list(tr), list(te), "holdout20"


def _linear_init(run_dir: str | os.PathLike, task: str, backbone: str, weights_sha256: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The best linear head of ``run_dir`` for this task and backbone, as softmax weights on raw features.

    The head's standardisation is folded in: ``W' = W / scale``, ``b' = b - W' @ mean``. A binary
    logistic regression's single row ``w`` becomes the two rows ``-w/2, w/2``, which give the same
    probabilities under softmax.
    """
    rows = [r for r in read_leaderboard(run_dir) if r["weights"] == weights_sha256[:12]]
    best = best_row(rows, task=task, linear=True, backbone=backbone)
    if best is None:
        raise PipelineError(
            f"{run_dir}: no linear head for task {task!r} fit on {backbone} with these weights; "
            "run `pipeline fit` on this data's cache first"
        )
    head = load_head(best["head_file"])
    pipe = getattr(head, "best_estimator_", head)
    scaler, clf = pipe[0], pipe[-1]
    w = clf.coef_ / scaler.scale_
    b = clf.intercept_ - w @ scaler.mean_
    if w.shape[0] == 1:
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    return [str(c) for c in clf.classes_], w.astype(np.float32), b.astype(np.float32)


def _prepare(bb: Backbone, n_classes: int, weight: np.ndarray | None, bias: np.ndarray | None) -> torch.nn.Module:
    model = bb.model
    model.reset_classifier(n_classes)
    head = model.get_classifier().to(bb.device)
    if weight is not None:
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight))
            head.bias.copy_(torch.from_numpy(bias))
    return model


def _param_groups(model: torch.nn.Module, strategy: str, top: int | None, backbone_lr_scale: float,
                  layer_decay: float, weight_decay: float) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """Optimizer groups with timm's ``lr_scale`` (applied by its scheduler), and the body parameters
    that train once the head epochs are over.

    ``discriminative``: every parameter, scaled ``layer_decay ** depth`` by timm's fine-grained block
    groups. Otherwise: the classifier at scale 1 and the top ``top`` coarse block groups (all when None)
    at ``backbone_lr_scale``."""
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    model.requires_grad_(False)
    if strategy == "discriminative":
        model.requires_grad_(True)
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    else:
        named = dict(model.named_parameters())
        blocks = group_parameters(model, model.group_matcher(coarse=True))
        body = [[named[n] for n in names if id(named[n]) not in head_ids] for _, names in sorted(blocks.items())]
        body = [g for g in body if g]
        chosen = [p for g in (body if top is None else body[len(body) - top:] if top else []) for p in g]
        for p in head + chosen:
            p.requires_grad_(True)
        groups = [dict(params=head, lr_scale=1.0)] + ([dict(params=chosen, lr_scale=backbone_lr_scale)] if chosen else [])
    trainable_body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return groups, trainable_body


def _scheduler(opt: torch.optim.Optimizer, lr: float, head_epochs: int, epochs: int, steps_per_epoch: int,
               warmup_epochs: float, epoch: int, step: int) -> CosineLRScheduler:
    """Warmup then cosine decay over the phase ``epoch`` is in (head only, then blocks), so the blocks
    join at a warmed-up small learning rate, not at the head's peak; set to global ``step``."""
    length = head_epochs if epoch <= head_epochs else epochs - head_epochs
    for g in opt.param_groups:
        g["initial_lr"] = lr  # the base the scheduler scales by each group's lr_scale
    steps = max(1, length * steps_per_epoch)
    warmup = min(round(warmup_epochs * steps_per_epoch), steps - 1)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=lr * 0.01, warmup_t=warmup, warmup_lr_init=lr * 0.01,
                              t_in_epochs=False)
    sched.step_update(step - _phase_start(epoch, head_epochs, steps_per_epoch))
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


def _train_transform(bb: Backbone, aug: str) -> Callable:
    """``none``: the eval transform. ``light``: random resized crop of 50-100 % and flips (small data).
    ``standard``: timm's training defaults (crop of 8-100 %, flips, colour jitter 0.4)."""
    if aug == "none":
        return bb.transform()
    cfg = bb.data_config
    kw = dict(scale=(0.5, 1.0), color_jitter=None) if aug == "light" else {}
    return create_transform(cfg["input_size"], is_training=True, interpolation=cfg["interpolation"],
                            mean=cfg["mean"], std=cfg["std"], **kw)


def _train_mode(model: torch.nn.Module, bn: str) -> None:
    """Dropout and drop-path on; BatchNorm running statistics frozen with ``bn="freeze"``."""
    model.train()
    if bn == "freeze":
        for m in model.modules():
            if isinstance(m, _BATCHNORMS):
                m.eval()


def _loss(model: torch.nn.Module, bb: Backbone, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if bb.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with bb.autocast():
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def _estimate(model, bb, train, train_tf, body, batch_size, accum_steps, label_smoothing, bn, head_epochs, epochs,
              first_epoch, eval_seconds, n_held) -> dict:
    """Seconds per epoch, from forward+backward timed on one real batch with the blocks unfrozen (two
    timed passes after a warm-up, no optimizer step, BatchNorm buffers restored) and the start's
    evaluation time."""
    x = next(iter(image_batches(train[:batch_size], train_tf, batch_size, 0)))[1]
    if x is None:
        raise PipelineError("the first training images failed to load; check the data with `pipeline extract`")
    y = torch.zeros(len(x), dtype=torch.long, device=bb.device)
    x = x.to(bb.device)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = [p.requires_grad for p in body]
    for p in body:
        p.requires_grad_(True)
    _train_mode(model, bn)
    timings = []
    for _ in range(3):
        begin = time.perf_counter()
        _loss(model, bb, x, y, label_smoothing).backward()
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - begin)
    model.zero_grad(set_to_none=True)
    for p, flag in zip(body, flags):
        p.requires_grad_(flag)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    per_batch = float(np.median(timings[1:])) * len(train[:batch_size]) / len(x)
    batches = math.ceil(len(train) / batch_size)
    blocks_epoch = batches * per_batch + eval_seconds
    head_epoch = len(train) / max(n_held, 1) * eval_seconds + eval_seconds  # forward only: like evaluation
    left = range(first_epoch, epochs + 1)
    total = sum(head_epoch if e <= head_epochs else blocks_epoch for e in left)
    message = (f"estimated {blocks_epoch:.1f} s per epoch with blocks training ({batches} batches x {per_batch:.2f} s "
               f"forward+backward, measured on one batch, + {eval_seconds:.1f} s evaluation), {head_epoch:.1f} s per "
               f"head-only epoch; {len(left)} epoch(s) ~ {total / 60:.1f} min")
    return dict(seconds_per_batch=round(per_batch, 3), blocks_epoch_seconds=round(blocks_epoch, 1),
                head_epoch_seconds=round(head_epoch, 1), total_seconds=round(total, 1), message=message)


def _evaluate(bb: Backbone, samples: list[Sample], index: dict[str, int], batch_size: int, workers: int) -> dict:
    """``fit``'s metrics on ``samples`` (images that fail to load are left out, as in a cache)."""
    y_true, y_pred = [], []
    for idx, out, _ in forward_batches(bb, samples, ("logits",), batch_size, workers):
        if idx:
            y_true += [index[samples[i].label] for i in idx]
            y_pred += out["logits"].argmax(1).tolist()
    if not y_true:
        raise PipelineError("no held-out image could be loaded, so nothing can be evaluated")
    return dict(accuracy=float(accuracy_score(y_true, y_pred)),
                balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)),
                f1_macro=float(f1_score(y_true, y_pred, average="macro")), n_test=len(y_true))


def _write_config(model: torch.nn.Module, out: Path, backbone: str, classes: list[str], base_sha: str,
                  data_config: dict, settings: dict) -> None:
    """timm's ``config.json`` (architecture, pretrained config, ``label_names``) plus a ``pipeline``
    section naming the backbone and weights it came from."""
    extra = dict(label_names=classes, pipeline=dict(backbone=backbone, base_weights_sha256=base_sha,
                                                    data_config=data_config, settings=settings))
    with atomic_path(out / CONFIG_FILE) as tmp:
        save_config_for_hf(model, str(tmp), model_config=extra)


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The ``pipeline`` section of a fine-tuned model directory's ``config.json``, with its ``classes``."""
    file = Path(path) / CONFIG_FILE
    try:
        cfg = json.loads(file.read_text())
        return dict(cfg["pipeline"], classes=list(cfg["label_names"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{file} is not a fine-tuned model's config ({type(e).__name__}: {e})") from e
