"""Rendering results for people: the leaderboard as CSV, JSON and Markdown; confusion-matrix plots."""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import PipelineError
from .files import atomic_path

LEADERBOARD_COLUMNS = (
    "backbone", "weights", "tap", "task", "head", "eval", "n_train", "n_test",
    "accuracy", "acc_low", "acc_high", "acc_std", "p_vs_best", "same_as_best",
    "balanced_accuracy", "f1_macro", "fit_seconds", "head_file", "predictions", "cache", "error",
)
SHOWN_COLUMNS = ("backbone", "weights", "tap", "task", "head", "eval", "accuracy", "acc_low", "acc_high",
                 "same_as_best", "balanced_accuracy", "f1_macro", "fit_seconds")


def write_leaderboard(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``leaderboard.csv``, ``leaderboard.json`` and ``leaderboard.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"leaderboard.{ext}" for ext in ("csv", "json", "md")}
    with atomic_path(paths["csv"]) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, LEADERBOARD_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(list(rows), indent=1, default=_jsonable))
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown_table(rows) + "\n")
    return paths


def read_leaderboard(run_dir: str | os.PathLike) -> list[dict]:
    return json.loads((Path(run_dir) / "leaderboard.json").read_text())


def update_leaderboard(run_dir: str | os.PathLike, rows: Sequence[dict], replace: Callable[[dict], bool]) -> dict[str, Path]:
    """Add ``rows`` to a run's leaderboard, dropping the existing rows ``replace`` matches (a re-run's)."""
    path = Path(run_dir) / "leaderboard.json"
    old = read_leaderboard(run_dir) if path.is_file() else []
    return write_leaderboard(sort_rows([r for r in old if not replace(r)] + list(rows)), run_dir)


def rank_key(row: dict) -> tuple[float, float, float]:
    """Higher is better: accuracy, then balanced accuracy, then the faster fit; failed rows last."""
    if row.get("accuracy") is None:
        return (-1.0, -1.0, float("-inf"))
    return (row["accuracy"], row["balanced_accuracy"], -row["fit_seconds"])


def sort_rows(rows: Sequence[dict]) -> list[dict]:
    """Grouped by task, best first within each."""
    return sorted(rows, key=lambda r: (r["task"], *(-k for k in rank_key(r))))


def write_predictions(ids: Sequence, y_true: Sequence, y_pred: Sequence, path: str | os.PathLike) -> Path:
    """The evaluated samples of one row (``id,true,predicted``), for ``row_report``."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("id", "true", "predicted"))
        writer.writerows(zip(ids, y_true, y_pred))
    return Path(path)


def row_report(run_dir: str | os.PathLike, row: int) -> dict:
    """Per-class precision, recall, F1 and support, and the confusion matrix, of leaderboard row ``row``
    (counted from 1 as in ``leaderboard.md``); writes ``confusion_row<N>.png`` into the run."""
    from sklearn.metrics import classification_report, confusion_matrix

    rows = read_leaderboard(run_dir)
    if not 1 <= row <= len(rows):
        raise PipelineError(f"--row {row} is out of range: {run_dir} has rows 1..{len(rows)}")
    r = rows[row - 1]
    if not r.get("predictions") or not Path(r["predictions"]).is_file():
        raise PipelineError(f"row {row} ({r['head']}) has no saved predictions; per-class reports cover rows "
                            "written by `pipeline fit`")
    with open(r["predictions"], newline="") as fh:
        saved = list(csv.DictReader(fh))
    y_true, y_pred = [p["true"] for p in saved], [p["predicted"] for p in saved]
    labels = sorted(set(y_true) | set(y_pred))
    per_class = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    title = f"{r['backbone']} / {r['tap']} / {r['head']} on {r['task']} ({r['eval']}): acc {r['accuracy']:.3f}"
    png = plot_confusion(y_true, y_pred, labels, Path(run_dir) / f"confusion_row{row}.png", title)
    return dict(row=r, labels=labels, per_class={c: per_class[c] for c in labels},
                confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(), png=png)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = SHOWN_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def plot_confusion(y_true: Sequence, y_pred: Sequence, labels: Sequence[str], path: str | os.PathLike, title: str) -> Path:
    """Save a confusion-matrix PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 3), max(3.5, 0.5 * n + 2.5)))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(labels), ax=ax, colorbar=False,
                                            xticks_rotation=45 if n > 6 else "horizontal")
    ax.set_title(textwrap.fill(title, 48), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return "" if v is None else str(v)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v)}")
