"""Sweeps: several backbones and their concatenation, few-shot curves, chance baselines, the HTML report,
and the joblib backends a sweep can run on."""

import csv
import json
import re
import sys
import warnings

import numpy as np
import pytest

from conftest import TINY, TINY_VIT, run_cli
from pipeline import PipelineError, create_head, extract, fit, list_heads, load_head, load_task, predict
from pipeline.fewshot import draw_shots, parse_shots

BOTH = f"{TINY}+{TINY_VIT}"


@pytest.fixture(scope="module")
def sweep(tiny_run, tmp_path_factory):
    """The tiny run's cache plus a second backbone's over the same images, a coin-flip task, and a sweep
    over both, their concatenation, two heads and few-shot draws."""
    base = tmp_path_factory.mktemp("sweep")
    [vit] = extract(tiny_run["data"], TINY_VIT, base / "cache", workers=0, progress=False)
    ids = load_task(tiny_run["cache"]).ids
    rng = np.random.default_rng(1)
    coin = base / "coin.csv"
    with coin.open("w", newline="") as fh:
        csv.writer(fh).writerows([("id", "label"), *((i, rng.choice(["heads", "tails"])) for i in ids)])
    result = fit([tiny_run["cache"], vit.cache], base / "run", labels=[coin], heads=["logreg", "centroid"],
                 concat=True, shots=["1", "2", "all"], draws=3, n_jobs=1, progress=False)
    return dict(result=result, caches=[tiny_run["cache"], vit.cache], run=base / "run", data=tiny_run["data"])


def test_every_backbone_task_and_head_has_a_row(sweep):
    rows = sweep["result"].rows
    combos = {(r.backbone, r.task, r.head) for r in rows}
    assert combos == {(b, t, h) for b in (TINY, TINY_VIT, BOTH) for t in ("shapes", "coin") for h in ("logreg", "centroid")}
    assert len(rows) == 12 and all(r.scored and r.comparable for r in rows)
    concat = next(r for r in rows if r.backbone == BOTH and r.task == "shapes" and r.head == "logreg")
    assert concat.weights.count("+") == 1 and concat.cache.count(" + ") == 1


def test_concatenated_head_uses_both_feature_sets(sweep):
    row = next(r for r in sweep["result"].rows if r.backbone == BOTH and r.task == "shapes" and r.head == "logreg")
    a, b = (load_task(c) for c in sweep["caches"])
    assert list(a.ids) == list(b.ids)
    head = load_head(sweep["run"] / row.head_file)
    assert head.n_features_in_ == a.X.shape[1] + b.X.shape[1]
    test = a.splits == "val"
    X = np.hstack([a.X, b.X])[test]
    assert np.mean(head.predict(X) == a.y[test]) == pytest.approx(row.metrics["accuracy"])
    # predict runs both backbones (or reads both caches) and puts the features side by side
    images = sorted((sweep["data"] / "val").rglob("*.jpg"))
    got = predict(sweep["run"] / row.head_file, images, progress=False, workers=0)
    by_id = dict(zip(a.ids[test], head.predict(X)))
    assert [g["prediction"] for g in got] == [by_id[str(p.relative_to(sweep["data"]))] for p in images]


def test_random_labels_are_not_above_chance(sweep):
    for r in sweep["result"].rows:
        assert 0 <= r.metrics["chance"] <= 1 and 0 <= r.p_above_chance <= 1
        if r.task == "coin":
            assert not r.above_chance, r
    assert all(r.above_chance for r in sweep["result"].rows if r.task == "shapes" and r.head == "logreg")


def test_fewshot_rows_and_files(sweep):
    few = sweep["result"].fewshot
    assert len(few) == 3 * 2 * 2 * 3  # backbones x tasks x heads x shots
    for r in few:
        assert r["error"] == "" and r["draws"] == (1 if r["shots"] == "all" else 3)
        assert len(r["accuracies"]) == r["draws"] and r["acc_min"] <= r["acc_mean"] <= r["acc_max"]
        assert r["eval"] == "val"  # the label file has no split column: the images' own splits apply
    run = sweep["run"]
    with open(run / "fewshot.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(few)
    for task in ("shapes", "coin"):
        assert (run / f"fewshot_{task}.png").read_bytes()[:4] == b"\x89PNG"
    # "all" is the same fit as the leaderboard's on the same split
    full = {(r.backbone, r.head): r.metrics["accuracy"] for r in sweep["result"].rows if r.task == "shapes"}
    for r in few:
        if r["task"] == "shapes" and r["shots"] == "all":
            assert r["acc_mean"] == pytest.approx(full[(r["backbone"], r["head"])])


def test_fewshot_draws_are_seeded_per_class_and_checked(tiny_run, tmp_path):
    y = np.array(["a"] * 5 + ["b"] * 3)
    pool = np.arange(8)
    one = draw_shots(y, pool, 2, seed=0, draw=1)
    assert np.array_equal(one, draw_shots(y, pool, 2, seed=0, draw=1)) and len(one) == 4
    assert sorted(y[one]) == ["a", "a", "b", "b"]
    assert len({tuple(draw_shots(y, pool, 2, seed=0, draw=d)) for d in range(5)}) > 1
    with pytest.raises(PipelineError, match="'b' has 3 training example"):
        draw_shots(y, pool, 4, 0, 0)
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["centroid"], shots=[13, 12], n_jobs=1, progress=False)
    by_k = {r["shots"]: r for r in res.fewshot}
    assert "fewer than 13 shots" in by_k[13]["error"] and by_k[13]["acc_mean"] is None
    assert by_k[12]["error"] == "" and by_k[12]["draws"] == 5


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_head_fits_a_few_shots(k):
    rng = np.random.default_rng(k)
    y = np.array(["a", "b", "c"] * k)
    X = rng.normal(size=(len(y), 16)) + (y == "a")[:, None] * 2
    for name in list_heads():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = create_head(name, 0).fit(X, y)
        assert set(est.predict(X)) <= {"a", "b", "c"}, name


def test_every_head_saves_and_loads_with_the_trusted_types(tmp_path):
    from pipeline.heads import save_head

    rng = np.random.default_rng(0)
    y = np.array(["a", "b", "c"] * 20)
    X = rng.normal(size=(len(y), 8)) + (y == "a")[:, None]
    for name in list_heads():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = create_head(name, 0).fit(X, y)
        loaded = load_head(save_head(est, tmp_path / f"{name}.skops"))
        assert np.array_equal(loaded.predict(X), est.predict(X)), name


@pytest.mark.slow
def test_report_html(sweep):
    page = (sweep["run"] / "report.html").read_text()
    for text in ("Task shapes", "Task coin", "accuracy by head &times; backbone", "Few-shot",
                 "Confusion matrix of the best row", "How this was made", "scikit-learn", BOTH):
        assert text in page, text
    assert page.count("src='data:image/png;base64,") == 4  # two few-shot plots, two confusion matrices
    runs = json.loads((sweep["run"] / "run.json").read_text())
    assert runs[0]["stage"] == "fit" and runs[0]["parameters"]["concat"] is True
    r = run_cli("report", sweep["run"])
    assert r.returncode == 0 and r.stdout.strip() == f"report: {sweep['run'] / 'report.html'}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["threading", "dask", "ray"])
def test_backends_give_the_loky_results(tiny_run, tmp_path, backend):
    if backend != "threading":
        pytest.importorskip({"dask": "distributed", "ray": "ray"}[backend])
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["logreg", "knn"], shots=[2], draws=2, n_jobs=2,
              backend=backend, progress=False)
    loky = fit(tiny_run["cache"], tmp_path / "loky", heads=["logreg", "knn"], shots=[2], draws=2, n_jobs=2,
               progress=False)
    assert [(r.head, r.metrics) for r in res.rows] == [(r.head, r.metrics) for r in loky.rows]
    assert [r["accuracies"] for r in res.fewshot] == [r["accuracies"] for r in loky.fewshot]


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="spark"), "--backend must be one of loky, threading, dask, ray, got 'spark'"),
    (dict(cluster="tcp://127.0.0.1:8786"), "--cluster names a Dask or Ray cluster"),
    (dict(concat=True), "--concat joins the features of several caches, and 1 was given"),
    (dict(shots=["0"]), "--shots must be a list of positive whole numbers or 'all' (e.g. 1,2,5,10,all), got ['0']"),
    (dict(shots=["1", "five"]), "--shots must be a list of positive whole numbers or 'all' (e.g. 1,2,5,10,all), got ['1', 'five']"),
    (dict(draws=0), "--draws must be at least 1"),
])
def test_bad_sweep_settings(tiny_run, tmp_path, kwargs, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        fit(tiny_run["cache"], tmp_path / "run", heads=["knn"], n_jobs=1, progress=False, **kwargs)


@pytest.mark.slow
def test_unreachable_dask_cluster_is_one_line(tiny_run, tmp_path):
    pytest.importorskip("distributed")
    r = run_cli("fit", tiny_run["cache"], "--out", tmp_path / "run", "--heads", "knn", "--backend", "dask",
                "--cluster", "tcp://127.0.0.1:9", "--no-progress")
    assert r.returncode == 1 and "cannot reach the Dask scheduler" in r.stderr and "Traceback" not in r.stderr


def test_parse_shots_orders_and_dedups():
    assert parse_shots(["all", "5", "1", "5"]) == [1, 5, "all"]


@pytest.mark.slow
def test_sweep_goes_to_a_running_dask_cluster(tiny_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    # two workers: joblib runs a single effective job slot in the calling process instead
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        r = run_cli("fit", tiny_run["cache"], "--out", tmp_path / "run", "--backend", "dask",
                    "--cluster", cluster.scheduler_address, "--no-progress")
        assert r.returncode == 0, r.stderr
        # the fits ran in the cluster's worker processes: they have imported the fit stage
        ran_there = client.run(lambda: "pipeline.stages.fit" in sys.modules).values()
    assert any(ran_there)
    rows = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    # rows of equal accuracy are ranked by their fit time, which differs from run to run
    assert sorted((x["head"], x["accuracy"]) for x in rows) == sorted((x.head, x.metrics["accuracy"]) for x in tiny_run["fit"].rows)


@pytest.mark.slow
def test_dask_workers_read_their_own_chunks_under_max_memory(tiny_run, tmp_path, monkeypatch):
    """Over --max-memory the features are never loaded, so a job sent to a Dask worker carries the rows'
    indices and labels, not their features, and the worker reads its chunks from the cache; the rows
    equal loky's."""
    import h5py

    distributed = pytest.importorskip("distributed")
    import cloudpickle  # what distributed pickles tasks with (a dependency of it)
    from pipeline.stages import fit as fit_module
    from test_conformal import Blobs, _generated_cache

    with h5py.File(tiny_run["cache"]) as f:
        blobs = Blobs(2, f["features/pooled"].shape[1])
    X, y, _ = blobs.draw(2000)
    cache = tmp_path / tiny_run["cache"].name
    _generated_cache(tiny_run["cache"], cache, X, y, np.array(["train"] * 1600 + ["val"] * 400))
    sent, real = {}, fit_module._run_jobs

    def measured(jobs, *args, **kwargs):
        sent.setdefault("bytes", []).append(max(len(cloudpickle.dumps(job)) for job in jobs))
        return real(jobs, *args, **kwargs)

    monkeypatch.setattr(fit_module, "_run_jobs", measured)
    heads = ["ridge", "torch-logreg"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        on_dask = fit(cache, tmp_path / "dask", heads=heads, max_memory="1MB", backend="dask",
                      cluster=cluster.scheduler_address, n_jobs=2, progress=False)
    held = fit(cache, tmp_path / "held", heads=heads, n_jobs=1, progress=False)
    by_chunks, in_memory = sent["bytes"]
    assert X.nbytes == 2000 * 256 * 4 and in_memory > X.nbytes > 10 * by_chunks  # the features travel only when held
    loky = fit(cache, tmp_path / "loky", heads=heads, max_memory="1MB", n_jobs=1, progress=False)
    assert [(r.head, r.metrics["accuracy"]) for r in on_dask.rows] == [(r.head, r.metrics["accuracy"]) for r in loky.rows]
    assert {r.head: round(r.metrics["accuracy"], 2) for r in on_dask.rows} == {r.head: round(r.metrics["accuracy"], 2) for r in held.rows}
