"""Rendering a run for people: the leaderboard as Markdown, confusion-matrix plots, the few-shot table,
per-row reports, and ``report.html``, one static page with all of it and what produced it. The data
behind them is the run folder's (:mod:`pipeline.evaluation`), whose files it writes by name."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import textwrap
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PipelineError
from .files import atomic_path
from .kinds import get_kind
from .evaluation import ROW_PLOTS, Row, RunFolder, clean_ranking
from .validation import between, check

FEWSHOT_COLUMNS = ("backbone", "weights", "tap", "task", "head", "shots", "draws", "eval", "n_test",
                   "acc_mean", "acc_std", "acc_min", "acc_max", "accuracies", "error")
IDENTITY_COLUMNS = ("backbone", "weights", "spec", "tap", "task", "head", "eval")
TEST_COLUMNS = ("same_as_best", "above_chance", "fit_seconds")


def shown_columns(rows: Sequence[Row]) -> list[str]:
    """The Markdown leaderboard's columns: identity, the metric columns of the rows' task kinds, tests."""
    metrics = dict.fromkeys(c for kind in dict.fromkeys(r.task_kind for r in rows) for c in get_kind(kind).columns)
    return [*IDENTITY_COLUMNS, *metrics, *TEST_COLUMNS]


def publish(run: RunFolder) -> dict[str, Path]:
    """Write the run's renderings from its rows: ``leaderboard.md``, each task's best confusion matrix
    and ``report.html``."""
    md = run.artifact("leaderboard_md")
    with atomic_path(md) as tmp:
        tmp.write_text(markdown_table(run.rows()) + "\n")
    return {"md": md, **plot_best_confusions(run), "report": write_html_report(run)}


def time_summary(timings: dict[str, dict[str, float]]) -> str:
    """``timings`` (``stages``: wall seconds per stage; ``heads``: seconds each head's jobs computed,
    summed over the workers that ran them in parallel) as one line."""
    stages = ", ".join(f"{name} {s:.1f} s" for name, s in timings.get("stages", {}).items())
    heads = ", ".join(f"{name} {s:.1f} s" for name, s in sorted(timings.get("heads", {}).items(), key=lambda x: -x[1]))
    return f"time: {stages}" + (f"; per head, summed over workers: {heads}" if heads else "")


def write_fewshot(rows: Sequence[dict], run: RunFolder) -> dict[str, Path]:
    """Write ``fewshot.csv`` and ``fewshot.json`` (one row per backbone, tap, task, head and shots)."""
    paths = {name: run.artifact(name) for name in ("fewshot_csv", "fewshot_json")}
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


def write_html_report(run: RunFolder) -> Path:
    """Write ``report.html``: one static page (images inlined) with each task's leaderboard, accuracy by
    head × backbone, few-shot curves, confusion matrices, and the commands and versions behind them."""
    rows = run.rows()
    few_path = run.artifact("fewshot_json")
    fewshot = json.loads(few_path.read_text()) if few_path.is_file() else []
    e = html.escape
    body = [f"<h1>Run {e(run.path.name)}</h1>",
            f"<p>{len(rows)} leaderboard rows; written {e(time.strftime('%Y-%m-%d %H:%M:%S %z'))}. Rows marked "
            "&#9679; (shaded) are not distinguishable from their task's best (exact McNemar test for classes, a "
            "paired bootstrap for tags and numbers). <i>chance</i> is what predictions that know nothing of the "
            "images score on the same images: the expected score of the row's own predictions shuffled among "
            "the scored images of each fold; <i>&gt; chance</i> says whether the row beats it (a permutation "
            "test of those shuffles). Both tests are at 5 % after a Benjamini-Hochberg "
            "adjustment over the task's rows. Only rows scored on the task's protocol (the same images and "
            "folds) are ranked; rows scored on other images are listed apart. Row numbers are those of "
            "<code>pipeline report RUN_DIR --row N</code>.</p>"]
    audit = run.audit_page()
    if audit is not None:
        href = Path(os.path.relpath(audit.resolve(), run.path.resolve())).as_posix()
        body.append(f"<p>Data audit (label issues, near-duplicates across splits, outliers, map): "
                    f"<a href='{e(href)}'>{e(href)}</a></p>")
    for task in dict.fromkeys(r.task for r in rows):
        numbered = [(i, r) for i, r in enumerate(rows, 1) if r.task == task]
        protocol = run.protocol(task)
        body.append(f"<h2>Task {e(task)}</h2>")
        if protocol is not None:
            body.append(f"<p>Protocol {e(protocol.id)}: {e(protocol.describe())}.</p>")
        kind = get_kind(numbered[0][1].task_kind)
        metric, (low, high) = kind.primary, kind.interval
        best = next((r for _, r in numbered if r.comparable and r.scored), None)
        if best is not None:
            m = best.metrics
            body.append(f"<p>Best: <b>{e(best.backbone)} / {e(best.tap)} / {e(best.head)}</b>, {metric} "
                        f"{_fmt(m[metric])} (95 % CI {_fmt(m.get(low))}&ndash;{_fmt(m.get(high))}) "
                        f"on {e(best.eval)}, n = {best.n_test}.</p>")
        holds = clean_ranking([r for _, r in numbered]).get(task)
        if holds:
            body.append(f"<p>Without the scored images set aside (copies of training images): {e(holds)}.</p>")
        body.append("<h3>Leaderboard</h3>" + _html_leaderboard([(i, r) for i, r in numbered if r.comparable], kind))
        apart = [(i, r) for i, r in numbered if not r.comparable]
        if apart:
            body.append("<h3>Scored on other images (not ranked)</h3>" + _html_leaderboard(apart, kind))
        body.append(f"<h3>{e(metric)} by head &times; backbone</h3>" + _html_grid([r for _, r in numbered if r.comparable]))
        if any(r["task"] == task for r in fewshot):
            shots, table = fewshot_table(fewshot, task)
            body.append("<h3>Few-shot: accuracy against labelled examples per class</h3>")
            body.append(_html_image(run.artifact("fewshot_plot", task)))
            body.append(_html_table(["head / backbone"] + shots, [[name] + vals for name, vals in table]))
        if kind.single_label:
            body.append("<h3>Confusion matrix of the best row</h3>" + _html_image(run.artifact("confusion", task)))
    extra = [p for n in range(1, len(rows) + 1) for name in ROW_PLOTS if (p := run.artifact(name, row=n)).is_file()]
    if extra:
        body.append("<h2>Other rows (pipeline report --row)</h2>" + "".join(_html_image(p) for p in extra))
    body.append("<h2>How this was made</h2>")
    for entry in run.history():
        body.append(f"<h3>{e(entry['stage'])}, finished {e(entry['finished'])} ({entry['seconds']} s)</h3>"
                    f"<pre>{e(entry['command'])}</pre>"
                    + (f"<p>{e(time_summary(entry['timings']))}</p>" if entry.get("timings") else "")
                    + ("<ul>" + "".join(f"<li>note: {e(n)}</li>" for n in entry["notes"]) + "</ul>" if entry.get("notes") else "") +
                    f"<details><summary>parameters</summary><pre>{e(json.dumps(entry['parameters'], indent=1))}</pre></details>"
                    f"<p>{e(', '.join(f'{k} {v}' for k, v in entry['versions'].items()))}; {e(entry['machine'])}</p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pipeline report: {e(run.path.name)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    path = run.artifact("report")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px;display:block;max-width:100%;overflow-x:auto}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}tr.same td{background:#eef6ee}tr.best td{font-weight:bold}
td.err{color:#a33;text-align:left;font-size:12px;max-width:420px}img{max-width:100%;border:1px solid #eee}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}h2{border-bottom:2px solid #ddd;margin-top:32px}"""


def _html_leaderboard(numbered: list[tuple[int, Row]], kind) -> str:
    """The rows of one task with its kind's metric columns (the primary metric's interval in one cell)."""
    e = html.escape
    metric, (low, high), others = kind.primary, kind.interval, kind.other_columns()
    head = ["#", "backbone", "tap", "head", "eval", "n", e(metric), "95 % CI", *map(e, others), "p vs best", "",
            "&gt; chance", "fit s", "note"]
    left = {1, 2, 3, len(head) - 1}
    out = ["<table><tr>" + "".join(f"<th class='l'>{h}</th>" if i in left else f"<th>{h}</th>"
                                   for i, h in enumerate(head)) + "</tr>"]
    first = True
    for n, r in numbered:
        m = r.metrics
        cls = "best same" if first and r.comparable and r.scored else "same" if r.same_as_best else ""
        first = False
        ci = f"{_fmt(m.get(low))}&ndash;{_fmt(m.get(high))}" if m.get(low) is not None else ""
        cells = [str(n), f"<td class='l'>{e(r.backbone)}", f"<td class='l'>{e(r.tap)}",
                 f"<td class='l'>{e(r.head)}", e(r.eval), _fmt(r.n_test), _fmt(m.get(metric)), ci,
                 *(_fmt(m.get(c)) for c in others), _fmt(r.p_vs_best), "&#9679;" if r.same_as_best else "",
                 {True: "yes", False: "<b>no</b>"}.get(r.above_chance, ""), _fmt(r.fit_seconds),
                 f"<td class='err'>{e('; '.join(x for x in (r.error, r.warnings) if x))}"]
        out.append(f"<tr class='{cls}'>" + "".join(c if c.startswith("<td") else f"<td>{c}" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def _html_grid(rows: list[Row]) -> str:
    """Heads down, backbones (and taps) across, cells shaded from the lowest primary metric to the highest."""
    e = html.escape
    several_taps = len({r.tap for r in rows}) > 1
    col = lambda r: f"{r.backbone} / {r.tap}" if several_taps else r.backbone  # noqa: E731
    cols = list(dict.fromkeys(col(r) for r in rows))
    grid: dict[str, dict[str, float | None]] = {}
    for r in rows:
        grid.setdefault(r.head, {})[col(r)] = r.score
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


def plot_best_confusions(run: RunFolder) -> dict[str, Path]:
    """``confusion_<task>.png`` of each task's best row, from its saved predictions."""
    files = {}
    for task in dict.fromkeys(r.task for r in run.rows() if get_kind(r.task_kind).single_label):
        try:
            best = run.best_row(task)
        except PipelineError:
            continue
        _, y_true, y_pred = run.read_predictions(best)
        title = f"{best.backbone} / {best.tap} / {best.head} on {task} ({best.eval}): acc {best.score:.3f}"
        classes = sorted(set(y_true) | set(y_pred))
        files[f"confusion_{task}"] = plot_confusion(y_true, y_pred, classes, run.artifact("confusion", task), title)
    return files


def row_report(run_dir: str | os.PathLike, row: int) -> dict:
    """Leaderboard row ``row`` (counted from 1 as in ``leaderboard.md``) scored part by part, as its task's
    kind breaks it down (:meth:`~pipeline.kinds.TaskKind.breakdown`: by class, by tag, by range of the
    target), and its plot written into the run (``confusion_row<N>.png`` or ``scatter_row<N>.png``), if
    the kind draws one: ``dict(row=, breakdown=, png=)``."""
    run = RunFolder(run_dir)
    rows = run.rows()
    check(dict(row=row), dict(row=between(1, len(rows))))  # the run's rows, counted from 1
    r = rows[row - 1]
    _, y_true, y_pred = run.read_predictions(r)
    protocol = run.protocol(r.task)
    kind = get_kind(r.task_kind)
    try:
        found = kind.breakdown(y_true, y_pred, protocol.names if protocol is not None else [])
    except NotImplementedError:
        raise PipelineError(f"row {row} is of a {r.task_kind} task, whose kind breaks no score down") from None
    title = f"{r.backbone} / {r.tap} / {r.head} on {r.task} ({r.eval}): {kind.primary} {r.score:.3f}"
    png = None
    if found.confusion is not None:
        png = plot_confusion(y_true, y_pred, found.labels, run.artifact("confusion_row", row=row), title)
    elif found.scatter is not None:
        png = plot_scatter(*found.scatter, run.artifact("scatter_row", row=row), title)
    return dict(row=r, breakdown=found, png=png)


def table_lines(columns: Sequence[str], lines: Sequence[tuple]) -> list[str]:
    """A plain-text table, each column as wide as its widest cell, numbers to 4 decimals."""
    cells = [list(columns)] + [[_fmt(v) if isinstance(v, float) else str(v) for v in line] for line in lines]
    widths = [max(len(c[j]) for c in cells) for j in range(len(columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """The rows as Markdown, one table per task kind (each with its own metric columns); rows scored on
    other images than their task's protocol are marked."""
    if columns is None and len({r.task_kind for r in rows}) > 1:
        kinds = dict.fromkeys(r.task_kind for r in rows)
        return "\n\n".join(markdown_table([r for r in rows if r.task_kind == k]) for k in kinds)
    columns = columns or shown_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for r in rows:
        d = r.to_dict()
        cells = [_fmt(d.get(c)) for c in columns]
        if not r.comparable:
            cells[columns.index("eval")] += " (other images, not ranked)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MANY_CLASSES = 30  # above this a confusion matrix is drawn as a heat map without counts


def plot_confusion(y_true: Sequence, y_pred: Sequence, labels: Sequence[str], path: str | os.PathLike, title: str) -> Path:
    """Save a confusion-matrix PNG (rows: true class, columns: predicted)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    n = len(labels)
    many = n > MANY_CLASSES  # no counts in the cells, a bounded figure: 100 classes drew 6,000 x 6,000 pixels (2 GB)
    side = min(0.12 * n, 12) if many else 0.5 * n
    fig, ax = plt.subplots(figsize=(max(4, side + 3), max(3.5, side + 2.5)))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(labels), ax=ax, colorbar=many,
                                            include_values=not many, xticks_rotation=45 if n > 6 else "horizontal")
    if many:
        ax.tick_params(labelsize=max(2, 8 - n // 25))
    return _save(fig, ax, title, path)


def plot_scatter(y_true: np.ndarray, y_pred: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """Save a PNG of predictions against the truth, the line where they are equal drawn (many points as
    a hexagonal heat map)."""
    fig, ax = _pyplot().subplots(figsize=(5, 4.5))
    if len(y_true) > 5000:
        ax.hexbin(y_true, y_pred, gridsize=60, bins="log", mincnt=1)
    else:
        ax.scatter(y_true, y_pred, s=8, alpha=0.6)
    ends = [min(y_true.min(), y_pred.min()), max(y_true.max(), y_pred.max())]
    ax.plot(ends, ends, color="grey", linewidth=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    return _save(fig, ax, title, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, title: str, path: str | os.PathLike) -> Path:
    """Title the figure, write it as PNG (atomically) and let it go."""
    ax.set_title(textwrap.fill(title, 48), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    _pyplot().close(fig)
    return Path(path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return "" if v is None else str(v)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v)}")
