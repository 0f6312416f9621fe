import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import TINY, make_folder, run_cli
from pipeline import FeatureCache, PipelineError, RunFolder, audit, create_head, extract, fit, list_heads, load_head, load_task, predict

COLUMNS = {"backbone", "tap", "task", "head", "accuracy", "balanced_accuracy", "f1_macro", "fit_seconds"}


def test_leaderboard_has_every_head(tiny_run):
    run = tiny_run["run"]
    with open(run / "leaderboard.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert COLUMNS <= set(rows[0])
    assert sorted(r["head"] for r in rows) == ["knn", "logreg", "mlp"]
    assert {(r["backbone"], r["tap"], r["task"], r["eval"]) for r in rows} == {(TINY, "pooled", "shapes", "val")}
    for r in rows:
        assert int(r["n_train"]) == 24 and int(r["n_test"]) == 12
        with open(run / r["predictions"], newline="") as fh:
            saved = list(csv.DictReader(fh))
        assert len({p["id"] for p in saved}) == 12 and all(p["id"].startswith("val/") for p in saved), r["head"]
        right = sum(p["true"] == p["predicted"] for p in saved)
        assert float(r["accuracy"]) == pytest.approx(right / 12), r["head"]  # the score is its saved predictions'
    accs = [float(r["accuracy"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    md = (run / "leaderboard.md").read_text()
    assert md.startswith("| backbone | weights | spec | tap | task | head |") and md.count("\n") == 5
    assert (run / "confusion_shapes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_heads_and_cards(tiny_run):
    run = tiny_run["run"]
    with FeatureCache(tiny_run["cache"]) as c:
        spec = c.spec
    for row in tiny_run["fit"].rows:
        assert not Path(row.head_file).is_absolute() and row.head_file.startswith("heads/")
        head = load_head(run / row.head_file)
        card = json.loads((run / row.head_file).with_suffix(".json").read_text())
        (part,) = card["parts"]
        assert card["backbone"] == part["spec"]["backbone"] == TINY and len(part["spec"]["weights_sha256"]) == 64
        assert part["spec"]["data_config"]["input_size"] == [3, 160, 160] and card["classes"] == ["blue", "red"]
        assert part["spec"] == spec.to_dict()  # the cache's feature spec travels into every head card
        X_train, y_train, X_test, y_test = load_task(tiny_run["cache"]).holdout()
        assert np.mean(head.predict(X_test) == y_test) == pytest.approx(row.metrics["accuracy"])


def test_heads_are_sklearn_estimators(tiny_run):
    task = load_task(tiny_run["cache"])
    assert task.X.dtype == np.float32
    for name in list_heads():
        scores = cross_val_score(clone(create_head(name)), task.X, task.y, cv=3)
        assert len(scores) == 3


def test_logreg_learns_a_separable_task(tiny_run):
    """Red vs blue is easy even for random conv features; a probe below 90 % means a broken pipeline."""
    row = next(r for r in tiny_run["fit"].rows if r.head == "logreg")
    assert row.metrics["accuracy"] >= 0.9


def test_label_file_task_and_cross_validation(tiny_run, tmp_path):
    with FeatureCache(tiny_run["cache"]) as c:
        ids = list(c.ids)
    rng = np.random.default_rng(0)
    labels = tmp_path / "shuffled.csv"
    labels.write_text("id,label\n" + "".join(f"{i},{rng.choice(['x', 'y'])}\n" for i in ids))
    split_file = tmp_path / "parity.csv"
    split_file.write_text("id,label,split\n" + "".join(
        f"{i},{'even' if k % 2 else 'odd'},{'train' if k < 30 else 'test'}\n" for k, i in enumerate(ids)))
    res = fit(tiny_run["cache"], tmp_path / "run", labels=[labels, split_file], heads=["logreg"], cv=3,
              n_jobs=2, progress=False)
    by_task = {r.task: r for r in res.rows}
    assert set(by_task) == {"shapes", "shuffled", "parity"}
    assert by_task["shuffled"].eval == "val"  # no split column: the cache's splits apply
    assert by_task["parity"].eval == "test" and by_task["parity"].n_test == 6


def test_folder_without_splits_is_cross_validated(tmp_path):
    [res] = extract(make_folder(tmp_path / "flat", n_train=8, n_val=2, splits=False), TINY, tmp_path / "cache",
                    workers=0, progress=False)
    out = fit(res.cache, tmp_path / "run", heads=["logreg", "knn"], cv=4, n_jobs=1, progress=False)
    assert {r.eval for r in out.rows} == {"cv4"}
    assert all(r.n_test == 20 and r.n_train == 20 for r in out.rows)  # out-of-fold on all, refit on all


@pytest.mark.parametrize("text, message", [
    ("id,class\na,b\n", "missing column\\(s\\) label"),
    ("id,label\ntrain/red/red_000.jpg,a\ntrain/red/red_000.jpg,b\n", "labels.csv:3: duplicate id"),
    ("id,label\nnot/there.jpg,a\n", "1 id\\(s\\) not in cache"),
    ("id,label\ntrain/red/red_000.jpg,\n", "labels.csv:2: empty label"),
    ("id,label\n", "labels.csv: no rows"),
    ("", "labels.csv: empty; a label file is a CSV with a header line"),
    ("id,label\ntrain/red/red_000.jpg,a,b\n", "labels.csv:2: 3 fields, but the header has 2 \\(id,label\\)"),
    ("id,label\ntrain/red/red_000.jpg,caf\xe9\n".encode("latin-1"), "labels.csv: not UTF-8 text .* save it as UTF-8"),
    ("id,label\ntrain/red/red_000.jpg,a\nval/red/red_000.jpg,a\n", "task 'labels': needs at least 2 classes, found 1"),
])
def test_bad_label_files(tiny_run, tmp_path, text, message):
    (tmp_path / "labels.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PipelineError, match=message):
        fit(tiny_run["cache"], tmp_path / "run", labels=[tmp_path / "labels.csv"], progress=False)


def test_label_file_ids_the_cache_lacks_are_left_out_and_said(tiny_run, tmp_path):
    """A label file that also names images the cache does not hold (a larger set than was extracted)
    fits on those it holds and says how many it left out; ids of which it holds none stay an error."""
    with FeatureCache(tiny_run["cache"]) as c:
        rows = [f"{i},{label}" for i, label in zip(c.ids, c.labels)]
    (tmp_path / "labels.csv").write_text("\n".join(["id,label", *rows, "not/there.jpg,red", "nor/here.jpg,blue"]))
    res = fit(tiny_run["cache"], tmp_path / "run", labels=[tmp_path / "labels.csv"], heads=["centroid"], progress=False)
    assert any("task 'labels': 2 labelled image(s) have no features in" in n and "(such as 'not/there.jpg')" in n
               for n in res.notes), res.notes
    assert len(RunFolder(tmp_path / "run").protocol("labels").ids) == len(rows)
    found = audit(tiny_run["cache"], tmp_path / "audit", labels=[tmp_path / "labels.csv"], map="none", progress=False)
    assert ("2 labelled image(s) have no features in the cache (such as 'not/there.jpg'): left out"
            in {t.task: t for t in found.tasks}["labels"].note)


def test_too_few_samples_for_cv(tiny_run, tmp_path):
    with FeatureCache(tiny_run["cache"]) as c:
        ids = list(c.ids)
    (tmp_path / "rare.csv").write_text("id,label,split\n" + "".join(
        f"{i},{'rare' if k == 0 else 'common'},\n" for k, i in enumerate(ids)))
    with pytest.raises(PipelineError, match="class 'rare' has 1 sample\\(s\\), fewer than --cv 5"):
        fit(tiny_run["cache"], tmp_path / "run", labels=[tmp_path / "rare.csv"], progress=False)


def test_unknown_head(tiny_run, tmp_path):
    with pytest.raises(PipelineError, match="unknown head 'forest'; choose from logreg, mlp, knn"):
        fit(tiny_run["cache"], tmp_path / "run", heads=["forest"], progress=False)


@pytest.mark.slow
def test_cli_fit_prints_markdown(tiny_run, tmp_path):
    r = run_cli("fit", tiny_run["cache"].parent, "--out", tmp_path / "run", "--heads", "knn,logreg", "--n-jobs", "1")
    assert "time: read features" in r.stdout
    assert r.returncode == 0, r.stderr
    assert "| backbone | weights | spec | tap | task | head |" in r.stdout and "| knn |" in r.stdout
    assert (tmp_path / "run" / "leaderboard.csv").is_file()


def test_chunked_head_reads_features_by_chunks(tiny_run, tmp_path, monkeypatch):
    reads = []
    real = FeatureCache.features

    def features(self, tap="pooled", rows=None):
        reads.append(None if rows is None else len(rows))
        return real(self, tap, rows)

    monkeypatch.setattr(FeatureCache, "features", features)
    result = fit(tiny_run["cache"], tmp_path / "run", heads=["sgd"], chunk_rows=5, n_jobs=1, progress=False)
    assert reads and None not in reads and max(reads) <= 5  # never the whole task at once
    [row] = result.rows
    assert (row.n_train, row.n_test, row.error) == (24, 12, "")
    monkeypatch.setattr(FeatureCache, "features", real)
    X_train, y_train, X_test, y_test = load_task(tiny_run["cache"]).holdout()
    head = load_head(result.out / row.head_file)
    assert np.mean(head.predict(X_test) == y_test) == pytest.approx(row.metrics["accuracy"])
    logreg = fit(tiny_run["cache"], tmp_path / "lr", heads=["logreg"], n_jobs=1, progress=False).rows[0]
    assert row.metrics["accuracy"] >= logreg.metrics["accuracy"] - 0.1


def test_chunked_head_cross_validates_without_splits(tmp_path):
    data = make_folder(tmp_path / "flat", splits=False)
    [res] = extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    [row] = fit(res.cache, tmp_path / "run", heads=["sgd"], chunk_rows=7, n_jobs=1, progress=False).rows
    assert row.eval == "cv5" and row.n_train == 36 and row.metrics["accuracy"] is not None


def test_a_warning_is_recorded_apart_from_errors(tiny_run, tmp_path):
    """A head that warns (a solver stopped early) is scored; the warning goes to ``warnings``, not ``error``."""
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["sklearn.linear_model:LogisticRegression"],
              head_params={"max_iter": 1}, n_jobs=1, progress=False)
    [row] = res.rows
    assert row.scored and row.error == "" and row.warnings.startswith("ConvergenceWarning: ")
    assert "warnings" in (res.out / "leaderboard.csv").read_text().splitlines()[0].split(",")


class PredictsTheLeastLikely(LogisticRegression):
    """A head whose ``predict`` contradicts its probabilities (as SVC's Platt scaling may, less so)."""

    def predict(self, X):
        return self.classes_[np.argmin(self.predict_proba(X), axis=1)]


def test_the_leaderboard_scores_the_most_probable_class_as_predict_serves_it(tiny_run, tmp_path):
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["test_fit:PredictsTheLeastLikely", "centroid",
                                                          "sklearn.linear_model:LogisticRegression"],
              n_jobs=1, progress=False)
    rows = {r.head: r for r in res.rows}
    contrary, plain = rows["test_fit:PredictsTheLeastLikely"], rows["sklearn.linear_model:LogisticRegression"]
    assert contrary.metrics["accuracy"] == plain.metrics["accuracy"] > 0.5
    served = predict(res.out / rows["centroid"].head_file, [tiny_run["data"] / "val"], workers=0, progress=False)
    assert np.mean([r["prediction"] == r["path"].split("/")[-2] for r in served]) == pytest.approx(rows["centroid"].metrics["accuracy"])
    centroid = load_head(res.out / rows["centroid"].head_file)
    X = np.random.default_rng(0).normal(size=(50, centroid.n_features_in_))
    assert np.array_equal(centroid.predict(X), centroid.classes_[np.argmax(centroid.predict_proba(X), axis=1)])


def test_more_heads_user_estimators_and_intervals(tiny_run, tmp_path):
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["torch-logreg", "linear-svm", "ridge", "centroid",
                                                          "sklearn.svm:SVC"],
              head_params={"C": 10, "kernel": "linear"}, n_jobs=1, progress=False)
    rows = {r.head: r for r in res.rows}
    assert set(rows) == {"torch-logreg", "linear-svm", "ridge", "centroid", "sklearn.svm:SVC(C=10,kernel=linear)"}
    for r in rows.values():
        m = r.metrics
        assert r.error == "" and m["acc_low"] <= m["accuracy"] <= m["acc_high"] and m["acc_std"] is None
        assert isinstance(r.same_as_best, bool) and (r.p_vs_best is None) == (r is res.rows[0])
    svc = load_head(res.out / rows["sklearn.svm:SVC(C=10,kernel=linear)"].head_file)
    assert svc.get_params()["C"] == 10 and svc.get_params()["kernel"] == "linear"
    # heads without predict_proba (ridge: margins) still give one probability row per image
    preds = predict(res.out / rows["ridge"].head_file, [tiny_run["data"] / "val"], workers=0, progress=False)
    assert all(abs(r["prob_blue"] + r["prob_red"] - 1) < 1e-9 for r in preds)
    assert np.mean([r["prediction"] == r["path"].split("/")[-2] for r in preds]) == pytest.approx(rows["ridge"].metrics["accuracy"])


@pytest.mark.parametrize("heads, params, message", [
    (["sklearn.cluster:KMeans"], None, "head 'sklearn.cluster:KMeans' is not a scikit-learn classifier"),
    (["sklearn.svm:NoSuch"], None, "cannot import 'NoSuch' from 'sklearn.svm'"),
    (["sklearn.svm:SVC"], {"Cc": 1}, "--head-param for sklearn.svm:SVC: Invalid parameter 'Cc'"),
    (["sklearn.svm:SVC"], {"C": "abc"}, "--head-param for sklearn.svm:SVC: C must be a float in the range \\(0.0, inf\\], got 'abc'"),
    (["logreg"], {"C": 1}, "--head-param sets parameters of module:Class heads, and --heads names none"),
    ("logreg, knn", None, "--heads must be a non-empty list of head names, got 'logreg, knn'"),
    ([], None, "--heads must be a non-empty list of head names, got \\[\\]"),
])
def test_bad_heads_are_named(tiny_run, tmp_path, heads, params, message):
    with pytest.raises(PipelineError, match=message):
        fit(tiny_run["cache"], tmp_path / "run", heads=heads, head_params=params, progress=False)


@pytest.mark.slow
def test_bad_heads_on_the_command_line(tiny_run, tmp_path):
    """An empty --heads is not the defaults, an empty name between commas is no head left out silently,
    and a --head-param key given twice is refused (it was the last one, silently); nothing is created."""
    for args, message in ((["--heads", ""], "--heads must be a non-empty list of head names, got []"),
                          (["--heads", "ridge,,knn"], "an empty name in 'ridge,,knn': names are separated by single commas"),
                          (["--heads", "sklearn.svm:SVC", "--head-param", "C=1", "--head-param", "C=10"],
                           "--head-param C is given twice")):
        r = run_cli("fit", tiny_run["cache"], "--out", tmp_path / "run", *args)
        assert r.returncode == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_class_seen_only_in_the_scored_split_is_said(tiny_run, tmp_path):
    with FeatureCache(tiny_run["cache"]) as c:
        ids = list(c.ids)
    labels = {i: ("green" if i.startswith("val/") and k % 2 == 0 else i.split("/")[1]) for k, i in enumerate(ids)}
    (tmp_path / "green.csv").write_text("id,label\n" + "".join(f"{i},{y}\n" for i, y in labels.items()))
    rare = [i for i in ids if i.startswith("train/")][:2]  # a tag no scored image has: map leaves it out, said
    (tmp_path / "rare.csv").write_text("id,labels\n" + "".join(
        f"{i},{i.split('/')[1]}{'|rare' if i in rare else ''}\n" for i in ids))
    res = fit(tiny_run["cache"], tmp_path / "run", labels=[tmp_path / "green.csv", tmp_path / "rare.csv"],
              heads=["knn", "ridge", "logreg"], n_jobs=1, progress=False)
    assert any("task 'green': 'green' only in the val split" in n for n in res.notes), res.notes
    assert ("task 'rare': 'rare' in no scored image: the rows' scores say nothing of it (map is the mean over the "
            "tags scored images have)") in res.notes, res.notes
    greens = sum(1 for y in labels.values() if y == "green")
    for row in (r for r in res.rows if r.task == "green"):  # scored, every green image counted wrong
        assert row.error == "" and row.metrics["auroc"] is not None
        assert 0 < row.metrics["accuracy"] <= 1 - greens / row.n_test + 1e-9


def test_torch_logreg_matches_sklearn_at_the_same_C():
    from sklearn.linear_model import LogisticRegression

    from pipeline.linear_probe import TorchLogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 20))
    y = rng.integers(0, 5, 600)
    X = (centres[y] + rng.normal(size=(600, 20))).astype(np.float32)
    ours = TorchLogisticRegression(Cs=(0.1,), tol=1e-6).fit(X[:400], y[:400])
    ref = LogisticRegression(C=0.1, tol=1e-8, max_iter=5000).fit(X[:400], y[:400])
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-3)
    np.testing.assert_allclose(ours.predict_proba(X[400:]), ref.predict_proba(X[400:]), atol=1e-3)
    path = TorchLogisticRegression().fit(X[:400], y[:400])
    assert [c for c, _ in path.path_] == sorted(c for c, _ in path.path_) and path.C_ in dict(path.path_)
    assert path.score(X[400:], y[400:]) >= ref.score(X[400:], y[400:]) - 0.02


def test_torch_linear_svm_is_scikit_learns_at_the_same_C():
    from sklearn.svm import LinearSVC

    from pipeline.linear_probe import TorchLinearSVC

    rng = np.random.default_rng(1)
    for k in (2, 4):
        centres = rng.normal(size=(k, 20))
        y = rng.integers(0, k, 600)
        X = (centres[y] + 1.5 * rng.normal(size=(600, 20))).astype(np.float32)
        ours = TorchLinearSVC(Cs=(0.1,), tol=1e-6, max_iter=2000).fit(X[:400], y[:400])
        ref = LinearSVC(C=0.1, tol=1e-8, max_iter=100000).fit(X[:400], y[:400])
        np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-3)
        np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=2e-3)
        assert (ours.predict(X[400:]) == ref.predict(X[400:])).mean() >= 0.99


def test_torch_mlp_trains_as_scikit_learns_mlp():
    """The mlp head is MLPClassifier trained in torch: in float32, for the same random_state, the same
    epochs and the same predictions, of classes and of tags; with bf16 products (where the CPU has them) the same predictions."""
    from sklearn.neural_network import MLPClassifier

    from pipeline.devices import resolve_amp
    from pipeline.mlp_probe import TorchMLPClassifier

    rng = np.random.default_rng(2)
    for k in (2, 4, "tags"):
        centres = rng.normal(size=(4, 40))
        y = rng.integers(0, 4 if k == "tags" else k, 500)
        X = (centres[y] + 2.0 * rng.normal(size=(500, 40))).astype(np.float32)
        if k == "tags":  # a 0/1 column per tag: a sigmoid each
            y = np.stack([y == 0, y <= 1, y % 2 == 1], 1).astype(int)
        ref = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=300, random_state=3).fit(X[:350], y[:350])
        ours = TorchMLPClassifier(hidden_layer_size=64, alpha=1e-3, max_iter=300, amp="off", device="cpu", random_state=3)
        ours.fit(X[:350], y[:350])
        assert ours.n_iter_ == ref.n_iter_
        np.testing.assert_allclose(ours.loss_curve_, ref.loss_curve_, rtol=1e-4)
        np.testing.assert_allclose(ours.predict_proba(X[350:]), ref.predict_proba(X[350:]), atol=1e-3)
        if resolve_amp("auto", torch.device("cpu")) == "bf16":
            fast = TorchMLPClassifier(hidden_layer_size=64, alpha=1e-3, max_iter=300, device="cpu", random_state=3)
            fast.fit(X[:350], y[:350])
            assert abs(fast.n_iter_ - ref.n_iter_) <= 0.1 * ref.n_iter_
            assert (fast.predict(X[350:]) == ref.predict(X[350:])).mean() >= 0.98


@pytest.mark.parametrize("head", ["logreg", "linear-svm", "torch-logreg", "mlp"])
def test_folds_fitted_as_one_batch_are_the_models_fitted_alone(head):
    """The issue's sweep part: every fold and the refit of a linear head (and of the mlp) are one
    batched problem, and each model is the one fitting it alone gives (same C, same predictions); a
    fold that lacks a class is fitted alone."""
    from sklearn.model_selection import StratifiedKFold

    from pipeline.heads import fit_subsets

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    X = (rng.normal(size=(3, 30))[y] * 0.5 + rng.normal(size=(300, 30)) * (1 + rng.random(30)) + 3).astype(np.float32)
    y = np.array(["a", "b", "c"])[y]
    subsets = [tr for tr, _ in StratifiedKFold(4, shuffle=True, random_state=0).split(X, y)]
    subsets += [np.arange(300), np.flatnonzero(y != "c")]
    est = create_head(head, 0)
    batched = fit_subsets(est, X, y, subsets)
    alone = [clone(est).fit(X[s], y[s]) for s in subsets]
    for a, b, s in zip(batched, alone, subsets):
        assert getattr(a[-1], "C_", None) == getattr(b[-1], "C_", None) and list(a.classes_) == list(b.classes_)
        np.testing.assert_allclose(a[0].mean_, X[s].mean(0), rtol=1e-5)
        assert (a.predict(X) == b.predict(X)).mean() >= 0.99
        if head == "mlp":
            assert a[-1].n_iter_ == b[-1].n_iter_
            np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=0.02)
        else:
            np.testing.assert_allclose(a.decision_function(X), b.decision_function(X),
                                       atol=0.05 * np.abs(b.decision_function(X)).max())


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_tags_folds_fitted_as_one_batch_are_the_models_fitted_alone(head):
    """The issue's "tags heads batched as the class heads are": every tag, fold and C of the tags' logreg
    (and every fold of the tags' mlp) in one batch gives the models fitting each fold alone gives; a
    subset whose rows lack a tag still predicts that tag, low."""
    from sklearn.model_selection import KFold

    from pipeline.heads import fit_subsets

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(300, 20)) * (1 + rng.random(20)) + 3).astype(np.float32)
    Y = (X[:, :3] - 3 + 0.7 * rng.normal(size=(300, 3)) > 0.5).astype(int)
    subsets = [tr for tr, _ in KFold(4, shuffle=True, random_state=0).split(X)]
    subsets += [np.arange(300), np.flatnonzero(Y[:, 2] == 0)]
    est = create_head(head, 0, kind="multilabel")
    batched = fit_subsets(est, X, Y, subsets)
    alone = [clone(est).fit(X[s], Y[s]) for s in subsets]
    for a, b in zip(batched, alone):
        assert a[-1].tags_ and list(a.classes_) == [0, 1, 2]
        np.testing.assert_array_equal(getattr(a[-1], "C_", 0), getattr(b[-1], "C_", 0))
        np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=0.05 if head == "mlp" else 0.02)
        assert a.predict(X).shape == (300, 3) and (a.predict(X) == b.predict(X)).mean() >= 0.99
    assert batched[-1].predict_proba(X)[:, 2].max() < 0.05


def test_numbers_mlp_folds_trained_side_by_side_are_the_models_trained_alone():
    """The issue's "numbers heads batched as the class heads are": the folds and the refit of the
    numbers' mlp trained side by side are the models each trained alone (each standardises its own
    rows' target), and one is the model of scikit-learn's MLPRegressor inside TransformedTargetRegressor."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.model_selection import KFold
    from sklearn.neural_network import MLPRegressor

    from pipeline.heads import fit_subsets
    from pipeline.mlp_probe import TorchMLPRegressor

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(300, 20)) * (1 + rng.random(20)) + 3).astype(np.float32)
    y = 40 + 10 * (X[:, :3] - 3).sum(1) + 5 * rng.normal(size=300)
    subsets = [tr for tr, _ in KFold(4, shuffle=True, random_state=0).split(X)] + [np.arange(300)]
    est = create_head("mlp", 0, kind="regression").set_params(torchmlpregressor__amp="off")  # float32: no rounding apart
    batched = fit_subsets(est, X, y, subsets)
    alone = [clone(est).fit(X[s], y[s]) for s in subsets]
    for a, b, s in zip(batched, alone, subsets):
        assert a[-1].n_iter_ == b[-1].n_iter_ and a[-1].target_mean_ == pytest.approx(y[s].mean())
        np.testing.assert_allclose(a.predict(X), b.predict(X), atol=0.02 * y.std())
    args = dict(alpha=1.0, max_iter=60, random_state=3)
    ref = TransformedTargetRegressor(make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(64,), **args)),
                                     transformer=StandardScaler()).fit(X[:200], y[:200])
    ours = make_pipeline(StandardScaler(), TorchMLPRegressor(64, scale_target=True, amp="off", device="cpu", **args))
    ours.fit(X[:200], y[:200])
    np.testing.assert_allclose(ours[-1].loss_curve_, ref.regressor_[-1].loss_curve_, rtol=1e-4)
    np.testing.assert_allclose(ours.predict(X[200:]), ref.predict(X[200:]), atol=1e-3 * y.std())


def test_tags_logreg_chooses_each_tags_C_as_a_grid_search_per_tag_does():
    """Each tag's C is the one scikit-learn's LogisticRegression, standardised on each split's training
    rows, scores best by held-out log loss over the same splits: one-vs-rest grid search, one batch."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from pipeline.linear_probe import TorchLogisticRegression
    from pipeline.splitters import tag_folds

    rng = np.random.default_rng(1)
    X = rng.normal(size=(240, 8))
    Y = (X[:, :3] * [3.0, 0.6, 0.2] + rng.normal(size=(240, 3)) > 0.4).astype(int)
    Cs = (0.003, 0.03, 0.3, 3.0)
    ours = TorchLogisticRegression(Cs=Cs, cv=4, scale_folds=True, tol=1e-6, max_iter=1000).fit(X, Y)
    for t in range(3):
        losses = []
        for C in Cs:
            held = []
            for tr, te in tag_folds(Y, 4, 0):
                scaler = StandardScaler().fit(X[tr])
                ref = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(scaler.transform(X[tr]), Y[tr, t])
                held.append(log_loss(Y[te, t], ref.predict_proba(scaler.transform(X[te]))[:, 1], labels=[0, 1]))
            losses.append(np.mean(held))
        assert ours.C_[t] == Cs[int(np.argmin(losses))]
        np.testing.assert_allclose([p[1][t] for p in ours.path_], losses, rtol=1e-3)
    assert len(set(ours.C_)) > 1  # the tags chose differently
    ref = LogisticRegression(C=ours.C_[0], tol=1e-10, max_iter=10000).fit(X, Y[:, 0])
    np.testing.assert_allclose(ours.coef_[0], ref.coef_[0], rtol=0.01, atol=2e-3)


def test_mlps_of_different_sizes_train_side_by_side_as_alone():
    """Networks with different numbers of minibatches per epoch, stopping at different epochs, trained
    as one batch: each follows the loss curve it follows alone (float32), whose curve is scikit-learn's.
    A class that only rows outside every subset hold is no class of the models."""
    from sklearn.neural_network import MLPClassifier

    from pipeline.batched import fit_many
    from pipeline.mlp_probe import TorchMLPClassifier

    rng = np.random.default_rng(4)
    y = np.array(["a", "b", "c"])[rng.integers(0, 3, 700)]
    X = (rng.normal(size=(3, 16))[np.searchsorted(["a", "b", "c"], y)] + 2 * rng.normal(size=(700, 16))).astype(np.float32)
    ab = np.flatnonzero(y != "c")
    subsets = [ab[:60], ab[:170], ab[:400]]
    args = dict(hidden_layer_size=32, batch_size=50, tol=1e-2, max_iter=200, random_state=1)
    est = make_pipeline(StandardScaler(), TorchMLPClassifier(amp="off", device="cpu", **args))
    batched = fit_many(est, X, y, subsets)
    assert len({m[-1].n_iter_ for m in batched}) > 1  # they stopped at different epochs
    for model, rows in zip(batched, subsets):
        assert list(model.classes_) == ["a", "b"]
        ref = make_pipeline(StandardScaler(), MLPClassifier((32,), batch_size=50, tol=1e-2, max_iter=200,
                                                            random_state=1)).fit(X[rows], y[rows])
        assert model[-1].n_iter_ == ref[-1].n_iter_
        np.testing.assert_allclose(model[-1].loss_curve_, ref[-1].loss_curve_, rtol=1e-4)
    X[5, 3] = np.nan  # a scaler lets it through; the batched solvers would train on it silently
    with pytest.raises(ValueError, match="Input X contains NaN"):
        fit_many(est, X, y, subsets)


def test_fit_says_where_the_time_went(tiny_run, tmp_path):
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["logreg", "knn"], n_jobs=1, progress=False)
    assert set(res.timings["heads"]) == {"logreg", "knn"} and all(s > 0 for s in res.timings["heads"].values())
    assert {"read features", "fit heads", "save heads", "write leaderboard"} <= set(res.timings["stages"])
    assert "report" not in res.timings["stages"]  # written from run.json after it: it could not hold its own time
    assert res.time_summary().startswith("time: read features")
    entry = json.loads((tmp_path / "run" / "run.json").read_text())[-1]
    assert entry["timings"]["heads"] == res.timings["heads"]
    assert "per head, summed over workers" in (tmp_path / "run" / "report.html").read_text()


def test_label_folder_is_one_task_per_file(tiny_run, tmp_path):
    with FeatureCache(tiny_run["cache"]) as c:
        ids, labels = list(c.ids), list(c.labels)
    folder = tmp_path / "tasks"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, values in (("same", labels), ("coin", rng.choice(["h", "t"], len(ids)))):
        with open(folder / f"{name}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("id", "label"), *zip(ids, values)])
    res = fit(tiny_run["cache"], tmp_path / "run", labels=[folder], heads=["logreg"], n_jobs=1, progress=False)
    assert sorted(r.task for r in res.rows) == ["coin", "same", "shapes"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no \\*.csv label files"):
        fit(tiny_run["cache"], tmp_path / "run2", labels=[tmp_path / "empty"], heads=["logreg"], progress=False)


@pytest.mark.slow
def test_report_row_per_class_and_confusion(tiny_run, tmp_path):
    res = fit(tiny_run["cache"], tmp_path / "run", heads=["logreg", "knn"], n_jobs=1, progress=False)
    from pipeline.report import row_report

    rep = row_report(tmp_path / "run", 2)
    X_train, y_train, X_test, y_test = load_task(tiny_run["cache"]).holdout()
    pred = load_head(res.out / res.rows[1].head_file).predict(X_test)
    found = rep["breakdown"]
    assert rep["row"].head == res.rows[1].head and found.labels == ["blue", "red"]
    assert np.trace(found.confusion) == int((pred == y_test).sum()) and np.sum(found.confusion) == len(y_test)
    assert found.lines[1][0] == "red" and found.lines[1][4] == int((y_test == "red").sum())
    r = run_cli("report", tmp_path / "run", "--row", "2")
    assert r.returncode == 0 and "confusion (rows: true" in r.stdout and (tmp_path / "run" / "confusion_row2.png").is_file()
    r = run_cli("report", tmp_path / "run", "--row", "3")
    assert r.returncode == 1 and r.stderr.strip() == "error: --row must be in [1, 2], got 3", r.stderr


def test_a_rerun_fits_only_missing_rows_and_an_interrupted_fit_keeps_its_rows(tiny_run, tmp_path, monkeypatch):
    from pipeline import RunFolder
    from pipeline.errors import Interrupted
    from pipeline.stages import fit as fit_module

    real, calls = fit_module._fit_one, []

    def stop_at_second(head, *args):
        calls.append(head)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(head, *args)

    monkeypatch.setattr(fit_module, "_fit_one", stop_at_second)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match=f"1 of 2 row\\(s\\) fitted and saved in {run}; the same command fits the others"):
        fit(tiny_run["cache"], run, heads=["centroid", "ridge"], taps=["pooled"], n_jobs=1, progress=False)
    assert [r.head for r in RunFolder(run).rows()] == ["centroid"]
    calls[:] = ["centroid"]  # the next head is the second: it stops at once
    with pytest.raises(Interrupted, match=f"no row was fitted yet, so {tmp_path / 'new'} is not kept; the same command"):
        fit(tiny_run["cache"], tmp_path / "new", heads=["knn", "centroid", "ridge"], taps=["pooled"], n_jobs=1, progress=False)
    assert not (tmp_path / "new").exists()  # no protocols, no empty heads/ left
    monkeypatch.setattr(fit_module, "_fit_one", real)
    calls.clear()
    monkeypatch.setattr(fit_module, "_fit_one", lambda head, *a: calls.append(head) or real(head, *a))
    res = fit(tiny_run["cache"], run, heads=["centroid", "ridge", "knn"], taps=["pooled"], n_jobs=1, progress=False)
    assert sorted(calls) == ["knn", "ridge"] and {r.head for r in res.rows} == {"centroid", "ridge", "knn"}
    assert any("1 row(s) already in" in n for n in res.notes)
