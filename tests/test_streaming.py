"""The streaming ridge (pipeline.streaming): the same models as scikit-learn's ridges, from sums read in
one pass; the batched linear heads on features read by chunks; and ``fit --max-memory``."""

import re
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.preprocessing import StandardScaler

from pipeline.batched import RowChunks
from pipeline.cache import FeatureCache
from pipeline.errors import PipelineError
from pipeline import load_head
from pipeline.heads import create_head, fit_by_chunks, fit_subsets
from pipeline.stages.fit import FitConfig, fit
from pipeline.validation import parse_size
from pipeline.streaming import (Moments, StreamingRidge, StreamingRidgeClassifier, fit_subsets_in_one_pass, ridge_path,
                                squared_error)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 8)) * rng.uniform(0.1, 5, 8) + rng.normal(size=8) * 3
    w = rng.normal(size=(8, 3))
    labels = np.array(["ant", "bee", "cat"])[np.argmax(X @ w + rng.normal(size=(150, 3)), axis=1)]
    return X, X @ w[:, 0] + rng.normal(size=150), labels, (X @ w + rng.normal(size=(150, 3)) > 0).astype(int)


def test_rows_read_from_disk_are_solved_from_a_sample_first_and_reach_the_same_model(monkeypatch):
    """Over four chunks or more, the first L-BFGS solve on the chunks starts where the same problems
    solved on a chunk's worth of sampled rows held in memory end, and reaches the model the start from
    zeros in memory reaches (the passes it saves: benchmarks/scale.py's audit by chunks)."""
    from pipeline import torch_solvers
    from pipeline.linear_probe import TorchLogisticRegression

    rng = np.random.default_rng(1)
    X = (rng.normal(size=(5, 16))[np.arange(4000) % 5] * 0.7 + rng.normal(size=(4000, 16))).astype(np.float32)
    y = np.array(list("abcde"))[np.arange(4000) % 5]
    y[rng.random(4000) < 0.1] = "a"
    est = TorchLogisticRegression(Cs=(1.0,), tol=1e-6, max_iter=500)
    whole = est.fit(X, y)
    solves, solve = [], torch_solvers.Batch.solve
    monkeypatch.setattr(torch_solvers.Batch, "solve", lambda self, *a: solves.append(
        (self.n, isinstance(self.X, RowChunks), len(a) > 3 and a[3] is not None)) or solve(self, *a))
    [chunked] = fit_subsets(est, RowChunks(lambda rows: X[rows], len(X), X.shape[1], 500), y, [np.arange(4000)])
    assert solves == [(500, False, False), (4000, True, True)]  # the sample in memory, then every row from there
    np.testing.assert_allclose(chunked.predict_proba(X), whole.predict_proba(X), atol=2e-3)


@pytest.mark.parametrize("head", ["torch-logreg", "logreg", "linear-svm"])
def test_linear_heads_on_chunks_are_their_fits_in_memory(data, head):
    """Folds and refit of a batched linear head on features read 40 rows at a time (each L-BFGS step a
    pass over the chunks): the same scalers, held-out path and predictions as on the matrix in memory (at
    the weakly regularised end, where the classes are almost separable, L-BFGS stops at slightly different
    points when the sums are added in another order, so C may differ there)."""
    X, _, labels, _ = data
    X = X.astype(np.float32)
    reads = []
    chunks = RowChunks(lambda rows: reads.append(len(rows)) or X[rows], len(X), X.shape[1], 40)
    subsets = [np.arange(100), np.arange(50, 150), np.arange(150)]
    est = create_head(head, 0)
    for whole, chunked in zip(fit_subsets(est, X, labels, subsets), fit_subsets(est, chunks, labels, subsets)):
        np.testing.assert_allclose(whole[0].mean_, chunked[0].mean_, rtol=1e-6)
        np.testing.assert_allclose(whole[-1].path_[:8], chunked[-1].path_[:8], rtol=1e-3)
        assert (whole.predict(X) == chunked.predict(X)).mean() >= 0.97
    assert max(reads) <= 40 and len(reads) > 10  # read chunk by chunk, pass after pass


def test_one_alpha_is_scikit_learns_ridge_on_standardised_features(data):
    X, target, labels, tags = data
    Z = StandardScaler().fit_transform(X)
    np.testing.assert_allclose(StreamingRidge(alphas=(3.0,)).fit(X, target).predict(X),
                               Ridge(alpha=3.0).fit(Z, target).predict(Z), atol=1e-9)
    for y in (labels, labels == "bee", tags):  # multiclass, binary (one column), tags
        ours, ref = StreamingRidgeClassifier(alphas=(2.0,)).fit(X, y), RidgeClassifier(alpha=2.0).fit(Z, y)
        np.testing.assert_allclose(ours.decision_function(X), ref.decision_function(Z), atol=1e-9)
        np.testing.assert_array_equal(ours.predict(X), ref.predict(Z))


def test_held_out_error_from_the_sums_is_the_error_of_the_rows(data):
    X, target, _, tags = data
    Y = np.column_stack([target, tags[:, 0]])
    m = Moments.zeros(2, 8, 2).add(X, Y, np.arange(150) % 2)
    W, b = ridge_path(m.block(0))(5.0)
    held = np.arange(150) % 2 == 1
    assert squared_error(m.block(1), W, b) == pytest.approx(((X[held] @ W + b - Y[held]) ** 2).sum(), rel=1e-10)


def test_alpha_is_chosen_on_inner_folds_and_chunks_change_nothing(data):
    X, target, labels, _ = data
    whole = StreamingRidgeClassifier().fit(X, labels)
    assert len(whole.path_) == 13 and whole.alpha_ == min(whole.path_, key=lambda p: p[1])[0]
    chunked = StreamingRidgeClassifier()
    for i in range(0, 150, 17):
        chunked.partial_fit(X[i:i + 17], labels[i:i + 17], classes=np.unique(labels))
    assert chunked.alpha_ == whole.alpha_
    np.testing.assert_allclose(chunked.coef_, whole.coef_, rtol=1e-9, atol=1e-12)
    noisy = StreamingRidge().fit(X, target + np.random.default_rng(1).normal(scale=30, size=150))
    assert noisy.alpha_ > StreamingRidge().fit(X, target).alpha_  # noise is regularised more


def test_subsets_fit_in_one_pass_as_each_alone(data):
    """The fit stage's folds and refit from one pass over the rows: each model is the head fitted on its
    subset alone (one alpha: no inner folds to differ), and a fold's scaler is its rows'."""
    X, _, labels, _ = data
    head = create_head("ridge", by_chunks=True)
    head[-1].set_params(alphas=(4.0,))
    subsets = [np.arange(50, 150), np.r_[0:50, 100:150], np.arange(150)]
    chunks = [(rows, X[rows], labels[rows]) for rows in np.array_split(np.arange(150), 7)]
    models = fit_subsets_in_one_pass(head, chunks, subsets, np.unique(labels))
    for model, rows in zip(models, subsets):
        alone = create_head("ridge", by_chunks=True).set_params(streamingridgeclassifier__alphas=(4.0,)).fit(X[rows], labels[rows])
        np.testing.assert_allclose(model[0].mean_, alone[0].mean_)
        np.testing.assert_allclose(model[0].scale_, alone[0].scale_)
        np.testing.assert_allclose(model.decision_function(X), alone.decision_function(X), atol=1e-8)
    fitted = fit_by_chunks(create_head("ridge", by_chunks=True), lambda epoch: ((X[i:i + 40], labels[i:i + 40]) for i in range(0, 150, 40)),
                           np.unique(labels))
    np.testing.assert_allclose(fitted.decision_function(X), create_head("ridge", by_chunks=True).fit(X, labels).decision_function(X),
                               atol=1e-8)


def test_a_class_missing_from_a_subset_is_left_out_as_scikit_learn_does(data):
    X, _, labels, _ = data
    two = labels != "cat"
    [model] = fit_subsets_in_one_pass(StreamingRidgeClassifier(), [(np.arange(150), X, labels)], [np.flatnonzero(two)],
                                      np.unique(labels))
    assert list(model.classes_) == ["ant", "bee"] and model.coef_.shape == (1, 8)
    with pytest.raises(ValueError, match="at least 2 classes"):
        StreamingRidgeClassifier().fit(X[:5], np.array(["ant"] * 5))


@pytest.mark.parametrize("make", [StreamingRidgeClassifier, StreamingRidge])
def test_streaming_ridges_are_scikit_learn_estimators(make):
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(make(), on_fail=None)
    assert len(results) >= 50 and not [r["check_name"] for r in results if r["status"] == "failed"]


def test_max_memory_is_a_size():
    assert parse_size("512MB") == 512 * 2 ** 20 and parse_size("8GB") == 8 * 2 ** 30 and parse_size("1.5g") == 3 * 2 ** 29
    assert parse_size("8MiB") == parse_size("8 mb") == 8 * 2 ** 20 and parse_size(8_192_000) == parse_size("8192000") == 8_192_000
    for bad in ("lots", "8i", 0, -5, True):
        with pytest.raises(PipelineError, match=re.escape(f"--max-memory must be a size above zero, such as 8GB or 512MB, got {bad!r}")):
            FitConfig(max_memory=bad).check()
    with pytest.raises(PipelineError, match=r"--n-jobs must be a number of jobs other than 0 \(-1: every core\), got 0"):
        FitConfig(n_jobs=0).check()  # joblib's own error was a traceback
    assert FitConfig(max_memory="64KB", n_jobs=1).chunk_rows_for(16) == 128  # 64 KiB / (32 bytes x 16 values)
    assert FitConfig(max_memory="64KB", n_jobs=2).chunk_rows_for(16) == 64  # two jobs at once share it
    assert FitConfig(max_memory="64KB", n_jobs=2, backend="dask", cluster="tcp://h:8786").chunk_rows_for(16) == 128


def test_a_job_under_max_memory_gives_scikit_learn_its_share_for_pairwise_distances():
    from sklearn import get_config

    from pipeline.stages.fit import _in_worker, _Warm

    assert FitConfig(max_memory="512MB", n_jobs=2).working_memory() == 256 and FitConfig().working_memory() is None
    assert _in_worker(_Warm((), 256), get_config)["working_memory"] == 256  # a knn head's search blocks
    assert _in_worker(_Warm((), None), get_config)["working_memory"] == get_config()["working_memory"]


def test_over_max_memory_heads_read_small_chunks_and_mlp_is_refused(tiny_run, tmp_path, monkeypatch, capsys):
    reads = []
    real = FeatureCache.features

    def features(self, tap="pooled", rows=None):
        if sys._getframe(1).f_code.co_name == "_read":  # a head's reads (not the stage's own)
            reads.append(None if rows is None else len(rows))
        return real(self, tap, rows)

    monkeypatch.setattr(FeatureCache, "features", features)
    with FeatureCache(tiny_run["cache"]) as cache:
        dims = cache.info()["taps"]["pooled"]
    budget = f"{32 * dims * 6}B"  # chunks of 6 rows; 36 rows x dims x 4 bytes x 3 copies is more
    result = fit(tiny_run["cache"], tmp_path / "run", heads=["ridge", "torch-logreg", "knn", "mlp"], taps=["pooled"],
                 max_memory=budget, n_jobs=1, progress=False)
    rows = {r.head: r for r in result.rows}
    for head in ("ridge", "torch-logreg", "knn"):
        assert rows[head].error == "" and rows[head].metrics["accuracy"] is not None
    assert "mlp holds the features in memory" in rows["mlp"].error
    assert "heads that read by chunks: logreg, knn, torch-logreg, linear-svm, ridge, sgd" in rows["mlp"].error
    assert reads and None not in reads and max(reads) <= 6
    said = f"ridge, torch-logreg, knn read the features from the cache 6 row(s) at a time, {dims:,} features each (--max-memory {budget}"
    err = capsys.readouterr().err
    whole = -(-36 * dims * 4 * 3 // 2 ** 20)  # MB for the 36 rows held with their copies: less than 256 rows a read
    assert said in err and ("shared by the jobs that run at once); so few rows per read make every pass slow: "
                            f"--max-memory {whole}MB holds the features in memory") in err
    fit(tiny_run["cache"], tmp_path / "tiny", heads=["ridge"], taps=["pooled"], max_memory="100B", n_jobs=1,
        progress=False)
    assert ("1 row(s) at a time, " f"{dims:,} features each (--max-memory 100B, shared by the jobs that run at once); a "
            "row is more than a job's share of it, and is read anyway; so few") in capsys.readouterr().err


def test_the_slow_read_line_names_the_bound_that_reads_256_rows():
    """(One job: 256 rows x 64 features x 32 bytes is 0.5 MB; two jobs share a bound, so each needs it.)"""
    from pipeline.stages.fit import _slow_reads

    assert _slow_reads(256, 64, 10 ** 6, FitConfig(max_memory="1MB", n_jobs=1)) == ""
    assert _slow_reads(32, 64, 10 ** 6, FitConfig(max_memory="64KB", n_jobs=1)) == (
        "; so few rows per read make every pass slow: --max-memory 1MB reads 256 at a time")
    assert _slow_reads(1, 64, 10 ** 6, FitConfig(max_memory="100B", n_jobs=2)).startswith(
        "; a row is more than a job's share of it, and is read anyway; so few rows per read make every pass slow: "
        "--max-memory 1MB reads 256")
    assert _slow_reads(32, 64, 1000, FitConfig(max_memory="64KB", n_jobs=1)).endswith("--max-memory 1MB holds the features in memory")


def test_a_knn_head_searches_each_scored_row_once(tiny_run, tmp_path, monkeypatch):
    """Its predictions are the most probable class of its probabilities, so a fold's rows are searched
    once for both (at 10^6 rows the searches were most of the fit)."""
    from pipeline.similarity import ChunkedIndex

    searched = []
    real = ChunkedIndex.search

    def search(self, queries, k):
        searched.append(len(queries))
        return real(self, queries, k)

    monkeypatch.setattr(ChunkedIndex, "search", search)
    with FeatureCache(tiny_run["cache"]) as cache:
        budget = f"{32 * cache.info()['taps']['pooled'] * 6}B"  # chunks of 6 rows: knn reads by chunks
    [row] = fit(tiny_run["cache"], tmp_path / "run", heads=["knn"], taps=["pooled"], max_memory=budget, n_jobs=1,
                progress=False).rows
    assert row.error == "" and row.metrics["auroc"] is not None
    assert sum(searched) == row.n_test


def test_a_knn_head_read_by_chunks_is_saved_with_its_index_beside_it(tiny_run, tmp_path):
    """Its index goes to a file of its own (skops builds a head's file in memory: a 1.3 GB index was held
    four times over); the run can be moved; without the file the head says what is missing; --portable
    keeps the head in one file."""
    with FeatureCache(tiny_run["cache"]) as cache:
        budget = f"{32 * cache.info()['taps']['pooled'] * 6}B"
        X = cache.features("pooled")
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["knn"], taps=["pooled"], max_memory=budget, n_jobs=1,
              progress=False)
    [row] = res.rows
    head = res.out / row.head_file
    assert head.with_suffix(".faiss").is_file()
    expected = load_head(head).predict_proba(X)
    moved = res.out.rename(tmp_path / "moved") / row.head_file
    assert np.array_equal(load_head(moved).predict_proba(X), expected)
    moved.with_suffix(".faiss").unlink()
    with pytest.raises(PipelineError, match=r"this knn head's index .*moved/heads/.*\.faiss is missing: it is saved "
                                            "beside the head's file, so copy or move the two together"):
        load_head(moved)
    portable = fit(tiny_run["cache"], tmp_path / "portable", heads=["knn"], taps=["pooled"], max_memory=budget,
                   portable=True, n_jobs=1, progress=False)
    one = portable.out / portable.rows[0].head_file
    assert not one.with_suffix(".faiss").exists()
    assert np.array_equal(load_head(one).predict_proba(X), expected)


def test_fit_s_own_process_never_imports_torch_that_only_its_jobs_run(tiny_run, tmp_path):
    """torch-logreg is fitted by a worker; fit's own process receives, scores and saves it with numpy and
    skops alone, so torch (about 0.45 GB resident) stays out of it: what keeps a fit under --max-memory."""
    code = ("import sys; from pipeline import fit; "
            f"fit({str(tiny_run['cache'])!r}, {str(tmp_path / 'run')!r}, heads=['ridge', 'torch-logreg'], n_jobs=2, "
            "progress=False); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
    assert sorted(p.name for p in (tmp_path / "run" / "heads").glob("*torch-logreg*.skops"))
