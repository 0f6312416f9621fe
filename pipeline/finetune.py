"""The fine-tune stage: train the top of a backbone on a task, starting the classifier from the best
linear head ``fit`` found (LP-FT), and write a checkpoint that ``extract`` and ``predict`` accept.

BatchNorm statistics stay frozen (the network runs in eval mode): on a few hundred images, batch
statistics are noisier than the pretrained ones.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from timm.data import create_transform
from timm.models import group_parameters

from .backbones import CHECKPOINT_CONFIG, Backbone, load_backbone
from .data import Sample, load_source
from .errors import PipelineError
from .extract import default_workers, forward_batches, image_batches
from .files import atomic_path
from .progress import progress_bar
from .fit import best_row
from .heads import load_head
from .report import read_leaderboard
from .tasks import HOLDOUT_SPLITS


@dataclass
class FinetuneResult:
    out: Path
    classes: list[str]
    eval_split: str
    history: list[dict] = field(default_factory=list)  # one entry per epoch; epoch 0 is before training


def finetune(
    data: str | os.PathLike,
    backbone: str,
    out: str | os.PathLike,
    init: str | os.PathLike | None = None,
    epochs: int = 2,
    unfreeze: str | int = 2,
    lr: float | None = None,
    backbone_lr_scale: float = 0.1,
    batch_size: int = 32,
    workers: int | None = None,
    weights: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``backbone`` on the labels of ``data``: the classifier at ``lr``, the top ``unfreeze``
    block groups (or ``"all"``) at ``lr * backbone_lr_scale``; evaluate after every epoch.

    ``lr=None`` means 1e-4 with ``init`` (the classifier starts trained; a large step would undo it)
    and 1e-3 without.
    """
    if epochs < 0:
        raise PipelineError(f"--epochs must be 0 or more, got {epochs}")
    top = _parse_unfreeze(unfreeze)
    torch.manual_seed(seed)
    random.seed(seed)
    src = load_source(data)
    train, held, split = _split(list(src.samples), seed)
    bb = load_backbone(backbone, weights, device, amp="auto", channels_last=True)
    if init is not None:
        classes, weight, bias = _linear_init(init, src.name, backbone, bb.weights_sha256)
    else:
        classes, weight, bias = sorted({s.label for s in train}), None, None
    unknown = sorted({s.label for s in train + held} - set(classes))
    if unknown:
        raise PipelineError(f"labels {unknown} are not classes of the --init head ({classes})")
    model = _prepare(bb, len(classes), weight, bias)
    lr = lr if lr is not None else (1e-4 if init is not None else 1e-3)
    params = _param_groups(model, top, lr, backbone_lr_scale)
    opt = torch.optim.AdamW(params, weight_decay=0.05)
    steps = max(1, epochs * math.ceil(len(train) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    workers = default_workers() if workers is None else workers
    cfg = bb.data_config
    train_tf = create_transform(cfg["input_size"], is_training=True, scale=(0.5, 1.0), color_jitter=None,
                                interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    index = {c: i for i, c in enumerate(classes)}

    out = Path(out)
    history = [{"epoch": 0, "train_loss": None, "val_accuracy": _evaluate(bb, held, index, batch_size, workers)}]
    with progress_bar(progress) as bar:
        for epoch in range(1, epochs + 1):
            task = bar.add_task(f"finetune epoch {epoch}/{epochs}", total=len(train))
            start = time.perf_counter()
            random.shuffle(train)
            losses = []
            for idx, x, failed in image_batches(train, train_tf, batch_size, workers):
                bar.advance(task, len(idx) + len(failed))
                if x is None:
                    continue
                y = torch.tensor([index[train[i].label] for i in idx], device=bb.device)
                loss = torch.nn.functional.cross_entropy(model(x.to(bb.device)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            history.append({
                "epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                "val_accuracy": _evaluate(bb, held, index, batch_size, workers),
                "seconds": round(time.perf_counter() - start, 2),
            })
            bar.update(task, description=f"finetune epoch {epoch}/{epochs} val acc {history[-1]['val_accuracy']:.3f}")

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    config = dict(backbone=backbone, class_names=classes, data_config=cfg, base_weights_sha256=bb.weights_sha256,
                  init=str(init) if init else None, unfreeze=str(unfreeze), lr=lr, backbone_lr_scale=backbone_lr_scale)
    with atomic_path(out / CHECKPOINT_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=1))
    metrics = dict(eval_split=split, n_train=len(train), n_eval=len(held), epochs=history)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    return FinetuneResult(out, classes, split, history)


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
    model.eval()  # frozen BatchNorm statistics, no dropout
    return model


def _param_groups(model: torch.nn.Module, top: int | None, lr: float, scale: float) -> list[dict]:
    """Classifier at ``lr``; the top ``top`` block groups (timm's group_matcher) at ``lr * scale``."""
    head_params = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head_params}
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    body = [[named[n] for n in names if id(named[n]) not in head_ids] for _, names in sorted(groups.items())]
    body = [g for g in body if g]
    chosen = body if top is None else (body[len(body) - top:] if top else [])
    model.requires_grad_(False)
    trainable = [p for g in chosen for p in g]
    for p in head_params + trainable:
        p.requires_grad_(True)
    out = [{"params": head_params, "lr": lr}]
    if trainable:
        out.append({"params": trainable, "lr": lr * scale})
    return out


def _evaluate(bb: Backbone, samples: list[Sample], index: dict[str, int], batch_size: int, workers: int) -> float:
    correct = total = 0
    for idx, out, _ in forward_batches(bb, samples, ("logits",), batch_size, workers):
        if idx:
            truth = np.array([index[samples[i].label] for i in idx])
            correct += int((out["logits"].argmax(1) == truth).sum())
            total += len(idx)
    return correct / total if total else float("nan")
