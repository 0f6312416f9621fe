"""The run folder, one owner of its layout and rows: fitting again merges by row key and re-ranks,
another protocol is refused unless --overwrite, nothing is left half-made, and the fast probe is a
scikit-learn estimator."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_folder, run_cli
from pipeline import PipelineError, RunFolder, extract, finetune, fit

FAST = dict(batch_size=8, workers=0, device="cpu", progress=False)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Path(shutil.copytree(tiny_run["run"], tmp_path / "run"))


@pytest.mark.slow
def test_fitting_again_merges_rows_and_keeps_a_fine_tune(tiny_run, run_copy, tmp_path):
    """The issue's observation: a second fit into a used --out silently replaced the leaderboard and lost
    a fine-tune row. Now rows merge by key, the fine-tune stays, and every row is tested again."""
    finetune(tiny_run["data"], TINY, tmp_path / "ft", init=run_copy, epochs=1, **FAST)
    before = {r.key: r for r in RunFolder(run_copy).rows()}
    assert any(r.stage == "finetune" for r in before.values())
    heads_before = sorted(p.name for p in (run_copy / "heads").iterdir())
    again = fit(tiny_run["cache"], run_copy, heads=["logreg", "centroid"], n_jobs=1, progress=False)
    rows = {r.key: r for r in again.rows}
    assert set(before) <= set(rows) and len(rows) == len(before) + 1  # centroid added, nothing lost
    assert [r.key for r in again.rows] == [r.key for r in RunFolder(run_copy).rows()]
    ranked = [r for r in again.rows if r.comparable]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    assert sum(r.p_vs_best is None for r in ranked) == 1  # re-tested against one best row
    heads_after = sorted(p.name for p in (run_copy / "heads").iterdir())
    assert set(heads_before) < set(heads_after) and len(heads_after) == len(heads_before) + 4  # a head, card, predictions, scores
    r = run_cli("fit", tiny_run["cache"], "--out", run_copy, "--heads", "knn", "--n-jobs", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(RunFolder(run_copy).rows()) == len(rows)


@pytest.mark.slow
def test_another_protocol_is_refused_unless_overwritten(tmp_path):
    data = make_folder(tmp_path / "flat", n_train=8, n_val=2, splits=False)
    [res] = extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    run = tmp_path / "run"
    fit(res.cache, run, heads=["logreg", "knn"], n_jobs=1, progress=False)
    with pytest.raises(PipelineError, match="holds task 'flat' evaluated as cv5 .*this one would be cv4 .*evaluation "
                                            "cv5 -> cv4.*pass --overwrite"):
        fit(res.cache, run, heads=["knn"], cv=4, n_jobs=1, progress=False)
    r = run_cli("fit", res.cache, "--out", run, "--heads", "knn", "--seed", "1", "--n-jobs", "1", "--no-progress")
    assert r.returncode == 1 and "seed 0 -> 1" in r.stderr and r.stderr.count("\n") == 1
    assert len(RunFolder(run).rows()) == 2  # nothing was touched
    new = fit(res.cache, run, heads=["knn"], cv=4, overwrite=True, n_jobs=1, progress=False)
    assert [(r.head, r.eval) for r in new.rows] == [("knn", "cv4")]
    assert sorted(p.name for p in (run / "heads").iterdir()) == sorted(
        [Path(new.rows[0].head_file).with_suffix(s).name for s in (".skops", ".json", ".predictions.csv", ".scores.npy")]
        + [p.name for p in (run / "heads").glob("*.ood.json")])  # the task's ood reference, kept with its rows


def test_caches_of_one_backbone_with_other_specs_keep_their_own_rows(tiny_run, tmp_path):
    [f32] = extract(tiny_run["data"], TINY, tmp_path / "cache", dtype="float32", workers=0, progress=False)
    res = fit([tiny_run["cache"], f32.cache], tmp_path / "run", heads=["knn", "centroid"], n_jobs=1, progress=False)
    assert len(res.rows) == 4 and len({r.spec for r in res.rows}) == 2 and len({r.key for r in res.rows}) == 4


def test_a_failed_fit_creates_nothing(tiny_run, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("id,label\nnot/there.jpg,a\n")
    with pytest.raises(PipelineError, match="not in cache"):
        fit(tiny_run["cache"], tmp_path / "run", labels=[bad], progress=False)
    with pytest.raises(PipelineError, match="unknown head"):
        fit(tiny_run["cache"], tmp_path / "run", heads=["forest"], progress=False)
    assert not (tmp_path / "run").exists()


def test_rows_scored_on_other_images_are_shown_apart_and_never_picked(tiny_run, run_copy):
    """A row whose scored images differ from its task's protocol (here: one image short) is kept, marked
    not comparable, left out of the tests against the best row, and never what `predict RUN` uses."""
    run = RunFolder(run_copy)
    best = run.best_row()
    other = next(r for r in run.rows() if r.key != best.key)
    ids, y_true, y_pred = run.read_predictions(other)
    protocol = run.protocol(other.task)
    keep = np.array([i != ids[0] for i in protocol.ids])
    short = protocol.restricted(keep)
    forged = type(other)(**{**other.__dict__, "head": "forged", "protocol": short.id, "metrics": dict(other.metrics)})
    forged.metrics["accuracy"] = 1.0
    run.write_predictions(forged, ids[1:], y_true[1:], y_true[1:])
    rows = run.add_rows([forged])
    [got] = [r for r in rows if r.head == "forged"]
    assert not got.comparable and got.p_vs_best is None and got.same_as_best is None and got.above_chance is not None
    assert rows[-1].head == "forged"  # listed after the ranked rows
    assert run.best_row().key == best.key
    from pipeline.report import markdown_table

    assert "(other images, not ranked)" in markdown_table(rows)


@pytest.mark.slow
def test_cache_info_takes_several_caches_and_help_names_the_extras(tiny_run, tmp_path):
    """The issue's observations on the README's own steps: `cache info cache/*.h5` with two caches, and
    `fit --help` showing the extras' brackets."""
    [other] = extract(tiny_run["data"], TINY, tmp_path / "cache", dtype="float32", workers=0, progress=False)
    r = run_cli("cache", "info", tiny_run["cache"], other.cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("  backbone   ") == 2 and "JPEG draft on" in r.stdout
    r = run_cli("cache", "info", tiny_run["cache"], other.cache, "--json")
    assert [c["dtype"] for c in json.loads(r.stdout)] == ["float16", "float32"]
    r = run_cli("fit", "--help", env={"COLUMNS": "300"})
    assert "pip install -e '.[dask]' / '.[ray]'" in r.stdout, r.stdout


@pytest.mark.parametrize("make", ["TorchLogisticRegression()", "TorchLogisticRegression(cv=3)", "TorchLinearSVC()",
                                  "TorchMLPClassifier()", "TorchMLPRegressor()", "TorchMLPRegressor(scale_target=True)"])
def test_fast_probe_is_a_scikit_learn_estimator(make):
    """The issue's observation: check_estimator failed 8 of 55 checks; the batched heads pass too."""
    from sklearn.utils.estimator_checks import check_estimator

    from pipeline import linear_probe, mlp_probe

    results = check_estimator(eval(make, {**vars(linear_probe), **vars(mlp_probe)}), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed and len(results) >= 50