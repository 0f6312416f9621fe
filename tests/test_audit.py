import csv
import json
import os
import re
import shutil
import tracemalloc
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, make_image, run_cli, shared_or_skip
from pipeline import FeatureCache, PipelineError, Protocol, Row, RunFolder, audit, extract, fit, neighbors
from pipeline import similarity
from pipeline.copies import leak_message
from pipeline.findings import Rows, cells, label_issues_file
from pipeline.stages.audit import (CLASS_LABEL_HEAD, COPIES, FINDER_COPIES, AuditConfig, joined_features, label_head, label_heads, out_of_fold,
                                   rank_label_issues)

featurizer_module = import_module("pipeline.featurizer")
audit_module = import_module("pipeline.stages.audit")
FLIPPED = ("train/red/red_003.jpg", "train/blue/blue_005.jpg")
COPY, ORIGINAL, ODD = "val/red/copy_of_red_000.png", "train/red/red_000.jpg", "val/blue/odd.jpg"
EXACT = 0.9999  # the tiny random-weight model puts distinct images of one colour at cosine 0.997
FAST = dict(head="torch-logreg")  # one hold-out instead of logreg's 5 inner folds; the real-backbone test uses logreg


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights_dir, _folder_template):
    """The template folder with a training image copied (as PNG) into val, an image unlike the others,
    and a label file with two training labels flipped; extracted with the tiny model."""
    os.environ["PIPELINE_WEIGHTS_DIR"] = str(tiny_weights_dir)
    base = tmp_path_factory.mktemp("audit")
    data = Path(shutil.copytree(_folder_template, base / "shapes"))
    Image.open(data / ORIGINAL).save(data / COPY)
    stripes = np.zeros((56, 72, 3), np.uint8)
    stripes[::4] = (20, 230, 20)
    Image.fromarray(stripes).save(data / ODD)
    ids = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.*"))
    flip = {"red": "blue", "blue": "red"}
    labels = base / "flipped.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("id", "label", "split"))
        for i in ids:
            split, label = i.split("/")[:2]
            w.writerow((i, flip[label] if i in FLIPPED else label, split))
    [res] = extract(data, TINY, base / "cache", workers=0, progress=False)
    return {"data": data, "cache": res.cache, "labels": labels}


def _brute_knn(Q, B, k):
    return -np.sort(-(Q @ B.T), axis=1)[:, :k]


@pytest.mark.parametrize("use_faiss", [False, True])
def test_blocked_search_matches_brute_force(use_faiss, monkeypatch):
    if use_faiss and not similarity.faiss_available():
        pytest.skip("faiss not installed")
    monkeypatch.setattr(similarity, "faiss_available", lambda: use_faiss)
    rng = np.random.default_rng(0)
    X = similarity.normalized(rng.normal(size=(53, 8)))
    X[40] = X[3]  # an exact copy
    X[41] = similarity.normalized(X[[7]] + 0.05 * rng.normal(size=(1, 8)))[0]  # a near one
    sims, idx = similarity.knn(X[:20], X, 4, block=7)
    want_s = _brute_knn(X[:20], X, 4)
    np.testing.assert_allclose(sims, want_s, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(X[:20] @ X.T, idx, 1), want_s, atol=1e-5)  # ties may swap
    sims, idx = similarity.knn(X, X, 3, exclude=np.arange(len(X)), block=7)
    assert not (idx == np.arange(len(X))[:, None]).any()
    assert idx[3, 0] == 40 and idx[40, 0] == 3 and sims[3, 0] == pytest.approx(1.0, abs=1e-5)
    sims, idx = similarity.knn(X[:2], X[:2], 5)  # fewer rows than k: padded
    assert (idx[:, 2:] == -1).all() and np.isnan(sims[:, 2:]).all()


def test_leak_message_says_where_the_copies_are():
    ids, y = np.array([f"i{k}" for k in range(10)], dtype=object), np.array(["a", "b"] * 5, dtype=object)
    holdout = Protocol("t", "classification", "val", 0, ids, y, np.array([-1] * 5 + [0] * 5))
    assert leak_message(1, holdout) == "1 val image has a near-copy in train"
    cv = Protocol("t", "classification", "cv2", 0, ids, y, np.array([0, 1] * 5))
    assert leak_message(4, cv) == "4 images have a near-copy in another fold"


@pytest.mark.parametrize("folds", [[-1] * 12 + [0] * 6, [0, 1, 2] * 6])
def test_every_sample_is_predicted_once_by_a_model_that_never_saw_it(folds):
    y = np.array(["a", "b"] * 9, dtype=object)
    p = Protocol("t", "classification", "val" if folds[0] < 0 else "cv3", 0, np.arange(18).astype(str).astype(object),
                 y, np.array(folds))
    plan = p.oof_plan(cv=3, seed=0)
    predicted = np.concatenate([test for _, test in plan])
    assert sorted(predicted) == list(range(18))
    assert all(not set(train) & set(test) for train, test in plan)
    if folds[0] < 0:  # the scored images are predicted by a model of the training images only, as fit scores them
        assert any(set(train) == set(range(12)) and set(test) == set(range(12, 18)) for train, test in plan)


def test_findings_rows_read_as_a_list_of_dicts_made_a_block_at_a_time(monkeypatch):
    """An audit's ranking and outliers hold arrays and make their rows a block at a time (ten million
    images are no ten million dicts), read as a list of dicts is."""
    monkeypatch.setattr(Rows, "BLOCK", 2)
    values = np.array([0.123456, 0.5, 0.25, 0.75, 0.1])
    rows = Rows(dict(id=cells(np.array(list("abcde"), dtype=object)), score=cells(values, 2), big=cells(values > 0.3)),
                np.argsort(values))
    assert [d["id"] for d in rows] == list("eacbd") and len(rows) == 5
    assert rows[0] == dict(id="e", score=0.1, big=False) and rows[-1] == dict(id="d", score=0.75, big=True)
    assert [d["id"] for d in rows[1:4]] == ["a", "c", "b"] and len(rows[1:3]) == 2
    assert [d["id"] for d in rows.where("big")] == ["b", "d"] and [d["id"] for d in rows[:3].where("big")] == []
    assert list(Rows({}, np.arange(0)).where("flagged")) == [] and repr(Rows({}, np.arange(0))) == "<0 rows>"
    assert repr(rows[:1]) == "<1 rows: {'id': 'e', 'score': 0.1, 'big': False}>"


def _cv_protocol(kind: str, y: np.ndarray) -> Protocol:
    ids = np.array([f"i{k:03d}" for k in range(len(y))], dtype=object)
    return Protocol("t", kind, "cv5", 0, ids, y, np.arange(len(y)) % 5)


def test_the_ranking_holds_every_image_with_the_flipped_classes_first():
    rng = np.random.default_rng(0)
    centres = 3 * rng.normal(size=(3, 8))
    truth = np.repeat([0, 1, 2], 40)
    X = centres[truth] + rng.normal(size=(120, 8))
    flips = rng.choice(120, 6, replace=False)
    given = truth.copy()
    given[flips] = (truth[flips] + 1) % 3
    protocol = _cv_protocol("classification", np.array(["abc"[g] for g in given], dtype=object))
    probs = out_of_fold(X, protocol, "logreg", 5, 0)
    assert probs.shape == (120, 3) and np.allclose(probs.sum(axis=1), 1.0)
    order, quality, flagged, _ = rank_label_issues(protocol, probs)
    assert sorted(order) == list(range(120))  # the whole ranking, not cleanlab's flagged set alone
    assert set(order[:6]) == set(flips)
    np.testing.assert_allclose(quality, probs[np.arange(120), given])  # self-confidence
    assert set(np.flatnonzero(flagged)) < set(flips)  # confident learning flags 4 of the 6: ranking only those
    assert flagged.sum() == 4                         # would miss two flips the ranking puts on top


def test_cleanlabs_batched_finder_flags_without_copying_the_probabilities(monkeypatch):
    """Where cleanlab's label-issue finder with its copies of the probabilities would exceed
    --max-memory (ten million images of 100 classes in float32: 12 GB), its batched finder flags, a block
    of rows at a time: the lowest label quality, as many as confident learning counts. The ranking is the
    same."""
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 400)
    X = 3 * rng.normal(size=(3, 8))[truth] + rng.normal(size=(1200, 8))
    flips = rng.choice(1200, 40, replace=False)
    given = truth.copy()
    given[flips] = (truth[flips] + 1) % 3
    protocol = _cv_protocol("classification", np.array(["abc"[g] for g in given], dtype=object))
    probs = out_of_fold(X, protocol, "logreg", 5, 0).astype(np.float32)
    bound = probs.nbytes * FINDER_COPIES
    assert AuditConfig(max_memory=bound - 1).finds_in_batches(probs)
    assert not AuditConfig(max_memory=bound).finds_in_batches(probs) and not AuditConfig().finds_in_batches(probs)
    pruned, batched = rank_label_issues(protocol, probs), rank_label_issues(protocol, probs, batched=True)
    np.testing.assert_array_equal(batched.order, pruned.order)
    np.testing.assert_array_equal(batched.quality, pruned.quality)
    top = set(batched.order[:batched.flagged.sum()])
    assert set(np.flatnonzero(batched.flagged)) == top  # the lowest label quality
    assert len(top & set(flips)) >= 0.9 * len(top) and abs(batched.flagged.sum() - pruned.flagged.sum()) <= 5
    from cleanlab.experimental.label_issues_batched import find_label_issues_batched

    monkeypatch.setattr(audit_module, "FINDER_BATCH", 256)  # several blocks: cleanlab's own batched finder flags the same
    np.testing.assert_array_equal(audit_module._batched_class_issues(given, probs), find_label_issues_batched(
        given, probs, batch_size=256, n_jobs=1, verbose=False, return_mask=True))
    many = rng.dirichlet(np.full(50, 0.1), size=40_000).astype(np.float32)  # 8 MB
    labels = rng.integers(50, size=len(many))
    tracemalloc.start()
    audit_module._batched_class_issues(labels, many)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < many.nbytes / 2  # cleanlab's own copies every probability at its last step


def test_tags_are_ranked_by_cleanlabs_multilabel_quality():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 6))
    tags = [tuple(t for t, on in (("a", x[0] > 0), ("b", x[1] > 0)) if on) for x in X]
    planted = np.flatnonzero(np.abs(X[:, 0]) > 1.5)[:5]  # far from the boundary: a sure error
    for i in planted:
        tags[i] = tuple(sorted(set(tags[i]) ^ {"a"}))
    y = np.empty(150, dtype=object)
    y[:] = tags
    protocol = _cv_protocol("multilabel", y)
    probs = out_of_fold(X, protocol, label_head("multilabel", "t", None), 5, 0)
    assert probs.shape == (150, 2)
    order, _, flagged, _ = rank_label_issues(protocol, probs)
    assert len(order) == 150 and set(order[:5]) == set(planted)
    assert set(np.flatnonzero(flagged)) >= set(planted)
    y[:] = [(*t, "always") for t in tags]  # a tag on every image (cleanlab refused it: one class)
    protocol = _cv_protocol("multilabel", y)
    probs = out_of_fold(X, protocol, label_head("multilabel", "t", None), 5, 0)
    order, _, flagged, _ = rank_label_issues(protocol, probs)
    assert probs.shape == (150, 3) and set(order[:5]) == set(planted) and set(np.flatnonzero(flagged)) >= set(planted)
    y[:] = [(*t, "coin") if c else t for t, c in zip(tags, rng.random(150) < 0.5)]  # a tag no feature predicts
    protocol = _cv_protocol("multilabel", y)
    found = rank_label_issues(protocol, out_of_fold(X, protocol, label_head("multilabel", "t", None), 5, 0))
    assert found.note == "tags no out-of-fold prediction learns, so not searched for label errors: coin"
    assert set(found.order[:5]) == set(planted) and set(np.flatnonzero(found.flagged)) >= set(planted)
    assert found.flagged.sum() <= flagged.sum() + 2  # the coin's disagreements are no label errors


def test_numbers_are_ranked_by_cleanlabs_regression_quality():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(100, 5))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0, 1.5]) + 0.1 * rng.normal(size=100)
    planted = np.array([3, 30, 60, 90])
    y[planted] += 8.0
    protocol = _cv_protocol("regression", y)
    pred = out_of_fold(X, protocol, label_head("regression", "t", None), 5, 0)
    assert pred.shape == (100,) and not np.isnan(pred).any()
    order, _, flagged, _ = rank_label_issues(protocol, pred)
    assert set(order[:4]) == set(planted)
    assert np.flatnonzero(flagged).tolist() == planted.tolist()  # beyond the fence of the residuals: those alone


class _Run:
    def __init__(self, rows):
        self._rows = rows

    def rows(self):
        return self._rows


def test_the_label_head_is_the_audits_default_or_the_runs_best_that_can_score_the_labels():
    def row(head, stage="fit"):
        return Row("b", "", "pooled", "t", head, "val", stage=stage, metrics={"accuracy": 0.9}, head_file="h")

    run = _Run([row("finetune-lp", "finetune"), row("linear-svm"), row("knn"), row("logreg")])
    assert label_head("classification", "t", run, "run") == "knn"  # linear-svm has no class probabilities
    assert label_head("classification", "other", run, "run") == CLASS_LABEL_HEAD
    assert label_head("classification", "t", run) == CLASS_LABEL_HEAD  # auto: the run's heads are not asked
    assert [label_head(k, "t", None) for k in ("multilabel", "regression")] == ["logreg", "ridge"]
    assert label_head("regression", "t", None, "knn") == "knn"
    with pytest.raises(PipelineError, match=re.escape("--head sgd cannot score the labels of task 't' (regression)")):
        label_head("regression", "t", None, "sgd")
    tasks = [SimpleNamespace(kind="classification", name="c"), SimpleNamespace(kind="multilabel", name="t"),
             SimpleNamespace(kind="regression", name="n")]
    assert label_heads(tasks, None, "ridge") == [CLASS_LABEL_HEAD, "ridge", "ridge"]  # classes: ridge has no probabilities
    assert label_heads(tasks, None, "sgd") == ["sgd", "logreg", "ridge"]
    with pytest.raises(PipelineError, match=re.escape("--head sgd cannot score the labels of task 'n' (regression)")):
        label_heads(tasks[2:], None, "sgd")


def test_tags_and_numbers_tasks_get_label_issue_files(planted, tmp_path):
    ids = sorted(p.relative_to(planted["data"]).as_posix() for p in planted["data"].rglob("*.*"))
    odd = set(FLIPPED)
    files = {"tags": ("labels", lambda i, red: "|".join(["warm"] * (red ^ (i in odd)) + ["held"] * i.startswith("val/"))),
             "numbers": ("target", lambda i, red: str(5.0 if i in odd else float(red)))}
    for name, (column, value) in files.items():
        with (tmp_path / f"{name}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(("id", column, "split"))
            w.writerows((i, value(i, "/red/" in i), "train") for i in ids)  # no val: cross-validated
    result = audit(planted["cache"], tmp_path / "a", [tmp_path / "tags.csv", tmp_path / "numbers.csv"], map="none",
                   dup_threshold=EXACT)
    for name in files:
        task = next(t for t in result.tasks if t.task == name)
        with open(tmp_path / "a" / f"label_issues_{name}.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == len(ids) and {r["id"] for r in rows[:2]} == odd, name
        assert "label issues need one class" not in task.note and f"label_issues_{name}.csv" in task.lines(tmp_path / "a")[0]
    tags = next(t for t in result.tasks if t.task == "tags")  # 'held' (the val folder) is not in the pixels
    assert "not searched for label errors: held" in tags.note  # so 'warm' alone is ranked, a yes/no class
    named = audit(planted["cache"], tmp_path / "b", [tmp_path / "tags.csv"], map="none", dup_threshold=EXACT, head="ridge")
    notes = {t.task: t.note for t in named.tasks}  # ridge scores the tags; the classes, which it cannot, get auto's
    assert notes["shapes"].startswith("--head ridge cannot score classification labels, so auto's head did; labels "
                                      f"scored by {CLASS_LABEL_HEAD}'s"), notes
    assert "labels scored by ridge's" in notes["tags"] and "cannot score" not in notes["tags"]


def test_audit_finds_the_flipped_labels_the_copy_and_the_odd_image(planted, tmp_path):
    out = tmp_path / "audit"
    result = audit(planted["cache"], out, [planted["labels"]], data=planted["data"], dup_threshold=EXACT, **FAST)
    by_task = {t.task: t for t in result.tasks}
    assert set(by_task) == {"shapes", "flipped"}
    flipped = by_task["flipped"]
    assert set(FLIPPED) <= {d["id"] for d in flipped.issues[:3]}
    assert {d["id"] for d in flipped.issues} <= {*FLIPPED, ODD}  # the odd image is like neither class
    assert all(d["suggested"] != d["given"] for d in flipped.issues)
    scores = [d["score"] for d in flipped.issues]
    assert scores == sorted(scores)  # most suspicious (lowest self-confidence) first
    assert not set(FLIPPED) & {d["id"] for d in by_task["shapes"].issues}  # the true labels are not flagged
    assert flipped.leaked == [COPY] and by_task["shapes"].leaked == [COPY]
    first = result.duplicates[0]
    assert (first["id_a"], first["id_b"], first["split_a"], first["split_b"], first["cross"]) == (COPY, ORIGINAL, "val", "train", True)
    assert first["similarity"] >= EXACT
    assert result.outliers[0]["id"] == ODD and result.outliers[0]["outlier"]
    with open(out / "label_issues_flipped.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "given", "suggested", "score", "flagged", "split"]
    assert len(rows) == 38 and [r["id"] for r in rows] == [d["id"] for d in flipped.ranking]  # the whole ranking
    assert [r["id"] for r in rows if r["flagged"] == "True"] == [d["id"] for d in flipped.issues]
    assert all(r["split"] == r["id"].split("/")[0] for r in rows)  # the label file's split of each image
    with open(out / "duplicates.csv") as fh:
        assert next(csv.DictReader(fh))["id_a"] == COPY
    page = (out / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64") >= 5 and "given <b>red</b>" in page and "Map (t-SNE)" in page
    assert (out / "map.png").is_file() and len((out / "map.csv").read_text().splitlines()) == 39
    lines = "\n".join(result.lines())
    assert "1 val image has a near-copy in train" in lines
    assert f"label issues in flipped (val, 38 images): {len(flipped.issues)} flagged" in lines


def test_the_page_without_images_lists_ids(planted, tmp_path):
    result = audit(planted["cache"], tmp_path / "a", map="none", dup_threshold=EXACT, **FAST)
    page = (tmp_path / "a" / "audit.html").read_text()
    assert "data:image/jpeg" not in page and "--data DIR" in page and COPY in page
    assert "map" not in result.files


def test_unlabelled_images_get_every_finding_but_label_issues(planted, tmp_path):
    images = tmp_path / "unlabelled"
    images.mkdir()
    for f in ("train/red/red_000.jpg", "train/blue/blue_000.jpg", "train/blue/blue_001.jpg", "val/red/red_001.jpg"):
        shutil.copy(planted["data"] / f, images / f.replace("/", "_"))
    Image.open(images / "train_red_red_000.jpg").save(images / "copy.png")
    [res] = extract(images, TINY, tmp_path / "cache", workers=0, progress=False)
    result = audit(res.cache, tmp_path / "a", dup_threshold=EXACT, map="none", **FAST)
    assert result.tasks == [] and "no labels in the cache" in result.lines()[0]
    assert [(d["id_a"], d["id_b"], d["cross"]) for d in result.duplicates] == [("copy.png", "train_red_red_000.jpg", False)]
    assert len(result.outliers) == 5 and (tmp_path / "a" / "audit.html").is_file()


def test_several_caches_are_backbones_side_by_side(planted, tmp_path):
    [f32] = extract(planted["data"], TINY, tmp_path / "cache", dtype="float32", workers=0, progress=False)
    with FeatureCache(planted["cache"]) as a, FeatureCache(f32.cache) as b:
        ids, X = joined_features([a, b], "pooled")
        _, Xa = joined_features([a], "pooled")
    assert X.shape == (len(ids), 2 * Xa.shape[1])
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    result = audit([planted["cache"], f32.cache], tmp_path / "a", map="none", dup_threshold=EXACT, **FAST)
    assert result.cross_split[0]["id_a"] == COPY


def test_audit_scores_on_a_runs_protocol_and_the_report_links_it(planted, tmp_path):
    run = tmp_path / "run"
    fitted = fit(planted["cache"], run, heads=["centroid"], n_jobs=1, progress=False)
    with FeatureCache(planted["cache"]) as c:
        ids, X = joined_features([c], "pooled")
    val = np.array([i.startswith("val/") for i in ids])
    assert ((X[val] @ X[~val].T).max(axis=1) >= 0.85).sum() > 1  # the tiny model puts many distinct images close
    assert fitted.near_copies == {"shapes": "1 val image has a near-copy in train"}  # the pixels confirm only COPY
    result = audit(planted["cache"], tmp_path / "audit", run=run, map="none", **FAST)
    assert result.tasks[0].protocol.id == RunFolder(run).protocol("shapes").id
    assert RunFolder(run).audit_page() == run / ".." / "audit" / "audit.html"
    assert "href='../audit/audit.html'" in (run / "report.html").read_text()
    shutil.move(str(run), str(tmp_path / "moved"))  # the link is relative: it survives a move of both
    assert RunFolder(tmp_path / "moved").audit_page().is_file()


@pytest.mark.parametrize("settings, message", [
    (dict(head="linear-svm"), "--head must be auto, run, a head with class probabilities (logreg, torch-logreg, sgd, ...) "
                              "or one of tags or numbers (ridge, ...), got 'linear-svm'"),
    (dict(dup_threshold=1.5), "--dup-threshold must be in (0, 1], got 1.5"),
    (dict(map="pca"), "--map must be one of auto, umap, tsne, none, got 'pca'"),
    (dict(k=0), "--k must be at least 1, got 0"),
    (dict(run="nowhere"), "nowhere is not a fit run folder"),
    (dict(max_memory="lots"), "--max-memory must be a size above zero, such as 8GB or 512MB, got 'lots'"),
])
def test_bad_settings_are_refused_before_any_work(planted, tmp_path, settings, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        audit(planted["cache"], tmp_path / "a", **settings)
    assert not (tmp_path / "a").exists()


def test_over_max_memory_the_audit_reads_by_chunks_finds_the_same_and_the_bound_is_recorded(planted, tmp_path, capsys):
    """Features whose copies exceed --max-memory stay in the cache: the audit reads them by chunks,
    searches an index of a byte per feature and fits its label head on every fold at once by chunks
    (scikit-learn's LogisticRegression at C=1 becomes the same model in torch), and finds what the
    audit in memory finds. A --head that holds the features is refused before any work."""
    with FeatureCache(planted["cache"]) as c:
        rows, dims = int(c.valid.sum()), c.info()["taps"]["pooled"]
    need = rows * dims * 4 * COPIES
    settings = dict(labels=[planted["labels"]], map="none")
    whole = audit(planted["cache"], tmp_path / "whole", **settings)
    capsys.readouterr()
    chunked = audit(planted["cache"], tmp_path / "chunks", max_memory=need - 1, **settings)  # a number of bytes too
    step = (need - 1) // (32 * dims)
    assert f"{rows} x {dims} float32 with its copies exceed --max-memory {need - 1}, so the audit reads them {step} " \
           "rows at a time" in capsys.readouterr().err
    assert 1 < step < rows
    said = [line for line in chunked.lines() if line.startswith("nearest others")]
    assert len(said) == 1 and re.fullmatch(r"nearest others \(the copies' candidates, the outliers' scores\): an inverted "
                                           rf"file of 1 cell \(a byte per feature\), 1 probed: recall@10 0\.9\d\d on {rows} rows",
                                           said[0]), said  # one cell: only the bytes' rounding misses
    assert not any(line.startswith("nearest others") for line in whole.lines())  # exact: nothing to say

    def confirmed(result):
        return {(d["id_a"], d["id_b"]) for d in result.duplicates if d["confirmed"]}

    assert confirmed(chunked) == confirmed(whole) and {COPY, ORIGINAL} in [set(p) for p in confirmed(whole)]
    for a, b in zip(whole.tasks, chunked.tasks, strict=True):
        assert a.leaked == b.leaked
        assert {r["id"] for r in a.ranking[:len(FLIPPED)]} == {r["id"] for r in b.ranking[:len(FLIPPED)]}
        score = {r["id"]: r["score"] for r in a.ranking}
        np.testing.assert_allclose([r["score"] for r in b.ranking], [score[r["id"]] for r in b.ranking], atol=2e-3)
        assert [r["flagged"] for r in a.ranking] == [r["flagged"] for r in b.ranking]
    assert {r["id"] for r in whole.tasks[-1].ranking[:len(FLIPPED)]} == set(FLIPPED)
    assert chunked.outliers[0]["id"] == whole.outliers[0]["id"] == ODD

    with pytest.raises(PipelineError, match="--head knn holds the features in memory, which exceed --max-memory here; "
                                            "the classification heads that score labels reading by chunks: logreg"):
        audit(planted["cache"], tmp_path / "knn", head="knn", max_memory=need - 1, **settings)
    assert not (tmp_path / "knn").exists()
    run = tmp_path / "run"
    fit(planted["cache"], run, heads=["centroid"], n_jobs=1, progress=False)
    audit(planted["cache"], tmp_path / "b", run=run, max_memory=f"{need}B", map="none", **FAST)
    recorded = [e for e in json.loads((run / "run.json").read_text()) if e["stage"] == "audit"]
    assert recorded[-1]["parameters"]["max_memory"] == f"{need}B"


def test_over_max_memory_the_note_says_cleanlabs_batched_finder_flagged(planted, tmp_path, monkeypatch):
    """An audit whose probabilities with cleanlab's copies exceed --max-memory flags with the batched
    finder and says so (here the copies are made many, so the planted set's bound gives chunks of rows)."""
    with FeatureCache(planted["cache"]) as c:
        need = int(c.valid.sum()) * c.info()["taps"]["pooled"] * 4 * COPIES
    monkeypatch.setattr(audit_module, "FINDER_COPIES", need)
    found = audit(planted["cache"], tmp_path / "a", labels=[planted["labels"]], map="none", max_memory=need - 1, **FAST)
    flipped = next(t for t in found.tasks if t.task != "shapes")
    assert f"exceed --max-memory {need - 1}, so cleanlab's batched finder flagged the lowest label quality" in flipped.note
    assert set(FLIPPED) <= {d["id"] for d in flipped.issues} <= {*FLIPPED, ODD}
    with open(tmp_path / "a" / label_issues_file(flipped.task), newline="") as fh:
        assert [r["id"] for r in csv.DictReader(fh) if r["flagged"] == "True"] == [d["id"] for d in flipped.issues]


def test_neighbors_of_cached_and_new_images(planted, tmp_path):
    data = planted["data"]
    Image.open(data / "train/blue/blue_002.jpg").save(tmp_path / "outside.png")
    (tmp_path / "broken.jpg").write_text("not an image")
    rows = neighbors(planted["cache"], [data / ORIGINAL, tmp_path / "outside.png", tmp_path / "broken.jpg"], k=3,
                     out=tmp_path / "n.csv", workers=0, progress=False)
    by_query: dict[str, list[dict]] = {}
    for r in rows:
        by_query.setdefault(Path(r["query"]).name, []).append(r)
    own = by_query["red_000.jpg"]
    assert [r["rank"] for r in own] == [1, 2, 3] and ORIGINAL not in [r["id"] for r in own]
    assert own[0]["id"] == COPY and own[0]["similarity"] >= EXACT  # its copy, not itself
    outside = by_query["outside.png"]
    assert outside[0]["id"] == "train/blue/blue_002.jpg" and outside[0]["similarity"] >= EXACT
    assert outside[0]["label"] == "blue" and outside[0]["split"] == "train"
    assert "not an image" in by_query["broken.jpg"][0]["error"]
    with open(tmp_path / "n.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 7


def test_neighbors_of_cached_images_need_no_backbone(planted, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the backbone should not run for images already in the cache")

    monkeypatch.setattr(featurizer_module.Featurizer, "load", fail)
    rows = neighbors(planted["cache"], [planted["data"] / "val"], k=2, progress=False)
    assert len(rows) == 2 * 14 and all(r["error"] == "" for r in rows)


@pytest.mark.slow
def test_audit_and_neighbors_from_the_command_line(planted, tmp_path):
    r = run_cli("audit", planted["cache"], "--out", tmp_path / "a", "--labels", planted["labels"], "--data",
                planted["data"], "--dup-threshold", str(EXACT), "--map", "none", "--head", "torch-logreg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "label issues in flipped (val, 38 images): " in r.stdout and "page: " in r.stdout
    assert "audit: features of 38 images" in r.stderr
    again = ("audit", planted["cache"], "--out", tmp_path / "a", "--map", "none", "--head", "torch-logreg", "--no-progress")
    r = run_cli(*again, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {tmp_path / 'a'} holds an earlier audit (audit.html); "
                                                      "pass --overwrite to replace it, or another --out")
    r = run_cli(*again, "--overwrite", cwd=tmp_path)
    assert r.returncode == 0 and "audit: " not in r.stderr and "page: " in r.stdout, r.stderr
    assert not (tmp_path / "a" / "label_issues_flipped.csv").exists()  # the earlier audit's task went with it
    r = run_cli("audit", planted["cache"], "--out", tmp_path / "b", "--dup-threshold", "2")
    assert r.returncode == 1 and r.stderr.strip() == "error: --dup-threshold must be in (0, 1], got 2.0"
    r = run_cli("neighbors", planted["cache"], planted["data"] / ORIGINAL, "-k", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    got = list(csv.DictReader(r.stdout.splitlines()))
    assert [g["rank"] for g in got] == ["1", "2"] and got[0]["id"] == COPY
    r = run_cli("fit", planted["cache"], "--out", tmp_path / "run", "--heads", "centroid", "--no-progress")
    assert r.returncode == 0 and re.search(r"\d+ val images? ha(s|ve) a near-copy in train; see pipeline audit", r.stderr)


@pytest.mark.slow
@pytest.mark.real
def test_real_backbone_finds_planted_copies_and_flipped_labels(tmp_path):
    """Hymenoptera with 6 training images re-encoded into val and 5 % of the training labels flipped:
    every copy is a cross-split pair and nothing else is; most flipped labels are flagged."""
    source = shared_or_skip("data", "hymenoptera")
    os.environ["PIPELINE_WEIGHTS_DIR"] = str(shared_or_skip("weights"))
    data = Path(shutil.copytree(source, tmp_path / "hym"))
    rng = np.random.default_rng(0)
    train = sorted(p for p in (data / "train").rglob("*.jpg"))
    planted = {}
    for n, k in enumerate(rng.choice(len(train), 6, replace=False)):
        src = train[k]
        with Image.open(src) as im:
            im = im.convert("RGB")
            if n % 2:
                im = im.resize((im.width * 3 // 4, im.height * 3 // 4))
            target = data / "val" / src.parent.name / f"copy{n}.jpg"
            im.save(target, quality=70)
        planted[target.relative_to(data).as_posix()] = src.relative_to(data).as_posix()
    ids = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.*") if p.is_file())
    train_ids = [i for i in ids if i.startswith("train/")]
    flipped = set(rng.choice(train_ids, round(0.05 * len(train_ids)), replace=False))
    labels = tmp_path / "flipped.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("id", "label"))
        for i in ids:
            label = i.split("/")[1]
            w.writerow((i, {"ants": "bees", "bees": "ants"}[label] if i in flipped else label))
    [res] = extract(data, "tf_efficientnet_lite0.in1k", tmp_path / "cache", progress=False)
    result = audit(res.cache, tmp_path / "audit", [labels], map="none")
    found = {(d["id_a"], d["id_b"]) for d in result.cross_split}
    # the pixels confirm 5 of the 6 here: copy3 (75 %, JPEG 70, of a 375-pixel photo) scores 0.9675 < 0.975
    assert found <= set(planted.items()) and len(found) >= 5
    issues = [d["id"] for d in next(t for t in result.tasks if t.task == "flipped").issues]
    assert len(set(issues) & flipped) >= 0.6 * len(flipped)
    assert len(set(issues) & flipped) >= 0.6 * len(issues)


def test_an_interrupted_audit_says_that_it_wrote_nothing(planted, tmp_path, monkeypatch):
    from pipeline.errors import Interrupted

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit_module, "find_copies", stop)
    out = tmp_path / "audit"
    with pytest.raises(Interrupted, match=f"audit stopped after 2 finished step\\(s\\); its files are written only "
                                          f"once every step has ended, so {out} holds none of them"):
        audit(planted["cache"], out, map="none", **FAST)
    assert not out.exists() or not any(out.iterdir())


def test_an_audit_into_a_run_sets_aside_suspected_label_errors_and_a_refit_keeps_them_aside(planted, tmp_path):
    """Two val labels flipped: the audit flags them, sets them aside in the run's protocol and scores the
    rows again without them; a task no row of which is above chance keeps its images; fit again, the
    rows still leave them out."""
    ids = sorted(p.relative_to(planted["data"]).as_posix() for p in planted["data"].rglob("*.*") if p.name != Path(ODD).name)
    flipped_val = ["val/red/red_001.jpg", "val/blue/blue_002.jpg"]
    flip = {"red": "blue", "blue": "red"}
    labels, coin = tmp_path / "noisy.csv", tmp_path / "coin.csv"
    rng = np.random.default_rng(0)
    with labels.open("w", newline="") as fh, coin.open("w", newline="") as gh:
        w, c = csv.writer(fh), csv.writer(gh)
        w.writerow(("id", "label", "split"))
        c.writerow(("id", "label", "split"))
        for i in ids:
            split, label = i.split("/")[:2]
            w.writerow((i, flip[label] if i in flipped_val else label, split))
            c.writerow((i, rng.choice(["heads", "tails"]), split))
    run = tmp_path / "run"
    fit(planted["cache"], run, labels=[labels, coin], heads=["ridge", "centroid"], n_jobs=1, progress=False)
    result = audit(planted["cache"], tmp_path / "audit", [labels, coin], run=run, map="none", **FAST)
    [said, kept] = sorted(result.set_aside, key=lambda line: line.startswith("not"))
    assert said.startswith(f"set aside in {run}: 2 scored images of noisy with a suspected label error "
                           "(each row's accuracy_clean); task 'noisy' without its 3 set-aside images: best row unchanged")
    assert kept.startswith(f"not set aside in {run}: the suspected label errors of coin, as no row of it is above chance")
    protocol = RunFolder(run).protocol("noisy")
    assert sorted(protocol.ids[protocol.aside]) == sorted([COPY, *flipped_val])  # the leaked copy, and the two
    for r in [r for r in RunFolder(run).rows() if r.task == "noisy"]:
        assert r.metrics["n_set_aside"] == 3 and r.metrics["accuracy"] < r.metrics["accuracy_clean"] == 1.0
    again = fit(planted["cache"], run, labels=[labels], heads=["ridge", "knn"], n_jobs=1, progress=False)
    assert {r.metrics["n_set_aside"] for r in again.rows if r.task == "noisy"} == {3}


def test_an_out_that_is_a_file_is_refused_before_any_work(planted, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="--out must be a folder for the audit's files, got the file"):
        audit(planted["cache"], tmp_path / "notes.txt", map="none", **FAST)
    with pytest.raises(PipelineError, match=f"got the file {re.escape(str(tmp_path / 'notes.txt'))} \\(in --out "):
        audit(planted["cache"], tmp_path / "notes.txt" / "audit", map="none", **FAST)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_earlier_audit_is_replaced_only_when_asked_and_then_as_a_whole(planted, tmp_path, monkeypatch):
    from pipeline.errors import Interrupted

    out = tmp_path / "audit"
    audit(planted["cache"], out, [planted["labels"]], map="none", dup_threshold=EXACT, **FAST)
    (out / "notes.txt").write_text("mine")
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"label_issues_flipped.csv", "audit.html"} <= set(written)
    with pytest.raises(PipelineError, match=f"{re.escape(str(out))} holds an earlier audit \\(audit.html\\); pass "
                                            "--overwrite to replace it, or another --out"):
        audit(planted["cache"], out, map="none", dup_threshold=EXACT, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written
    import pipeline.audit_page

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:  # stopped while writing its files: the earlier audit stays whole
        patched.setattr(pipeline.audit_page, "write_page", stop)
        with pytest.raises(Interrupted, match=f"so {re.escape(str(out))} holds none of them \\(an earlier audit's files "
                                              "there are untouched\\)"):
            audit(planted["cache"], out, map="none", dup_threshold=EXACT, overwrite=True, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written
    result = audit(planted["cache"], out, map="none", dup_threshold=EXACT, overwrite=True, **FAST)
    left = {p.name for p in out.iterdir()}
    assert "label_issues_flipped.csv" not in left and "notes.txt" in left  # no task's file outlives its audit
    assert left == {p.name for p in result.files.values()} | {"notes.txt"}
    assert all(p.parent == out for p in result.files.values()) and f"page: {out / 'audit.html'}" in result.lines()
    page = (out / "audit.html").read_text()
    assert "; duplicates.csv" in page and str(out) not in page  # the page names its files beside it, by name


def test_data_that_holds_none_of_the_caches_images_is_refused(planted, tmp_path):
    other = tmp_path / "other"
    make_image(other / "x.jpg", (1, 2, 3), 5)
    with pytest.raises(PipelineError, match=f"--data {other} holds none of the images of"):
        audit(planted["cache"], tmp_path / "a", data=other, map="none", **FAST)


def test_images_deleted_or_renamed_since_are_neither_audited_nor_neighbours(planted, tmp_path):
    """A row of an image the source no longer lists keeps its features (predict reuses them) but is no
    image any more: a renamed image is not its own old name's copy, a deleted one no outlier or neighbour,
    and extract says how many rows it keeps so."""
    data = Path(shutil.copytree(planted["data"], tmp_path / "shapes"))
    extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    (data / ORIGINAL).rename(data / "train/red/renamed.jpg")
    (data / ODD).unlink()
    r = run_cli("extract", data, "--backbone", TINY, "--cache", tmp_path / "cache", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "keeps the features of 2 images the source no longer lists (deleted or renamed)" in r.stderr
    assert "extracted 0," in r.stdout
    [cache] = (tmp_path / "cache").glob("*.h5")
    with FeatureCache(cache) as c:
        assert {ORIGINAL, ODD} <= set(c.ids[c.valid]) and not {ORIGINAL, ODD} & set(c.ids[c.current])
    r = run_cli("cache", "info", cache)
    assert r.returncode == 0 and ", 2 of images the source no longer lists; complete: True" in r.stdout, r.stdout
    result = audit(cache, tmp_path / "a", map="none", dup_threshold=EXACT, progress=False, **FAST)
    assert any(line.startswith("copies (") and "): 1 pair, " in line for line in result.lines())
    named = {i for d in result.duplicates for i in (d["id_a"], d["id_b"])} | {o["id"] for o in result.outliers}
    assert not {ORIGINAL, ODD} & named and len(result.outliers) == 38 - 1
    assert {"train/red/renamed.jpg", COPY} == {i for d in result.duplicates for i in (d["id_a"], d["id_b"])}
    found = neighbors(tmp_path / "cache", [data / COPY], k=40, progress=False)  # a folder holding one cache
    assert not {ORIGINAL, ODD} & {f["id"] for f in found} and found[0]["id"] == "train/red/renamed.jpg"
    fitted = fit(cache, tmp_path / "run", labels=[planted["labels"]], heads=["centroid"], progress=False)
    assert any(n.startswith(f"task 'flipped': 2 labelled image(s) have no features in {cache.name} (such as ")
               and n.endswith(" (not extracted yet, unreadable, or no longer in its source): left out") for n in fitted.notes)
    assert {ORIGINAL, ODD}.isdisjoint(RunFolder(tmp_path / "run").protocol("flipped").ids)


def test_a_file_given_twice_or_with_a_copy_of_its_bytes_in_the_cache_is_its_own_row(planted, tmp_path):
    """The same bytes twice in the cache (a file and its byte-for-byte copy) and the same query twice:
    each query is its own row, never its own neighbour, and its copy is among its nearest."""
    data = Path(shutil.copytree(planted["data"], tmp_path / "shapes"))
    shutil.copy(data / ORIGINAL, data / "train/red/dup.jpg")
    [res] = extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    for query in (data / ORIGINAL, data / "train/red/dup.jpg"):
        found = neighbors(res.cache, [query, query], k=3, progress=False)
        own = query.relative_to(data).as_posix()
        assert len(found) == 6 and own not in {f["id"] for f in found}
        other = ({ORIGINAL, "train/red/dup.jpg"} - {own}).pop()
        assert all(other in {f["id"] for f in found[s:s + 3] if f["similarity"] >= EXACT} for s in (0, 3))


def test_caches_of_two_sources_are_refused_not_read_as_backbones(planted, tmp_path):
    caches = tmp_path / "caches"
    caches.mkdir()
    shutil.copy(planted["cache"], caches)
    other = Path(shutil.copytree(planted["data"], tmp_path / "elsewhere" / "shapes"))
    extract(other, TINY, caches, name="shapes-2", workers=0, progress=False)
    with pytest.raises(PipelineError, match=r"the caches hold the images of 2 sources \(.*elsewhere/shapes\); several "
                                            "caches are read as backbones over the same images, so audit one source's"):
        audit(caches, tmp_path / "a", map="none", **FAST)
    assert not (tmp_path / "a").exists()


def test_an_audit_reading_few_rows_advises_the_bound_that_holds_small_features():
    """A tiny --max-memory over small features: the first line advises the bound under which the audit
    holds them (a new user was told a bound that reads 256 rows, under which they were held anyway)."""
    from pipeline.batched import RowChunks
    from pipeline.stages.audit import AuditConfig, _read_note

    X = RowChunks(lambda rows: np.zeros((len(rows), 32), np.float32), 500, 32, 3)
    assert _read_note(X, AuditConfig(max_memory="100KB")).endswith(
        f"so few rows per read make every pass slow: --max-memory {-(-500 * 32 * 4 * COPIES // 2 ** 20)}MB holds the "
        "features in memory")
