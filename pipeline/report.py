"""Rendering results for people: the leaderboard as CSV, JSON and Markdown; confusion-matrix plots; the
few-shot table; and ``report.html``, one static page with all of it and what produced it."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import platform
import re
import shlex
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .cache import library_versions
from .errors import PipelineError
from .files import atomic_path

LEADERBOARD_COLUMNS = (
    "backbone", "weights", "tap", "task", "head", "eval", "n_train", "n_test",
    "accuracy", "acc_low", "acc_high", "acc_std", "p_vs_best", "same_as_best", "chance", "p_above_chance", "above_chance",
    "balanced_accuracy", "f1_macro", "fit_seconds", "head_file", "predictions", "cache", "error",
)
FEWSHOT_COLUMNS = ("backbone", "weights", "tap", "task", "head", "shots", "draws", "eval", "n_test",
                   "acc_mean", "acc_std", "acc_min", "acc_max", "accuracies", "error")
RUN_FILE, REPORT_FILE = "run.json", "report.html"
SHOWN_COLUMNS = ("backbone", "weights", "tap", "task", "head", "eval", "accuracy", "acc_low", "acc_high",
                 "same_as_best", "chance", "above_chance", "balanced_accuracy", "f1_macro", "fit_seconds")


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
    files = write_leaderboard(sort_rows([r for r in old if not replace(r)] + list(rows)), run_dir)
    files["report"] = write_html_report(run_dir)
    return files


def write_fewshot(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``fewshot.csv`` and ``fewshot.json`` (one row per backbone, tap, task, head and shots)."""
    out_dir = Path(out_dir)
    paths = {"fewshot_csv": out_dir / "fewshot.csv", "fewshot_json": out_dir / "fewshot.json"}
    with atomic_path(paths["fewshot_csv"]) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, FEWSHOT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "accuracies": " ".join(f"{a:.4f}" for a in r["accuracies"] or [])} for r in rows)
    with atomic_path(paths["fewshot_json"]) as tmp:
        tmp.write_text(json.dumps(list(rows), indent=1, default=_jsonable))
    return paths


def fewshot_table(rows: Sequence[dict], task: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The shots (columns) and, per head and backbone, ``mean ± std`` per shot (``-`` where not fit)."""
    rows = [r for r in rows if r["task"] == task]
    shots = list(dict.fromkeys(str(r["shots"]) for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        name = f"{r['head']} / {r['backbone']}" + (f" / {r['tap']}" if r["tap"] != "pooled" else "")
        value = ("-" if r["acc_mean"] is None else f"{r['acc_mean']:.3f}" if r["draws"] == 1
                 else f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}")
        cells.setdefault(name, {})[str(r["shots"])] = value
    return shots, [(name, [by.get(k, "-") for k in shots]) for name, by in cells.items()]


def write_run_info(run_dir: str | os.PathLike, stage: str, parameters: dict, seconds: float, append: bool = False) -> Path:
    """Record in ``run.json`` the command line, parameters and library versions of a stage that wrote
    into ``run_dir`` (``fit`` starts the record; ``finetune`` adds to it)."""
    path = Path(run_dir) / RUN_FILE
    old = json.loads(path.read_text()) if append and path.is_file() else []
    entry = dict(stage=stage, command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), parameters=parameters,
                 finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(seconds, 2),
                 versions={**library_versions(), "python": platform.python_version()},
                 machine=f"{platform.node()} ({platform.platform()}, {os.cpu_count()} cores)")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(old + [entry], indent=1, default=str))
    return path


def write_html_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.html``: one static page (images inlined) with each task's leaderboard, accuracy by
    head × backbone, few-shot curves, confusion matrices, and the commands and versions behind them."""
    run_dir = Path(run_dir)
    rows = read_leaderboard(run_dir)
    few_path = run_dir / "fewshot.json"
    fewshot = json.loads(few_path.read_text()) if few_path.is_file() else []
    runs = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else []
    e = html.escape
    body = [f"<h1>Run {e(str(run_dir))}</h1>",
            f"<p>{len(rows)} leaderboard rows; written {e(time.strftime('%Y-%m-%d %H:%M:%S %z'))}. Rows marked "
            "&#9679; (shaded) are not distinguishable from their task's best (exact McNemar test). <i>chance</i> is "
            "the accuracy of always predicting the majority training class; <i>&gt; chance</i> says whether the "
            "row beats it (one-sided exact binomial test). Both tests are at 5 % after a Benjamini-Hochberg "
            "adjustment over the task's rows. Row numbers are those of "
            "<code>pipeline report RUN_DIR --row N</code>.</p>"]
    for task in dict.fromkeys(r["task"] for r in rows):
        numbered = [(i, r) for i, r in enumerate(rows, 1) if r["task"] == task]
        body.append(f"<h2>Task {e(task)}</h2>")
        best = next((r for _, r in numbered if r.get("accuracy") is not None), None)
        if best is not None:
            body.append(f"<p>Best: <b>{e(best['backbone'])} / {e(best['tap'])} / {e(best['head'])}</b>, accuracy "
                        f"{_fmt(best['accuracy'])} (95 % CI {_fmt(best.get('acc_low'))}&ndash;{_fmt(best.get('acc_high'))}) "
                        f"on {e(str(best['eval']))}, n = {best.get('n_test')}.</p>")
        body.append("<h3>Leaderboard</h3>" + _html_leaderboard(numbered))
        body.append("<h3>Accuracy by head &times; backbone</h3>" + _html_grid([r for _, r in numbered]))
        if any(r["task"] == task for r in fewshot):
            shots, table = fewshot_table(fewshot, task)
            body.append("<h3>Few-shot: accuracy against labelled examples per class</h3>")
            body.append(_html_image(run_dir / f"fewshot_{slug(task)}.png"))
            body.append(_html_table(["head / backbone"] + shots, [[name] + vals for name, vals in table]))
        body.append("<h3>Confusion matrix of the best row</h3>" + _html_image(run_dir / f"confusion_{slug(task)}.png"))
    extra = sorted(run_dir.glob("confusion_row*.png"), key=lambda p: int("".join(filter(str.isdigit, p.stem)) or 0))
    if extra:
        body.append("<h2>Confusion matrices of other rows</h2>" + "".join(_html_image(p) for p in extra))
    body.append("<h2>How this was made</h2>")
    for entry in runs:
        body.append(f"<h3>{e(entry['stage'])}, finished {e(entry['finished'])} ({entry['seconds']} s)</h3>"
                    f"<pre>{e(entry['command'])}</pre>"
                    f"<details><summary>parameters</summary><pre>{e(json.dumps(entry['parameters'], indent=1))}</pre></details>"
                    f"<p>{e(', '.join(f'{k} {v}' for k, v in entry['versions'].items()))}; {e(entry['machine'])}</p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pipeline report: {e(run_dir.name)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    path = run_dir / REPORT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}tr.same td{background:#eef6ee}tr.best td{font-weight:bold}
td.err{color:#a33;text-align:left;font-size:12px;max-width:420px}img{max-width:100%;border:1px solid #eee}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}h2{border-bottom:2px solid #ddd;margin-top:32px}"""


def _html_leaderboard(numbered: list[tuple[int, dict]]) -> str:
    e = html.escape
    head = ["#", "backbone", "tap", "head", "eval", "n", "accuracy", "95 % CI", "CV std", "p vs best", "",
            "chance", "&gt; chance", "balanced acc", "macro F1", "fit s", "note"]
    out = ["<table><tr>" + "".join(f"<th class='l'>{h}</th>" if i in (1, 2, 3, 16) else f"<th>{h}</th>"
                                   for i, h in enumerate(head)) + "</tr>"]
    first = True
    for n, r in numbered:
        cls = "best same" if first and r.get("accuracy") is not None else "same" if r.get("same_as_best") else ""
        first = False
        ci = f"{_fmt(r.get('acc_low'))}&ndash;{_fmt(r.get('acc_high'))}" if r.get("acc_low") is not None else ""
        cells = [str(n), f"<td class='l'>{e(r['backbone'])}", f"<td class='l'>{e(r['tap'])}",
                 f"<td class='l'>{e(r['head'])}", e(str(r["eval"])), _fmt(r.get("n_test")), _fmt(r.get("accuracy")), ci,
                 _fmt(r.get("acc_std")), _fmt(r.get("p_vs_best")), "&#9679;" if r.get("same_as_best") else "",
                 _fmt(r.get("chance")), {True: "yes", False: "<b>no</b>"}.get(r.get("above_chance"), ""),
                 _fmt(r.get("balanced_accuracy")), _fmt(r.get("f1_macro")), _fmt(r.get("fit_seconds")),
                 f"<td class='err'>{e(str(r.get('error') or ''))}"]
        out.append(f"<tr class='{cls}'>" + "".join(c if c.startswith("<td") else f"<td>{c}" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def _html_grid(rows: list[dict]) -> str:
    """Heads down, backbones (and taps) across, cells shaded from the lowest accuracy to the highest."""
    e = html.escape
    several_taps = len({r["tap"] for r in rows}) > 1
    col = lambda r: f"{r['backbone']} / {r['tap']}" if several_taps else r["backbone"]  # noqa: E731
    cols = list(dict.fromkeys(col(r) for r in rows))
    grid: dict[str, dict[str, float | None]] = {}
    for r in rows:
        grid.setdefault(r["head"], {})[col(r)] = r.get("accuracy")
    values = [v for by in grid.values() for v in by.values() if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    out = ["<table><tr><th class='l'>head</th>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"]
    for head, by in grid.items():
        cells = []
        for c in cols:
            v = by.get(c)
            shade = 0.0 if v is None or hi == lo else (v - lo) / (hi - lo)
            style = f" style='background:hsl(130,45%,{95 - 35 * shade:.0f}%)'" if v is not None else ""
            cells.append(f"<td{style}>{_fmt(v) or '&ndash;'}</td>")
        out.append(f"<tr><td class='l'>{e(head)}</td>{''.join(cells)}</tr>")
    return "".join(out) + "</table>"


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th class='l'>{e(h)}</th>" if i == 0 else f"<th>{e(h)}</th>"
                                   for i, h in enumerate(header)) + "</tr>"]
    for cells in body:
        out.append("<tr>" + "".join(f"<td class='l'>{e(c)}</td>" if i == 0 else f"<td>{e(c)}</td>"
                                    for i, c in enumerate(cells)) + "</tr>")
    return "".join(out) + "</table>"


def _html_image(path: Path) -> str:
    if not path.is_file():
        return "<p>(no plot)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<p><img alt='{html.escape(path.name)}' src='data:image/png;base64,{data}'></p>"


def slug(text: str) -> str:
    """``text`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


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
