"""Few-shot curves: how a head does when only k labelled examples per class are given, over seeded draws.

The examples are drawn from the training rows of the task's protocol and every fit is scored on its
scored rows: the ``val``/``test`` split, or the first fold of a cross-validated task. Draw ``d`` of
``k`` shots is the same for every head and backbone, so their curves are paired.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PipelineError
from .files import atomic_path
from .evaluation import Protocol
from .validation import Rule, list_of

ALL = "all"


def _shot(item: str | int) -> int | str | None:
    """``"5"`` -> 5, ``"all"`` -> ``"all"``; None for anything else (``0``, ``"five"``)."""
    text = str(item).strip().lower()
    if text == ALL:
        return ALL
    return int(text) if text.isdigit() and int(text) >= 1 else None


SHOTS = list_of(Rule(lambda item: _shot(item) is not None, "positive whole numbers or 'all' (e.g. 1,2,5,10,all)"))


def parse_shots(items: Sequence[str | int]) -> list[int | str]:
    """``["1", "2", "5", "all"]`` -> ``[1, 2, 5, "all"]`` (items :data:`SHOTS` accepts), in increasing order."""
    return sorted({_shot(item) for item in items}, key=lambda k: float("inf") if k == ALL else k)


def draw_shots(y: np.ndarray, pool: np.ndarray, k: int | str, seed: int, draw: int) -> np.ndarray:
    """``k`` rows of each class from ``pool`` (all of them for ``"all"``), seeded by (seed, k, draw)."""
    if k == ALL:
        return pool
    rng = np.random.default_rng([seed, k, draw])
    picked = []
    for c in np.unique(y[pool]):
        rows = pool[y[pool] == c]
        if len(rows) < k:
            raise PipelineError(f"class {str(c)!r} has {len(rows)} training example(s), fewer than {k} shots")
        picked.append(rng.choice(rows, k, replace=False))
    return np.sort(np.concatenate(picked))


def plan_draws(protocol: Protocol, shots: Sequence[int | str], n_draws: int) -> tuple[dict, np.ndarray, str]:
    """For every k: its draws (lists of indices into the protocol's samples), or the reason it cannot be
    drawn; the scored indices; and their name (the protocol's ``fewshot_split``)."""
    pool, test, name = protocol.fewshot_split()
    plans: dict[int | str, list[np.ndarray] | str] = {}
    for k in shots:
        try:
            plans[k] = [draw_shots(protocol.y, pool, k, protocol.seed, d) for d in range(1 if k == ALL else n_draws)]
        except PipelineError as e:
            plans[k] = str(e)
    return plans, test, name


def summarise(accuracies: list[float] | None) -> dict:
    if not accuracies:
        return dict(acc_mean=None, acc_std=None, acc_min=None, acc_max=None)
    a = np.asarray(accuracies)
    return dict(acc_mean=float(a.mean()), acc_std=float(a.std()), acc_min=float(a.min()), acc_max=float(a.max()))


def plot_fewshot(rows: Sequence[dict], task: str, path: str | os.PathLike) -> Path:
    """Accuracy (mean ± std over draws) against shots per class: one panel per head, one line per
    backbone (and tap, when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["task"] == task]
    heads = list(dict.fromkeys(r["head"] for r in rows))
    shots = sorted({r["shots"] for r in rows}, key=lambda k: float("inf") if k == ALL else k)
    several_taps = len({r["tap"] for r in rows}) > 1
    cols = min(3, len(heads))
    n_rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.2 * n_rows), sharey=True, squeeze=False)
    for ax, head in zip(axes.flat, heads):
        lines = {}
        for r in rows:
            if r["head"] == head:
                name = f"{r['backbone']}/{r['tap']}" if several_taps else r["backbone"]
                lines.setdefault(name, {})[r["shots"]] = r
        for name, by_k in lines.items():
            xs = [i for i, k in enumerate(shots) if k in by_k and by_k[k]["acc_mean"] is not None]
            ax.errorbar(xs, [by_k[shots[i]]["acc_mean"] for i in xs], yerr=[by_k[shots[i]]["acc_std"] for i in xs],
                        marker="o", capsize=3, label=name)
        ax.set_title(head, fontsize=10)
        ax.set_xticks(range(len(shots)), [str(k) for k in shots])
        ax.set_xlabel("examples per class")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(heads):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(textwrap.shorten(f"few-shot accuracy on {task} (mean ± std over draws)", 90), fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
