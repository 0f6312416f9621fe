"""The evaluation service (pipeline.evaluation): one policy opens a task's protocol for every stage, the run
folder names every file it owns, the head card is the one reader and writer of what a head needs, and a
metric is one registered function (AUROC, which reads class probabilities, is one)."""

import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import TINY, make_folder
from pipeline import FeatureCache, HeadCard, PipelineError, RunFolder, extract, fit, load_head, load_task
from pipeline.evaluation import ARTIFACTS, Labelled, open_task
from pipeline.kinds import get_kind
from pipeline.kinds.metrics import _METRICS, register_metric


def _labelled(n: int = 20, flip: int | None = None) -> Labelled:
    ids = np.array([f"img{i:02d}" for i in range(n)], dtype=object)
    y = np.array(["a", "b"] * (n // 2), dtype=object)
    if flip is not None:
        y[flip] = "b" if y[flip] == "a" else "a"
    return Labelled("t", "classification", ids, y, np.full(n, "", dtype=object))


def test_one_policy_opens_a_task_for_every_stage(tmp_path):
    run = RunFolder(tmp_path / "run")
    first, note = open_task(_labelled(), cv=5, seed=0, run=run)
    assert first.eval == "cv5" and note == ""
    run.save_protocol(first)

    same, _ = open_task(_labelled(), cv=5, seed=0, run=run, policy="exact")
    assert same.id == first.id
    with pytest.raises(PipelineError, match="evaluation cv5 -> cv4"):
        open_task(_labelled(), cv=4, seed=0, run=run, policy="exact")
    with pytest.raises(PipelineError, match="images 20 -> 18"):
        open_task(_labelled(18), cv=5, seed=0, run=run, policy="exact")

    # within: the run's protocol on the images a stage has (finetune, audit), whatever its own cv
    kept, note = open_task(_labelled(18), cv=3, seed=7, run=run, policy="within")
    assert list(kept.ids) == list(first.ids[:18]) and list(kept.folds) == list(first.folds[:18])
    assert kept.id != first.id and note.startswith("2 of the 20 images")
    whole, note = open_task(_labelled(), cv=3, seed=7, run=run, policy="within")
    assert whole.id == first.id and note == ""
    with pytest.raises(PipelineError, match="labels 'img03' 'b', the data 'a'"):
        open_task(_labelled(flip=3), cv=5, seed=0, run=run, policy="within")

    anew, _ = open_task(_labelled(), cv=4, seed=0, run=run, policy="replace")
    assert anew.eval == "cv4"
    with pytest.raises(PipelineError, match="policy must be one of exact, within, replace, got 'loose'"):
        open_task(_labelled(), cv=5, seed=0, run=run, policy="loose")


def test_every_file_of_a_run_is_named_by_the_run_folder(tiny_run, tmp_path):
    """No stage spells a run-folder path: what a fit (with few-shot curves and a per-row report) leaves
    at the top of the run is exactly what ARTIFACTS names, and --overwrite's clear removes all of it."""
    from pipeline.report import row_report

    run_dir = Path(shutil.copytree(tiny_run["run"], tmp_path / "run"))
    fit(tiny_run["cache"], run_dir, heads=["logreg"], shots=[1, 2], draws=2, n_jobs=1, progress=False)
    row_report(run_dir, 1)
    patterns = [p.format(task="*", row="*") for p in ARTIFACTS.values()]
    files = sorted(p.name for p in run_dir.iterdir() if p.is_file())
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files
    assert {"fewshot.csv", "confusion_row1.png", "leaderboard.md"} <= set(files)
    run = RunFolder(run_dir)
    assert run.artifact("fewshot_plot", "shapes") == run_dir / "fewshot_shapes.png"
    with pytest.raises(PipelineError, match="unknown run folder artifact 'plot'; choose from "):
        run.artifact("plot")
    (run_dir / "notes.txt").write_text("mine")
    run.clear()
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_head_card_is_read_as_it_was_written(tiny_run):
    run = RunFolder(tiny_run["run"])
    best = run.best_row()
    card = HeadCard.read(run.resolve(best.head_file))
    assert (card.head, card.task, card.tap, card.protocol) == (best.head, best.task, best.tap, best.protocol)
    assert card.classes == ["blue", "red"]
    [part] = card.parts
    with FeatureCache(tiny_run["cache"]) as cache:
        assert part.spec == cache.spec
    assert Path(tiny_run["cache"]).resolve() in [p.resolve() for p in part.caches(run.resolve(best.head_file).parent)]


def test_auroc_is_scored_from_the_heads_probabilities(tiny_run):
    """The auroc column of a held-out row is scikit-learn's ROC AUC of the saved head's probabilities of
    the val images (the refit model is the scored one when the task has a split)."""
    run = RunFolder(tiny_run["run"])
    kind = get_kind("classification")
    assert kind.columns[-1] == "auroc" and kind.needs_scores
    with FeatureCache(tiny_run["cache"]) as cache:
        ids = np.array(cache.ids, dtype=object)
        val = np.array([i.startswith("val/") for i in ids])
        X = cache.features("pooled", np.flatnonzero(val))
    y = np.array([i.split("/")[1] for i in ids[val]])
    for row in run.rows():
        head = load_head(run.resolve(row.head_file))
        p = kind.scores(head, X, ["blue", "red"])
        assert row.metrics["auroc"] == pytest.approx(roc_auc_score(y == "red", p[:, 1]), abs=1e-12), row.head


def test_a_metric_is_one_registered_function(tiny_run, tmp_path):
    """Registering a function adds its column to every row of its kind; nothing else changes."""
    @register_metric("classification", "errors")
    def errors(y_true, y_pred, names):
        return float(np.sum(np.asarray(y_true) != np.asarray(y_pred)))

    try:
        result = fit(tiny_run["cache"], tmp_path / "run", heads=["knn"], n_jobs=1, progress=False)
        [row] = result.rows
        assert row.metrics["errors"] == round((1 - row.metrics["accuracy"]) * row.n_test)
        assert "errors" in (tmp_path / "run" / "leaderboard.csv").read_text().splitlines()[0].split(",")
    finally:
        del _METRICS["classification"]["errors"]


def test_a_tasks_folds_are_the_ones_fit_scores(tiny_run, tmp_path):
    """``task.folds()`` gives scikit-learn the (train, test) indices fit evaluates on: the val split of data
    with one, the run's folds of data without one."""
    task = load_task(tiny_run["cache"])
    [(train, test)] = task.folds()
    assert set(task.splits[train]) == {"train"} and set(task.splits[test]) == {"val"}
    data = make_folder(tmp_path / "flat", n_train=8, n_val=2, splits=False)
    [res] = extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    flat = load_task(res.cache)
    with pytest.raises(PipelineError, match=r"its cross-validation folds are task.folds\(\)"):
        flat.holdout()
    fit(res.cache, tmp_path / "run", heads=["knn"], cv=4, n_jobs=1, progress=False)
    protocol = RunFolder(tmp_path / "run").protocol("flat")
    folds = flat.folds(run=tmp_path / "run")
    assert len(folds) == 4 and sorted(np.concatenate([t for _, t in folds])) == list(range(20))
    for k, (train, test) in enumerate(folds):
        assert set(flat.ids[test]) == set(protocol.ids[protocol.folds == k])
        assert not set(train) & set(test)
    assert [list(t) for _, t in flat.folds(cv=4)] == [list(t) for _, t in folds]  # the same as fit decides
