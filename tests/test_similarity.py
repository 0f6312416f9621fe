"""The similarity index: exact below its threshold, approximate (faiss IVF, calibrated recall) above,
and the searches built on it (knn, near-duplicate pairs, the knn head)."""

import pickle

import numpy as np
import pytest

from pipeline import similarity
from pipeline.batched import RowChunks
from pipeline.heads import CappedKNeighborsClassifier, read_head as load_head, save_head

pytestmark = pytest.mark.skipif(not similarity.faiss_available(), reason="faiss not installed")


def clustered(n=4000, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    labels = rng.integers(40, size=n)
    return similarity.normalized(centres[labels] + 0.4 * rng.normal(size=(n, dim))), labels


def test_index_is_exact_below_its_threshold_and_approximate_with_the_recall_it_promises():
    X, _ = clustered()
    rows = np.arange(0, len(X), 7)
    exact = similarity.NeighbourIndex(X, exact_below=len(X) + 1)
    approx = similarity.NeighbourIndex(X, exact_below=len(X))
    assert not exact.approximate and approx.approximate
    assert similarity.recall(exact, X[rows], 10, rows) == 1.0
    found = similarity.recall(approx, X[rows], 10, rows)
    assert similarity.TARGET_RECALL <= found < 1.0  # approximate, yet as good as calibrated
    sims, idx = approx.search(X[rows], 10, rows)
    assert (idx >= 0).all() and not (idx == rows[:, None]).any()  # always k others, never itself
    np.testing.assert_allclose(sims, np.take_along_axis(X[rows] @ X.T, idx, 1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    again = similarity.NeighbourIndex(X, exact_below=len(X)).search(X[rows], 10, rows)
    np.testing.assert_array_equal(again[1], idx)  # seeded: the same cells, the same answers


def test_many_queries_go_cell_by_cell_and_find_what_the_inverted_files_search_finds(monkeypatch):
    X, _ = clustered(6000)
    index = similarity.NeighbourIndex(X, exact_below=len(X))
    few = index.search(X[:100], 10, np.arange(100))  # fewer than 8 queries a cell: faiss's own search
    joins = []
    real = similarity.NeighbourIndex._cell_join
    monkeypatch.setattr(similarity.NeighbourIndex, "_cell_join", lambda *a: joins.append(1) or real(*a))
    sims, idx = index.search(X, 10, np.arange(len(X)))
    assert joins and index._ivf.nprobe < index._ivf.nlist
    np.testing.assert_array_equal(idx[:100], few[1])
    np.testing.assert_allclose(sims[:100], few[0], atol=1e-6)
    index._ivf.nprobe = 1  # probed cells smaller than k rows: those rows' searches are exact
    assert (index.search(X, 200, np.arange(len(X)))[1] >= 0).all()


def test_a_chunked_index_searched_cell_by_cell_finds_what_faiss_finds_in_its_bytes(monkeypatch):
    """An audit by chunks searches every image against the others cell by cell, over each cell's rows
    decoded from a byte per feature: it finds what faiss's own search of those bytes finds."""
    X, _ = clustered(6000)
    index = similarity.ChunkedIndex(lambda: (X[start:start + 1000] for start in range(0, len(X), 1000)))
    few = index.search(X[:100], 10, np.arange(100))
    joins = []
    real = similarity._cell_join
    monkeypatch.setattr(similarity, "_cell_join", lambda *a: joins.append(1) or real(*a))
    sims, idx, search = similarity.nearest_others(RowChunks(lambda rows: X[rows], len(X), X.shape[1], 2000), 10)
    assert search.startswith(f"an inverted file of {index._index.nlist} cells (a byte per feature), "
                             f"{index._index.nprobe} probed: recall@10 ")
    assert len(joins) == 3 and (idx >= 0).all() and not (idx == np.arange(len(X))[:, None]).any()
    assert (idx[:100] == few[1]).mean() > 0.99  # rounding may swap two neighbours that tie
    np.testing.assert_allclose(np.sort(sims[:100], 1), np.sort(few[0], 1), atol=1e-5)
    truth = similarity.knn(X[:500], X, 10, exclude=np.arange(500))[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx[:500], truth)]) >= similarity.TARGET_RECALL


def test_every_rows_search_compares_each_row_with_at_most_scan_rows_and_says_the_recall_it_reached(monkeypatch):
    """The audit's search of every row against the others grows linearly with the rows: where the recall
    target would need more cells than SCAN_ROWS rows, fewer are probed, and the recall reached is said."""
    X, _ = clustered(6000, dim=32)
    chunks = RowChunks(lambda rows: X[rows], len(X), X.shape[1], 2000)
    free = similarity.ChunkedIndex(lambda: (chunk for _, chunk in chunks))
    assert free.recall >= similarity.TARGET_RECALL and free._index.nprobe > 1
    cell = free._index.ntotal / free._index.nlist
    monkeypatch.setattr(similarity, "SCAN_ROWS", int(cell))  # one cell's rows: one probe
    monkeypatch.setattr(similarity, "EXACT_BELOW", 1000)  # in memory too
    for found in (similarity.nearest_others(chunks, 10), similarity.nearest_others(X, 10)):
        assert " 1 probed: recall@10 " in found.search, found.search
        assert f"below the {similarity.TARGET_RECALL} sought" in found.search
        assert (found.idx >= 0).all() and not (found.idx == np.arange(len(X))[:, None]).any()
    bound = similarity.ChunkedIndex(lambda: (chunk for _, chunk in chunks), max_scan=int(cell))
    assert bound._index.nprobe == 1 and bound.recall < free.recall
    truth = similarity.knn(X[:500], X, 10)[1]
    found = bound.search(X[:500], 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]) == pytest.approx(bound.recall, abs=0.05)
    assert pickle.loads(pickle.dumps(bound)).recall == bound.recall


def test_knn_follows_the_threshold(monkeypatch):
    X, _ = clustered(3000)
    X[2999] = X[5]  # a planted copy
    monkeypatch.setattr(similarity, "EXACT_BELOW", 1000)
    assert similarity.NeighbourIndex(X).approximate
    sims, idx = similarity.knn(X[:50], X, 5, exclude=np.arange(50))
    assert idx[5, 0] == 2999 and sims[5, 0] == pytest.approx(1.0, abs=1e-5)


def test_knn_head_searches_the_index_above_the_threshold(monkeypatch, tmp_path):
    X, y = clustered(3000)
    monkeypatch.setattr(similarity, "EXACT_BELOW", 1000)
    head = CappedKNeighborsClassifier(n_neighbors=10, metric="cosine", weights="distance").fit(X[:2500], y[:2500])
    assert head._fit_method == "similarity_index" and head._index.approximate
    monkeypatch.setattr(similarity, "EXACT_BELOW", 10**9)
    brute = CappedKNeighborsClassifier(n_neighbors=10, metric="cosine", weights="distance").fit(X[:2500], y[:2500])
    assert brute._fit_method == "brute"
    dist, idx = head.kneighbors(X[2500:])
    want_dist, want_idx = brute.kneighbors(X[2500:])
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, want_idx)]) >= similarity.TARGET_RECALL
    assert np.mean(np.isclose(dist[:, 0], want_dist[:, 0], atol=1e-4)) >= 0.98  # cosine distances, as scikit-learn's
    assert np.mean(head.predict(X[2500:]) == brute.predict(X[2500:])) >= 0.98
    assert not (head.kneighbors()[1] == np.arange(2500)[:, None]).any()  # fitted rows are not their own neighbours
    for loaded in (pickle.loads(pickle.dumps(head)), load_head(save_head(head, tmp_path / "knn.skops"))):
        assert "_index" not in vars(loaded)  # a faiss index is not saved: built again (the same) when first needed
        np.testing.assert_array_equal(loaded.predict(X[2500:]), head.predict(X[2500:]))


@pytest.mark.parametrize("exact_below", [10**9, pytest.param(20, marks=pytest.mark.slow)])
def test_knn_head_is_a_scikit_learn_estimator(exact_below, monkeypatch):
    from sklearn.utils.estimator_checks import check_estimator

    from pipeline.heads import CappedKNeighborsRegressor

    monkeypatch.setattr(similarity, "EXACT_BELOW", exact_below)  # 20: the checks' data goes through the index
    for est in (CappedKNeighborsClassifier(metric="cosine", weights="distance"), CappedKNeighborsRegressor(metric="cosine")):
        results = check_estimator(est, on_fail=None)
        assert not [r["check_name"] for r in results if r["status"] == "failed"] and len(results) >= 50


def test_knn_head_by_chunks_votes_as_the_exact_knn_from_an_index_of_bytes(tmp_path):
    """The knn of features larger than memory: filled from chunks (read twice) into an 8-bit inverted
    file, calibrated to the target recall on the rows it indexed; its votes are the exact knn's almost
    always, and the index travels with the saved head."""
    from pipeline.heads import ChunkedKNeighborsClassifier, fit_by_chunks

    X, y = clustered(4000)
    reads = []

    def chunks(epoch):
        reads.append(epoch)
        return ((X[i:i + 500], y[i:i + 500]) for i in range(0, 3500, 500))

    head = fit_by_chunks(ChunkedKNeighborsClassifier(), chunks, np.unique(y))
    assert reads == [-1, -1] and head.index_.ntotal == 3500 and head.index_._index.nlist > 1
    exact = CappedKNeighborsClassifier(n_neighbors=10, metric="cosine", weights="distance").fit(X[:3500], y[:3500])
    assert np.mean(head.predict(X[3500:]) == exact.predict(X[3500:])) >= 0.97
    np.testing.assert_allclose(head.predict_proba(X[3500:]).sum(1), 1.0)
    twin = ChunkedKNeighborsClassifier().fit(X[:3500], y[:3500])  # fit(X, y): one chunk, the same index
    np.testing.assert_array_equal(twin.predict(X[3500:]), head.predict(X[3500:]))
    travelled = pickle.loads(pickle.dumps(head))  # as from a worker: kept as bytes until it is searched
    assert "_index" not in travelled.index_.__dict__
    assert pickle.dumps(travelled) == pickle.dumps(head) and "_index" not in travelled.index_.__dict__
    for loaded in (travelled, load_head(save_head(head, tmp_path / "knn.skops"))):
        np.testing.assert_array_equal(loaded.predict_proba(X[3500:]), head.predict_proba(X[3500:]))


def test_knn_head_by_chunks_is_a_scikit_learn_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    from pipeline.heads import ChunkedKNeighborsClassifier

    results = check_estimator(ChunkedKNeighborsClassifier(), on_fail=None)
    assert not [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"] and len(results) >= 40
