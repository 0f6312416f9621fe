"""Prediction sets and out-of-distribution scores (``predict --coverage``, ``ood_score``), measured on
generated features: Gaussian classes (and a number over the same points) fit with a train/val split,
calibrated on val, checked on fresh points from the same distributions; by scikit-learn heads (fast, five
seeds), and end to end through ``fit`` and ``LoadedModel`` (one seed; five in a slow test)."""

import math
import shutil

import h5py
import numpy as np
import pytest

from sklearn.linear_model import LogisticRegression, Ridge

from pipeline import LoadedModel, PipelineError, RunFolder, fit
from pipeline.conformal import Calibration, class_conformity, number_conformity, threshold

LATENT, CLASSES, N_TRAIN, N_VAL, N_TEST = 8, ("a", "b", "c"), 400, 1000, 4000


class Blobs:
    """Three overlapping Gaussian classes in a latent space, seen through a fixed projection into the
    cache's feature width, and a number that is a noisy linear function of the latent point."""

    def __init__(self, seed: int, dim: int):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.means = rng.normal(0, 1.2, (len(CLASSES), LATENT))
        self.projection = rng.normal(0, 1, (LATENT, dim)) / math.sqrt(LATENT)
        self.offset = rng.normal(0, 1, dim)
        self.w = rng.normal(0, 1, LATENT)

    def draw(self, n: int, shift: float = 0.0):
        y = self.rng.integers(0, len(CLASSES), n)
        z = self.means[y] + self.rng.normal(0, 1, (n, LATENT)) + shift
        X = z @ self.projection + self.offset + self.rng.normal(0, 0.05, (n, len(self.offset)))
        target = z @ self.w + self.rng.normal(0, 0.5, n)
        return X.astype(np.float32), np.array(CLASSES)[y], target


def _generated_cache(template, path, X, labels, splits):
    """``template`` (an extracted cache) with its rows replaced by ``X``, ``labels`` and ``splits``."""
    shutil.copy(template, path)
    n = len(X)
    with h5py.File(path, "r+") as f:
        ids = [f"{s}/{i:05d}.jpg" for i, s in enumerate(splits)]
        hashes = [i.to_bytes(f["content_hash"].dtype.itemsize, "big") for i in range(n)]
        for name, values in (("ids", ids), ("labels", labels), ("splits", splits), ("content_hash", hashes),
                             ("valid", np.ones(n, bool))):
            f[name].resize((n,))
            f[name][:] = values
        f["features/pooled"].resize((n, X.shape[1]))
        f["features/pooled"][:] = X
        f.attrs["source"] = "blobs"
    return ids


def _blob_run(template, base, seed: int) -> dict:
    """The generated data of ``seed``, its cache and its run (torch-logreg on the classes ``blobs``,
    torch-linear on the numbers ``number``)."""
    with h5py.File(template) as f:
        blobs = Blobs(seed, f["features/pooled"].shape[1])
    X, y, target = blobs.draw(N_TRAIN + N_VAL)
    splits = np.array(["train"] * N_TRAIN + ["val"] * N_VAL)
    base.mkdir(parents=True, exist_ok=True)
    cache = base / template.name
    ids = _generated_cache(template, cache, X, y, splits)
    numbers = base / "number.csv"
    numbers.write_text("id,target,split\n" + "".join(f"{i},{t:.6f},{s}\n" for i, t, s in zip(ids, target, splits)))
    fit(cache, base / "run", labels=[numbers], heads=["torch-logreg", "torch-linear"], n_jobs=1, progress=False)
    return dict(blobs=blobs, run=base / "run", cache=cache)


@pytest.fixture(scope="module")
def blob_run(tiny_run, tmp_path_factory):
    return _blob_run(tiny_run["cache"], tmp_path_factory.mktemp("blobs"), 0)


def _class_coverage(run, blobs: Blobs, coverage: float) -> tuple[float, float]:
    """Coverage and mean size of ``run``'s sets of fresh points."""
    X, y, _ = blobs.draw(N_TEST)
    rows = LoadedModel(run, task="blobs", coverage=coverage).columns(X)
    sets = [row["prediction_set"].split("|") if row["prediction_set"] else [] for row in rows]
    return np.mean([t in s for t, s in zip(y, sets)]), np.mean([len(s) for s in sets])


def _number_coverage(run, blobs: Blobs, coverage: float) -> float:
    X, _, target = blobs.draw(N_TEST)
    rows = LoadedModel(run, task="number", coverage=coverage).columns(X)
    low, high = (np.array([row[k] for row in rows]) for k in ("prediction_low", "prediction_high"))
    assert np.all(low < np.array([row["prediction"] for row in rows])) and np.all(high > low)
    return np.mean((low <= target) & (target <= high))


def test_threshold_is_the_corrected_quantile():
    scores = np.arange(1, 11) / 10  # n = 10
    assert threshold(scores, 0.9) == 1.0  # ceil(11 * 0.9) = 10th smallest
    assert threshold(scores, 0.8) == 0.9  # ceil(11 * 0.8) = 9th
    assert threshold(scores, 0.95) == math.inf  # the 11th of 10: every class is in
    assert class_conformity(np.array(["b", "a"]), np.array([[0.2, 0.8], [0.7, 0.3]]), ["a", "b"]) == \
        pytest.approx([0.2, 0.3])


def test_fit_saves_the_scores_of_every_row(blob_run):
    run = RunFolder(blob_run["run"])
    row = run.best_row("blobs")
    ids, true, _ = run.read_predictions(row)
    scores = run.read_scores(row)
    assert scores.shape == (N_VAL, len(CLASSES)) and np.allclose(scores.sum(1), 1.0)
    # the saved scores are those the metrics read: their AUROC is the row's
    from sklearn.metrics import roc_auc_score
    auroc = np.mean([roc_auc_score(true == c, scores[:, j]) for j, c in enumerate(CLASSES)])
    assert auroc == pytest.approx(row.metrics["auroc"])


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_split_conformal_covers_fresh_points_as_asked(coverage):
    """The calibration alone, by scikit-learn heads on five seeds: within 2 points of the target."""
    covered, sizes, intervals = [], [], []
    for seed in range(5):
        blobs = Blobs(seed, 32)
        (X, y, t), (X_val, y_val, t_val), (X_test, y_test, t_test) = (blobs.draw(n) for n in (N_TRAIN, N_VAL, N_TEST))
        head = LogisticRegression(max_iter=1000).fit(X, y)
        q = threshold(class_conformity(y_val, head.predict_proba(X_val), list(CLASSES)), coverage)
        rows = Calibration("classification", coverage, q, N_VAL).columns(list(CLASSES), head.predict_proba(X_test))
        sets = [r["prediction_set"].split("|") if r["prediction_set"] else [] for r in rows]
        covered.append(np.mean([c in s for c, s in zip(y_test, sets)]))
        sizes.append(np.mean([len(s) for s in sets]))
        ridge = Ridge().fit(X, t)
        q = threshold(number_conformity(t_val, ridge.predict(X_val)), coverage)
        rows = Calibration("regression", coverage, q, N_VAL).columns([], ridge.predict(X_test))
        intervals.append(np.mean([r["prediction_low"] <= v <= r["prediction_high"] for r, v in zip(rows, t_test)]))
    assert abs(np.mean(covered) - coverage) < 0.02, covered
    assert abs(np.mean(intervals) - coverage) < 0.02, intervals
    assert 0.5 < np.mean(sizes) < 2.0  # neither a single class always nor every class


def test_predict_sets_are_calibrated_on_the_runs_saved_scores(blob_run):
    covered, size = _class_coverage(blob_run["run"], blob_run["blobs"], 0.9)
    assert abs(covered - 0.9) < 0.04 and size < 2.0
    assert abs(_number_coverage(blob_run["run"], blob_run["blobs"], 0.9) - 0.9) < 0.04


@pytest.mark.slow
def test_predict_sets_cover_fresh_points_over_seeds(tiny_run, tmp_path):
    runs = [_blob_run(tiny_run["cache"], tmp_path / str(seed), seed) for seed in range(5)]
    classes = [_class_coverage(r["run"], r["blobs"], 0.9)[0] for r in runs]
    numbers = [_number_coverage(r["run"], r["blobs"], 0.9) for r in runs]
    assert abs(np.mean(classes) - 0.9) < 0.02, classes
    assert abs(np.mean(numbers) - 0.9) < 0.02, numbers


def test_ood_flags_points_from_elsewhere_and_few_from_the_training_distribution(blob_run):
    r = blob_run
    loaded = LoadedModel(r["run"], task="blobs")
    same, _, _ = r["blobs"].draw(N_TEST)
    elsewhere, _, _ = r["blobs"].draw(N_TEST, shift=10.0)
    flagged_same = np.mean([row["ood"] for row in loaded.columns(same)])
    scores = [row["ood_score"] for row in loaded.columns(elsewhere)]
    assert flagged_same < 0.03  # 1 % expected past the 99th percentile
    assert np.mean(np.array(scores) > 99) > 0.9 and max(scores) == 100.0


def test_ood_columns_are_empty_with_a_note_when_the_cache_is_gone(blob_run, tmp_path):
    r = blob_run
    run = shutil.copytree(r["run"], tmp_path / "run")
    moved = r["cache"].rename(tmp_path / "elsewhere.h5")
    try:
        loaded = LoadedModel(run, task="blobs")
        rows = loaded.columns(r["blobs"].draw(3)[0])
    finally:
        moved.rename(r["cache"])
    assert [(row["ood_score"], row["ood"]) for row in rows] == [("", "")] * 3
    assert "not reachable" in loaded.ood_note and rows[0]["prediction"] in CLASSES


def test_coverage_needs_a_run_folder(blob_run):
    run = RunFolder(blob_run["run"])
    with pytest.raises(PipelineError, match="run folder"):
        LoadedModel(run.resolve(run.best_row("blobs").head_file), coverage=0.9)
    with pytest.raises(PipelineError, match="coverage"):
        LoadedModel(blob_run["run"], task="blobs", coverage=1.5)


def test_a_fit_by_chunks_has_an_ood_reference_of_a_sample_of_its_training_images(tiny_run, tmp_path, monkeypatch):
    """Features never loaded (every head reads by chunks) and more training images than a reference holds:
    the reference is made of a seeded sample read from the cache, and predict searches that sample."""
    import json

    from pipeline import ood

    monkeypatch.setattr(ood, "REFERENCE_ROWS", 150)
    with h5py.File(tiny_run["cache"]) as f:
        blobs = Blobs(1, f["features/pooled"].shape[1])
    X, y, _ = blobs.draw(N_TRAIN + 100)
    splits = np.array(["train"] * N_TRAIN + ["val"] * 100)
    cache = tmp_path / tiny_run["cache"].name
    _generated_cache(tiny_run["cache"], cache, X, y, splits)
    res = fit(cache, tmp_path / "run", heads=["torch-logreg"], n_jobs=1, progress=False, max_memory="1MB")
    assert res.rows[0].scored
    [path] = (tmp_path / "run" / "heads").glob("*.ood.json")
    saved = json.loads(path.read_text())
    assert saved["n"] == 150 and len(saved["ids"]) == 150 and all(i.startswith("train/") for i in saved["ids"])
    loaded = LoadedModel(tmp_path / "run")
    same, _, _ = blobs.draw(2000)
    elsewhere, _, _ = blobs.draw(200, shift=10.0)
    assert np.mean([row["ood"] for row in loaded.columns(same)]) < 0.04  # 1 % expected, 150 reference images
    assert np.mean([row["ood"] for row in loaded.columns(elsewhere)]) > 0.9
