import csv
import shutil
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, TINY_VIT, make_image, run_cli
from pipeline import FeatureCache, PipelineError, RunFolder, extract, fit, predict

featurizer_module = import_module("pipeline.featurizer")


def _head(result, name):
    return result.out / next(r.head_file for r in result.rows if r.head == name)


def test_predict_with_a_saved_head(tiny_run, tmp_path):
    head = _head(tiny_run["fit"], "logreg")
    [make_image(tmp_path / "new" / f"r{i}.jpg", (205, 35, 45), 100 + i) for i in range(3)]
    [make_image(tmp_path / "new" / f"b{i}.jpg", (35, 55, 215), 200 + i) for i in range(3)]
    (tmp_path / "new" / "broken.jpg").write_text("nope")
    rows = predict(head, [tmp_path / "new"], out=tmp_path / "preds.csv", workers=0, progress=False)
    assert len(rows) == 7
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert "not an image Pillow can read" in by_name["broken.jpg"]["error"]
    assert by_name["broken.jpg"]["prediction"] == ""
    for name, row in by_name.items():
        if name != "broken.jpg":
            assert row["prediction"] == ("red" if name.startswith("r") else "blue")
            assert row["prob_red"] + row["prob_blue"] == pytest.approx(1.0)
    with open(tmp_path / "preds.csv") as fh:
        assert list(list(csv.DictReader(fh))[0]) == ["path", "prediction", "error", "prob_blue", "prob_red"]


def test_predict_reuses_cached_rows_without_running_the_backbone(tiny_run, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the backbone should not run for images already in the cache")

    monkeypatch.setattr(featurizer_module.Featurizer, "load", fail)
    images = sorted((tiny_run["data"] / "val").rglob("*.jpg"))
    rows = predict(tiny_run["run"], images, progress=False)
    assert len(rows) == 12 and all(r["prediction"] in ("red", "blue") for r in rows)


def test_run_dir_uses_its_best_row(tiny_run):
    from pipeline import best_row
    from pipeline.stages.predict import resolve_model

    best = best_row(tiny_run["fit"].rows)
    assert resolve_model(tiny_run["run"]).head_path == tiny_run["run"] / best.head_file


def test_a_run_predicts_with_the_row_it_is_given(tiny_run):
    """``row`` picks a leaderboard row other than the best, as export and serve take it: that row's head
    predicts (its probabilities are its .skops file's), with the run's ood columns; a row the
    leaderboard lacks is refused."""
    run = RunFolder(tiny_run["run"])
    rows, best = run.rows(), run.best_row()
    k = next(k for k, r in enumerate(rows, 1) if r.task == best.task and r.head != best.head)
    images = sorted((tiny_run["data"] / "val").rglob("*.jpg"))[:4]
    got = predict(tiny_run["run"], images, row=k, progress=False)
    alone = predict(tiny_run["run"] / rows[k - 1].head_file, images, progress=False)
    by_best = predict(tiny_run["run"], images, progress=False)
    assert [r["prob_red"] for r in got] == pytest.approx([r["prob_red"] for r in alone])
    assert [r["prob_red"] for r in got] != pytest.approx([r["prob_red"] for r in by_best])
    assert "ood_score" in got[0] and "ood_score" not in alone[0]
    with pytest.raises(PipelineError, match="row"):
        predict(tiny_run["run"], images, row=len(rows) + 1, progress=False)


@pytest.mark.slow
def test_a_moved_run_works_from_any_directory(tiny_run, tmp_path):
    """The issue's observation: run folders only worked from where `fit` ran. Paths inside a run are
    relative to it, so a copy used from another directory reads its own heads, and still works once the
    original is gone; the caches it names are found by their absolute path."""
    original = Path(shutil.copytree(tiny_run["run"], tmp_path / "original"))
    images = sorted((tiny_run["data"] / "val").rglob("*.jpg"))
    expected = predict(original, images, workers=0, progress=False)
    moved = Path(shutil.copytree(original, tmp_path / "elsewhere" / "moved"))
    shutil.rmtree(original)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = run_cli("predict", "../elsewhere/moved", *images, "--workers", "0", "--no-progress", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    got = list(csv.DictReader(r.stdout.splitlines()))
    assert [g["prediction"] for g in got] == [e["prediction"] for e in expected]
    # a copy reads its own heads: change the copy's best head and the copy's predictions follow it
    best = RunFolder(moved).best_row()
    other = next(r for r in RunFolder(moved).rows() if r.head != best.head)
    shutil.copy(moved / other.head_file, moved / best.head_file)
    assert [r["prob_red"] for r in predict(moved, images, workers=0, progress=False)] == \
        [r["prob_red"] for r in predict(moved / other.head_file, images, workers=0, progress=False)]


@pytest.mark.slow
def test_missing_weights_fail_at_once_naming_where_they_were_looked_for(tiny_run, tmp_path, monkeypatch, tiny_weights_dir):
    """A head whose recorded weights file is gone, with no PIPELINE_WEIGHTS_DIR: one clear error within
    seconds (never a wait on the hub); --weights FILE puts it right, matched by its sha256."""
    weights = Path(shutil.copytree(tiny_weights_dir, tmp_path / "w"))
    [res] = extract(tiny_run["data"], TINY, tmp_path / "cache", weights=weights / f"{TINY}.safetensors", workers=0,
                    progress=False)
    out = fit(res.cache, tmp_path / "run", heads=["logreg"], n_jobs=1, progress=False)
    head = _head(out, "logreg")
    moved_to = tmp_path / "kept.safetensors"
    (weights / f"{TINY}.safetensors").rename(moved_to)
    monkeypatch.delenv("PIPELINE_WEIGHTS_DIR")
    image = make_image(tmp_path / "new.jpg", (205, 35, 45), 999)
    start = time.monotonic()
    with pytest.raises(PipelineError, match=f"no weights for {TINY} with sha256 .*{weights / TINY}.safetensors "
                                            r"\(missing\).*PIPELINE_WEIGHTS_DIR \(not set\); pass --weights FILE"):
        predict(head, [image], workers=0, progress=False)
    assert time.monotonic() - start < 10
    other = tmp_path / "other.safetensors"
    shutil.copy(tiny_weights_dir / f"{TINY_VIT}.safetensors", other)
    with pytest.raises(PipelineError, match="other weights"):
        predict(head, [image], weights=[other], workers=0, progress=False)
    [row] = predict(head, [image], weights=[other, moved_to], workers=0, progress=False)
    assert row["prediction"] == "red"
    r = run_cli("predict", head, image, "--weights", moved_to, "--workers", "0", "--no-progress",
                env={"PIPELINE_WEIGHTS_DIR": ""})
    assert r.returncode == 0 and ",red," in r.stdout, r.stderr


def test_tta_head_predicts_reencoded_images_as_it_predicts_cached_ones(tiny_run, tmp_path):
    """The issue's observation: predict ignored the cache's TTA. A head fit on flip-averaged features
    gives re-encoded images (PNG: other bytes, so computed anew) the probabilities the same images get
    from the cache."""
    [res] = extract(tiny_run["data"], TINY, tmp_path / "cache", tta="flip", workers=0, progress=False)
    out = fit(res.cache, tmp_path / "run", heads=["logreg"], n_jobs=1, progress=False)
    images = sorted((tiny_run["data"] / "val").rglob("*.jpg"))[:10]
    for p in images:
        Image.open(p).save(tmp_path / f"{p.stem}.png")
    pngs = [tmp_path / f"{p.stem}.png" for p in images]
    cached = predict(out.out, images, workers=0, progress=False)
    fresh = predict(out.out, pngs, workers=0, progress=False)
    np.testing.assert_allclose([r["prob_red"] for r in fresh], [r["prob_red"] for r in cached], atol=0.02)
    # the check can fail: without the flip the features differ from what the head was trained on
    with FeatureCache(res.cache) as c:
        spec, stored = c.spec, c.features("pooled", np.array([list(c.ids).index(str(p.relative_to(tiny_run["data"]))) for p in images]))
    from dataclasses import replace

    from pipeline import Featurizer
    from pipeline.data import Sample

    samples = [Sample(str(p), p) for p in pngs]
    diffs = {}
    for tta in ("flip", ""):
        fz = Featurizer.load(replace(spec, tta=tta), device="cpu")
        [(_, feats, _)] = list(fz.batches(samples, ("pooled",), 16, 0))
        diffs[tta] = np.abs(feats["pooled"] - stored).max() / np.abs(stored).max()
    assert diffs["flip"] < 0.02 < diffs[""]


def test_not_a_model_and_missing_images_are_said_before_any_model_loads(tmp_path, tiny_run, monkeypatch):
    from pipeline.stages import predict as predict_module

    image = next((tiny_run["data"] / "val" / "red").glob("*.jpg"))
    with pytest.raises(PipelineError, match="cannot use .* as a model"):
        predict(tmp_path, [image])
    monkeypatch.setattr(predict_module, "LoadedModel", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(PipelineError, match="missing.jpg"):
        predict(tiny_run["run"], [tmp_path / "missing.jpg"])


@pytest.mark.slow
def test_cli_predict_to_stdout(tiny_run):
    image = next((tiny_run["data"] / "val" / "red").glob("*.jpg"))
    r = run_cli("predict", tiny_run["run"], image, "--no-progress")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("path,prediction,error,prob_") and len(lines) == 2
    r = run_cli("predict", tiny_run["run"], image, "--row", "99", "--no-progress")
    assert r.returncode == 1 and "row" in r.stderr, r.stderr


def test_a_knn_head_keeps_ids_and_reads_its_training_features_from_the_cache(tiny_run, tmp_path):
    from pipeline import load_head
    from pipeline.heads import read_head

    light = fit(tiny_run["cache"], tmp_path / "light", heads=["knn"], n_jobs=1, progress=False)
    portable = fit(tiny_run["cache"], tmp_path / "portable", heads=["knn"], n_jobs=1, progress=False, portable=True)
    small, whole = _head(light, "knn"), _head(portable, "knn")
    assert whole.stat().st_size - small.stat().st_size > 0.8 * 24 * 256 * 4  # the 24 training rows' float32 features
    raw = read_head(small)
    with pytest.raises(PipelineError, match=r"holds the ids of its 24 training images, not their features: load "
                                            r"it with pipeline.load_head\(path\)"):
        raw.predict(np.zeros((1, raw.n_features_in_), np.float32))
    ids = RunFolder(light.out).protocol("shapes").ids
    X = FeatureCache(tiny_run["cache"]).features(rows=FeatureCache(tiny_run["cache"]).rows_of(ids))
    a, b = load_head(small), load_head(whole)
    np.testing.assert_array_equal(a._fit_X, b._fit_X)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    with pytest.raises(PipelineError, match="not those it was fit on"):
        raw.with_rows(a._fit_X + 1)
    moved = tmp_path / "elsewhere" / "cache.h5"
    moved.parent.mkdir()
    shutil.move(tiny_run["cache"], moved)
    try:
        with pytest.raises(PipelineError, match="not reachable .*; this knn head reads its training features from it "
                                                r"\(a head fit with --portable carries them\)"):
            load_head(small)
        assert load_head(whole).predict(X).shape == (len(X),)
    finally:
        shutil.move(moved, tiny_run["cache"])


def test_an_out_that_cannot_be_written_is_said_before_any_model_loads(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(featurizer_module, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
    image = make_image(tmp_path / "a.jpg", (200, 40, 40), 1)
    with pytest.raises(PipelineError, match=f"--out must be a CSV file to write, got the folder {tmp_path}"):
        predict(tiny_run["run"], [image], out=tmp_path, progress=False)
