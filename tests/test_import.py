"""`pipeline cache import`: caches from embeddings made elsewhere (parquet as clip-retrieval writes it, or a
.npy array with its ids), what fit, audit and predict do with them, and bad inputs refused with nothing
left behind."""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import make_image
from pipeline import FeatureCache, PipelineError, audit, fit, import_embeddings, predict, read_labels
from pipeline.stages.neighbors import neighbors

N, D = 60, 16


@pytest.fixture(scope="module")
def data() -> dict:
    """Two separable classes of N embeddings, a train/val split and tags."""
    rng = np.random.default_rng(0)
    y = np.array(["cat", "dog"])[np.arange(N) % 2]
    X = rng.normal(size=(N, D)).astype(np.float32)
    X[y == "cat", :4] += 3.0
    return dict(ids=[f"img/{i:03d}" for i in range(N)], X=X, y=y, split=np.where(np.arange(N) < 40, "train", "val"),
                tags=[["x", "y"] if i % 3 else ["x"] for i in range(N)])


def table(d: dict, rows: slice = slice(None), **columns) -> pa.Table:
    base = {"id": d["ids"][rows], "embedding": [list(map(float, r)) for r in d["X"][rows]],
            "label": list(d["y"][rows]), "split": list(d["split"][rows])}
    return pa.table({**base, **columns})


def write_npy(tmp: Path, d: dict, labelled: bool = True) -> tuple[Path, Path]:
    np.save(tmp / "emb.npy", d["X"])
    if labelled:
        ids = tmp / "ids.csv"
        ids.write_text("id,label,split\n" + "".join(f"{i},{y},{s}\n" for i, y, s in zip(d["ids"], d["y"], d["split"])))
    else:
        ids = tmp / "ids.txt"
        ids.write_text("\n".join(d["ids"]) + "\n")
    return tmp / "emb.npy", ids


def accuracies(run: Path, cache: Path) -> dict[str, float]:
    rows = fit(cache, run, heads=["logreg", "knn", "ridge"], n_jobs=1, progress=False).rows
    return {r.head: r.metrics["accuracy"] for r in rows}


def test_parquet_row_groups_a_folder_and_npy_give_the_same_cache_and_leaderboard(tmp_path, data):
    pq.write_table(table(data, labels=data["tags"]), tmp_path / "emb.parquet", row_group_size=16)
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table(data, slice(0, 25)), folder / "a.parquet", row_group_size=10)
    pq.write_table(table(data, slice(25, None)), folder / "b.parquet", row_group_size=10)
    npy, ids = write_npy(tmp_path, data)

    one = import_embeddings(tmp_path / "emb.parquet", tmp_path / "out", chunk_rows=7)
    two = import_embeddings(folder, tmp_path / "out", chunk_rows=7)
    arr = import_embeddings(npy, tmp_path / "out", ids, name="clip", chunk_rows=7)

    assert (one.rows, one.dims, one.labelled) == (N, D, N)
    for result in (one, two, arr):
        with FeatureCache(result.cache) as c:
            assert list(c.ids) == data["ids"] and list(c.labels) == list(data["y"]) and list(c.splits) == list(data["split"])
            assert c.valid.all() and c.attrs["complete"]
            np.testing.assert_array_equal(c.features("pooled"), data["X"].astype(np.float16).astype(np.float32))
            assert c.content_hash[3] == hashlib.sha256(b"img/003").digest()
            assert (c.spec.source, c.spec.data_config, c.spec.dtype) == ("imported", {}, "float16")
    with FeatureCache(one.cache) as c:
        assert c.spec.backbone == "imported:emb"
        assert c.spec.weights_sha256 == hashlib.sha256((tmp_path / "emb.parquet").read_bytes()).hexdigest()
    with FeatureCache(arr.cache) as c:
        assert c.spec.backbone == "imported:clip"
        assert c.spec.weights_sha256 == hashlib.sha256(npy.read_bytes() + ids.read_bytes()).hexdigest()
    assert len({one.cache, two.cache, arr.cache}) == 3  # other bytes, other spec keys

    # the tags column, not the cache's own task, is a label file beside the cache
    assert [p.name for p in one.label_files] == [one.cache.stem + ".labels.csv"]
    tags = read_labels(one.label_files[0])
    assert tags.kind == "multilabel" and list(tags.ids) == data["ids"] and list(tags.splits) == list(data["split"])

    parquet_acc = accuracies(tmp_path / "run_parquet", one.cache)
    assert set(parquet_acc) == {"logreg", "knn", "ridge"} and parquet_acc["logreg"] > 0.8
    assert accuracies(tmp_path / "run_npy", arr.cache) == parquet_acc


def test_float32_target_and_plain_ids(tmp_path, data):
    pq.write_table(table(data, target=[float(i) / 10 for i in range(N)]).drop(["label"]), tmp_path / "t.parquet")
    result = import_embeddings(tmp_path / "t.parquet", tmp_path / "out", dtype="float32")
    with FeatureCache(result.cache) as c:
        assert c.attrs["label_kind"] == "regression" and c.labels[12] == "1.2" and c.spec.dtype == "float32"
        np.testing.assert_array_equal(c.features("pooled"), data["X"])
    npy, ids = write_npy(tmp_path, data, labelled=False)
    plain = import_embeddings(npy, tmp_path / "out", ids)
    with FeatureCache(plain.cache) as c:
        assert list(c.ids) == data["ids"] and (c.labels == "").all() and plain.labelled == 0


def test_audit_works_and_predict_and_neighbors_refuse_new_images(tmp_path, data):
    pq.write_table(table(data), tmp_path / "emb.parquet")
    cache = import_embeddings(tmp_path / "emb.parquet", tmp_path / "out").cache
    found = audit(cache, tmp_path / "audit", map="none")
    assert len(found.outliers) == N and found.tasks[0].protocol.eval == "val"
    run = tmp_path / "run"
    fit(cache, run, heads=["logreg"], n_jobs=1, progress=False)
    image = make_image(tmp_path / "new.jpg", (200, 40, 40), 0)
    for call in (lambda: predict(run, [image], progress=False), lambda: neighbors(cache, [image], progress=False)):
        with pytest.raises(PipelineError, match=r"imported from .*emb\.parquet: no backbone to run on new images"):
            call()


def test_cli_prints_the_summary(tmp_path, data):
    from cli import app

    pq.write_table(table(data), tmp_path / "emb.parquet")
    done = CliRunner().invoke(app, ["cache", "import", str(tmp_path / "emb.parquet"), "--out", str(tmp_path / "out"),
                                    "--name", "clip-b32"])
    assert done.exit_code == 0, done.output
    assert f"imported {N} rows x {D} dims, {N} labelled" in done.output
    assert "emb__imported_clip-b32__" in done.output


def _ragged(d: dict, at: int) -> pa.Table:
    emb = [list(map(float, r)) for r in d["X"]]
    emb[at] = emb[at][:-1]
    return table(d).set_column(1, "embedding", pa.array(emb))


def _nan(d: dict) -> pa.Table:
    X = d["X"].copy()
    X[33, 4] = np.nan
    return table({**d, "X": X})


BAD = {
    "no id column": (lambda d: table(d).drop(["id"]), r"missing column\(s\) id;"),
    "no embedding column": (lambda d: table(d).drop(["embedding"]), r"missing column\(s\) embedding;"),
    "ragged in the first chunk": (lambda d: _ragged(d, 5), "rows differ in length: id 'img/005' has 15 values"),
    "ragged in a later chunk": (lambda d: _ragged(d, 50), "rows differ in length: id 'img/050' has 15 values"),
    "NaN": (_nan, "the embedding of id 'img/033' has NaN or infinite values"),
    "beyond float16": (lambda d: table({**d, "X": d["X"] * 1e5}), "beyond the range of float16"),
    "duplicate id": (lambda d: table({**d, "ids": d["ids"][:7] + ["img/002"] + d["ids"][8:]}),
                     r"duplicate id 'img/002' \(rows 2 and 7\)"),
    "bad split": (lambda d: table({**d, "split": np.where(d["split"] == "val", "valid", "train")}), "split must be one of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_parquet_is_refused_with_nothing_left(tmp_path, data, case):
    make, message = BAD[case]
    pq.write_table(make(data), tmp_path / "emb.parquet", row_group_size=16)
    with pytest.raises(PipelineError, match=message):
        import_embeddings(tmp_path / "emb.parquet", tmp_path / "out", chunk_rows=16)
    assert not (tmp_path / "out").exists()


def test_bad_npy_inputs_are_refused(tmp_path, data):
    npy, ids = write_npy(tmp_path, data, labelled=False)
    with pytest.raises(PipelineError, match=r"give its ids with --ids FILE"):
        import_embeddings(npy, tmp_path / "out")
    short = tmp_path / "short.txt"
    short.write_text("\n".join(data["ids"][:-1]))
    with pytest.raises(PipelineError, match=rf"{N - 1} ids for the {N} rows"):
        import_embeddings(npy, tmp_path / "out", short)
    np.save(tmp_path / "flat.npy", data["X"].ravel())
    with pytest.raises(PipelineError, match=r"shape \(960,\)"):
        import_embeddings(tmp_path / "flat.npy", tmp_path / "out", ids)
    assert not (tmp_path / "out").exists()


def test_an_existing_cache_is_refused_unless_overwrite(tmp_path, data):
    pq.write_table(table(data), tmp_path / "emb.parquet")
    first = import_embeddings(tmp_path / "emb.parquet", tmp_path / "out")
    before = first.cache.stat().st_mtime_ns
    with pytest.raises(PipelineError, match=r"exists .*pass --overwrite"):
        import_embeddings(tmp_path / "emb.parquet", tmp_path / "out")
    assert first.cache.stat().st_mtime_ns == before
    again = import_embeddings(tmp_path / "emb.parquet", tmp_path / "out", overwrite=True)
    assert again.cache == first.cache and again.cache.stat().st_mtime_ns != before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [first.cache.name]  # no lock file left


def test_independent_embeddings_have_no_copies_and_disjoint_imports_are_named(tmp_path, data):
    """The embeddings alone call a pair a copy only above EMBEDDING_FLOOR: noise has no copies, a row
    repeated with a little noise is one. Other embeddings under a name the folder holds are refused (their
    rows could not be told apart); two imports of other ids in one folder are refused by fit, once."""
    from pipeline.copies import find_copies
    from pipeline.similarity import normalized

    rng = np.random.default_rng(1)
    X = rng.normal(size=(3000, 64)).astype(np.float32)
    ids = np.array([f"n{i}" for i in range(len(X))], dtype=object)
    assert find_copies(normalized(X), ids, None).confirmed.sum() == 0
    X[1] = X[0] + 0.05 * rng.normal(size=64).astype(np.float32)
    found = find_copies(normalized(X), ids, None)
    assert [(int(a), int(b)) for a, b in zip(found.i[found.confirmed], found.j[found.confirmed])] == [(0, 1)]
    for name, rows in (("a", slice(0, 30)), ("b", slice(30, 60))):
        (tmp_path / name).mkdir()
        pq.write_table(table(data, rows), tmp_path / name / "emb.parquet")
    import_embeddings(tmp_path / "a" / "emb.parquet", tmp_path / "caches")
    with pytest.raises(PipelineError, match=r"holds other embeddings named 'emb' \(from .*a/emb.parquet\); give these"):
        import_embeddings(tmp_path / "b" / "emb.parquet", tmp_path / "caches")
    assert len(list((tmp_path / "caches").iterdir())) == 1
    import_embeddings(tmp_path / "b" / "emb.parquet", tmp_path / "caches", name="emb-b")
    with pytest.raises(PipelineError, match="no labelled image has features in every one of its caches"):
        fit(tmp_path / "caches", tmp_path / "run", heads=["ridge"], n_jobs=1, progress=False)


def test_images_left_out_by_overlapping_caches_or_an_unused_split_are_said(tmp_path, data):
    """Two caches that share only some images are fitted on the shared ones, and fit says how many it left
    out; so it does for labelled images in neither train nor the scored split."""
    for name, rows in (("a", slice(0, 50)), ("b", slice(10, 60))):
        (tmp_path / name).mkdir()
        pq.write_table(table(data, rows), tmp_path / name / "emb.parquet")
        import_embeddings(tmp_path / name / "emb.parquet", tmp_path / "caches", name=f"emb-{name}")
    result = fit(tmp_path / "caches", tmp_path / "run", heads=["ridge"], n_jobs=1, progress=False)
    assert [(r.n_train, r.n_test) for r in result.rows] == [(30, 10)] * 2
    assert sum("20 labelled image(s) have features in some of its caches but not in every one" in n
               for n in result.notes) == 1
    labels = tmp_path / "labels.csv"
    split = ["train"] * 30 + [""] * 5 + ["test"] * 3 + ["val"] * 22
    labels.write_text("id,label,split\n" + "".join(f"{i},{y},{s}\n" for i, y, s in zip(data["ids"], data["y"], split)))
    pq.write_table(table(data), tmp_path / "all.parquet")
    whole = import_embeddings(tmp_path / "all.parquet", tmp_path / "whole").cache
    result = fit(whole, tmp_path / "run2", labels=[labels], heads=["ridge"], n_jobs=1, progress=False)
    said = "task 'labels': 8 labelled image(s) in neither train nor val (5 with no split, 3 in split 'test'): left out"
    assert any(said in n for n in result.notes), result.notes
    assert any(said in n for n in json.loads((tmp_path / "run2" / "run.json").read_text())[-1]["notes"])
    assert f"<li>note: {html.escape(said)}" in (tmp_path / "run2" / "report.html").read_text()
    found = audit(whole, tmp_path / "audit", labels=[labels], map="none")
    assert any("8 labelled image(s) in neither train nor val" in t.note for t in found.tasks)
    no_train = tmp_path / "no_train.csv"
    no_train.write_text("id,label,split\n" + "".join(f"{i},{y},{'test' if k < 20 else 'val'}\n"
                                                      for k, (i, y) in enumerate(zip(data["ids"], data["y"]))))
    result = fit(whole, tmp_path / "run3", labels=[no_train], heads=["ridge"], n_jobs=1, progress=False)
    assert "task 'no_train': its splits ('test', 'val') have no train rows, so they are not used: it is " \
           "cross-validated over all its 60 labelled images, each trained on in the other folds" in result.notes
    assert {r.eval for r in result.rows if r.task == "no_train"} == {"cv5"}


def test_caches_whose_own_labels_differ_are_fitted_on_a_label_file_of_the_task_s_name(tmp_path, data):
    """Two imports of the same images whose label columns disagree: fit says which id differs and how to
    go on, and a label file named as the task replaces the caches' own labels."""
    flipped = dict(data, y=np.where(data["y"] == "cat", "dog", "cat"))
    for name, d in (("a", data), ("b", flipped)):
        (tmp_path / name).mkdir()
        pq.write_table(table(d), tmp_path / name / "emb.parquet")
        import_embeddings(tmp_path / name / "emb.parquet", tmp_path / "caches", name=f"emb-{name}")
    with pytest.raises(PipelineError, match=re.escape("task 'emb' labels 'img/000' differently in two caches; give its "
                                                      "labels as a label file named emb.csv (--labels emb.csv)")):
        fit(tmp_path / "caches", tmp_path / "run", heads=["ridge"], n_jobs=1, progress=False)
    (tmp_path / "emb.csv").write_text("id,label\n" + "".join(f"{i},{y}\n" for i, y in zip(data["ids"], data["y"])))
    result = fit(tmp_path / "caches", tmp_path / "run", labels=[tmp_path / "emb.csv"], heads=["ridge"], n_jobs=1,
                 progress=False)
    assert {r.task for r in result.rows} == {"emb"} and len(result.rows) == 2  # a row per cache
    assert all(r.score > 0.9 for r in result.rows)


def test_features_of_rows_in_any_order_dense_or_sparse_are_those_rows(tmp_path, data):
    """Rows asked for close together are read as one slab, rows far apart one by one: the same rows either
    way, in the order asked, a row asked twice given twice."""
    pq.write_table(table(data), tmp_path / "emb.parquet")
    cache = import_embeddings(tmp_path / "emb.parquet", tmp_path / "caches").cache
    with FeatureCache(cache) as c:
        whole = c.features("pooled")
        for rows in ([7, 3, 3, 5, 4, 6], [0, 59], [59, 0, 30, 30], list(range(10, 40))[::-1]):
            assert np.array_equal(c.features("pooled", np.array(rows)), whole[rows])
