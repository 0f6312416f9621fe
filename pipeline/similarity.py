"""Cosine similarity over cached features: the nearest neighbours every stage searches (``neighbors``,
the knn head, audit's outliers and copy candidates, predict's out-of-distribution score).

Features are L2-normalised once, so cosine similarity is a dot product. Every search goes through one
owner, :class:`NeighbourIndex`, built once per base and searched as often as needed: exact below
:data:`EXACT_BELOW` rows (faiss's exact inner-product search, or numpy blocks of ``block`` x ``block``
similarities without faiss), approximate from there, so nothing is quadratic in the number of rows by
default.

The approximate index is faiss's inverted file (``IndexIVFFlat``, inner product, ``nlist`` = 2 sqrt(n)
cells): k-means cells, and a query compares itself with the rows of the ``nprobe`` cells nearest to it.
``nprobe`` is not guessed: the build doubles it until the recall@10 against exact search, measured on a
seeded sample of the base's own rows (:func:`recall`), reaches :data:`TARGET_RECALL`; where that takes more
than a quarter of the cells (features with no neighbourhoods to speak of), the index stays exact, as it
would be no faster. Measured with ``benchmarks/ann_index.py`` (AMD EPYC, 2 cores shared with other jobs, so
absolute times are high; generated clustered features, 1,000 clusters; per query, k=10):

    rows x dim     exact ms   IVF ms  nlist nprobe recall@10  IVF build
    20,000 x 128     1.01      1.30     512   256    0.951       8 s   (exact wins)
    100,000 x 128    6.84      0.082   1265     2    0.992      54 s   (4 sqrt(n) cells then)
    10^6 x 128     122.6       0.447   2000     2    0.964     190 s   (a self-search: 447 s, not 34 h)
    50,000 x 512     8.1      45.6      447   447    1.000      47 s   (-> exact)
    200,000 x 512   34.1      41.5      894   256    0.959     116 s   (-> exact)

A search of many queries (an audit's every image against every other) goes cell by cell instead
(:meth:`NeighbourIndex._cell_join`): the same rows compared, as matrix products. On 10^6 x 512 generated
rows with 100 classes (``benchmarks/scale.py``'s), ``nprobe`` 16 of 2,000 cells gave recall@10 0.999 at
0.38 ms a query, against 4.5 ms exact; 200,000 of its queries took 77.8 s query by query and 21.6 s cell
by cell. Each cell's queries go through faiss's exact search (``faiss.knn``: BLAS products, each query's
best kept on every core): on 10^6 x 128 rows in an index of a byte per feature, 0.096 ms a query, where
numpy's products ranked by ``argpartition`` took 0.40. A whole base against itself
(:func:`nearest_others`) compares each row with at most :data:`SCAN_ROWS` others, so it grows linearly;
where the recall target would need more (rows without fine neighbourhoods, many of them), it says the
recall it reached instead. IVF
was chosen over HNSW (``IndexHNSWFlat``, M=32): HNSW's build of 200,000 x 512 had not finished after
4 minutes where IVF's took 82 s, and HNSW's threaded insertion builds a different graph each run, where
seeded k-means makes IVF's answers reproducible.

Rows that do not fit in memory go into :class:`ChunkedIndex` instead: the same inverted file and
calibration, built from chunks of rows, each row kept as a byte per feature (faiss's 8-bit scalar
quantizer: a quarter of float32).

What counts as a copy is decided in :mod:`pipeline.copies`, from this index's candidates and the images.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from .batched import RowChunks

BLOCK = 2048
# Where exact search stops being cheap (the table above): at 20,000 rows exact search beats the index, at
# 100,000 it costs 80x more per query; searching 50,000 x 512 against itself exactly took 400 s there.
EXACT_BELOW = 50_000
TARGET_RECALL = 0.95
JOIN_QUERIES_PER_CELL = 8  # searches of at least this many queries per cell go cell by cell (_cell_join)
RECALL_QUERIES = 500  # the sample nprobe is calibrated on: recall's standard error about 0.3 %
# An every-row search (nearest_others: the audit's) compares each row with at most this many others, so it
# grows linearly with the rows: where the recall target needs more probed cells than that, the search
# probes fewer and says the recall it reached. At 10^6 x 128 generated rows (scale.py's) the target needs
# 32 cells of 500 rows, 16,000, so the bound first binds above that.
SCAN_ROWS = 2 ** 14


def normalized(X: np.ndarray, copy: bool = True) -> np.ndarray:
    """Rows scaled to unit length as float32 (an all-zero row stays zero); without ``copy``, a float32
    ``X`` is scaled in place (a matrix read for this alone is then never held twice)."""
    X = np.array(X, dtype=np.float32) if copy else np.asarray(X, dtype=np.float32)
    norms = np.empty((len(X), 1), np.float32)
    for start in range(0, len(X), 2 ** 16):  # by blocks: no squared copy of the whole matrix
        norms[start:start + 2 ** 16, 0] = np.linalg.norm(X[start:start + 2 ** 16], axis=1)
    X /= np.where(norms > 0, norms, 1.0)
    return X


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class NeighbourIndex:
    """The rows of ``base`` (normalised) most cosine-similar to any query: exact below ``exact_below`` rows
    (:data:`EXACT_BELOW` when None), faiss IVF from there, with ``nprobe`` raised until recall@10 reaches
    ``target_recall``, or until a query would compare itself with more than ``max_scan`` rows (None: no
    bound); ``recall`` is what the calibration sample reached (None when exact). ``seed`` fixes the
    k-means cells and the calibration sample; ``n_jobs`` the threads faiss uses (all cores when None)."""

    def __init__(self, base: np.ndarray, exact_below: int | None = None, target_recall: float = TARGET_RECALL,
                 block: int = BLOCK, seed: int = 0, n_jobs: int | None = None, max_scan: int | None = None):
        self.base = np.ascontiguousarray(base, np.float32)
        self.block, self.n_jobs, self.target_recall, self.max_scan = block, n_jobs, target_recall, max_scan
        self.approximate = self.approximates(len(self.base), exact_below)
        self._ivf, self.recall = None, None
        if self.approximate:
            with _threads(n_jobs):
                self._ivf = _ivf_index(self.base, seed)
            sample = _sample(len(self.base), seed)
            truth = self.search(self.base[sample], 10, sample, exact=True)[1]
            self.recall = _calibrate(self._ivf, lambda: self.search(self.base[sample], 10, sample)[1], truth,
                                     target_recall, max_scan)
            if self._ivf.nprobe > self._ivf.nlist // 4:  # features without neighbourhoods: no cheaper than exact
                self.approximate, self._ivf, self.recall = False, None, None

    @staticmethod
    def approximates(rows: int, exact_below: int | None = None) -> bool:
        """Whether an index of ``rows`` rows searches approximately."""
        return rows >= (EXACT_BELOW if exact_below is None else exact_below)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
               exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows of the base most similar to each (normalised) query, most similar first:
        (similarities, indices), both ``(len(queries), k)``; ``-1`` indices and NaN similarities where
        ``base`` has fewer rows. ``exclude[i]`` is a row query ``i`` may not get (itself), or -1. ``exact``
        searches exactly whatever the base's size (the reference :func:`recall` measures against)."""
        queries = np.ascontiguousarray(queries, np.float32)
        k_eff = min(k + (exclude is not None), len(self.base))
        found = self._search(queries, k_eff, exact) if k_eff else _empty(len(queries))
        return _excluding(*found, exclude, k)

    def _search(self, queries: np.ndarray, k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        with _threads(self.n_jobs):
            if self.approximate and not exact:
                sims, idx = (self._cell_join(queries, k) if len(queries) >= JOIN_QUERIES_PER_CELL * self._ivf.nlist
                             else self._ivf.search(queries, k))
                short = (idx < 0).any(axis=1)  # the probed cells held fewer than k rows: those few, exactly
                if short.any():
                    sims[short], idx[short] = self._search(queries[short], k, exact=True)
                return sims, idx
            if faiss_available():
                import faiss

                return faiss.knn(queries, self.base, k, metric=faiss.METRIC_INNER_PRODUCT)
            return _numpy_knn(queries, self.base, k, self.block)

    def _cell_join(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return _cell_join(self._ivf, queries, k, lambda cell, rows: self.base[rows])

    def describe(self) -> str:
        """How the index searches, in words (:func:`describe_search`)."""
        return describe_search(self._ivf, self.recall, "float32 features", self.target_recall, self.max_scan)


class ChunkedIndex:
    """The rows most cosine-similar to a query, for a base read in chunks that never sits in memory whole.
    ``chunks()`` yields the base's rows (normalised, float32) in the same order each time it is called; it
    is read twice. The first chunks, up to ``sample_values`` numbers, train the k-means cells (2 sqrt(n),
    as :class:`NeighbourIndex`) and the 8-bit quantizer; the second read adds every row and finds the exact
    10 nearest rows of a seeded sample of :data:`RECALL_QUERIES` rows, against which ``nprobe`` is raised
    until recall@10 reaches ``target_recall`` or a query would compare itself with more than ``max_scan``
    rows (None: no bound); ``recall`` is what the sample reached. Pickles as faiss's own bytes."""

    def __init__(self, chunks: Callable[[], Iterable[np.ndarray]], seed: int = 0,
                 target_recall: float = TARGET_RECALL, sample_values: int = 2 ** 24, max_scan: int | None = None):
        import faiss

        self.target_recall, self.max_scan = target_recall, max_scan
        sample, n = _first_rows(chunks(), sample_values)
        d = sample.shape[1]
        nlist = max(1, min(round(2 * np.sqrt(n)), len(sample) // 39))
        self._index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                    faiss.METRIC_INNER_PRODUCT)
        self._index.cp.seed, self._index.cp.niter, self._index.cp.min_points_per_centroid = seed, 10, 1
        self._index.train(sample)
        queries = sample[_sample(len(sample), seed)]
        truth = _Top(len(queries), 11)
        for chunk in chunks():
            chunk = np.ascontiguousarray(chunk, np.float32)
            sims, at = faiss.knn(queries, chunk, min(11, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            truth.add(slice(None), sims, at + self._index.ntotal)
            self._index.add(chunk)
        truth = truth.result()[1]
        self.recall = _calibrate(self._index, lambda: self._index.search(queries, 11)[1], truth, target_recall, max_scan)

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    @property
    def dims(self) -> int:
        return self._index.d

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
               cell_by_cell: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`NeighbourIndex.search`: (similarities, indices), most similar first; a query whose
        probed cells held fewer than ``k`` rows searches every cell. ``cell_by_cell``: the same search as
        matrix products over each cell's decoded rows (:func:`_cell_join`), for many queries at once (an
        audit's every image); its similarities differ from faiss's in the last bits, so a head never
        takes it (its predictions would then depend on how many rows it is given at once)."""
        queries = np.ascontiguousarray(queries, np.float32)
        k_eff = min(k + (exclude is not None), self.ntotal)
        if not k_eff:
            return _excluding(*_empty(len(queries)), exclude, k)
        if cell_by_cell:
            sims, idx = _cell_join(self._index, queries, k_eff, self._decoded)
        else:
            sims, idx = self._index.search(queries, k_eff)
        short = (idx < 0).any(axis=1)
        if short.any():
            nprobe, self._index.nprobe = self._index.nprobe, self._index.nlist
            sims[short], idx[short] = self._index.search(queries[short], k_eff)
            self._index.nprobe = nprobe
        sims[idx < 0] = np.nan
        return _excluding(sims, idx, exclude, k)

    def _decoded(self, cell: int, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` of ``cell`` as the index holds them (a byte per feature), back as float32."""
        import faiss

        ivf = self._index
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(cell), len(rows) * ivf.code_size)
        vectors = ivf.sq.decode(codes.reshape(len(rows), ivf.code_size))
        return vectors + ivf.quantizer.reconstruct(cell) if ivf.by_residual else vectors

    def describe(self) -> str:
        """How the index searches, in words (:func:`describe_search`)."""
        return describe_search(self._index, self.recall, "a byte per feature", self.target_recall, self.max_scan)

    def write(self, path: str | os.PathLike) -> None:
        """faiss's file of the index, written from it as it is (never a second copy in memory)."""
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ChunkedIndex":
        """The index :meth:`write` wrote."""
        import faiss

        index = cls.__new__(cls)
        index._index, index.recall, index.target_recall, index.max_scan = faiss.read_index(str(path)), None, TARGET_RECALL, None
        return index

    @cached_property
    def _index(self):
        """faiss's index, rebuilt from its saved bytes at first use: a head that only travels from a
        worker to be saved never holds both."""
        import faiss

        return faiss.deserialize_index(self.__dict__.pop("_saved"))

    def __getstate__(self) -> dict:
        import faiss

        return dict(index=self.__dict__["_saved"] if "_saved" in self.__dict__ else faiss.serialize_index(self._index),
                    recall=self.recall, target_recall=self.target_recall, max_scan=self.max_scan)

    def __setstate__(self, state: dict) -> None:
        self._saved, self.recall = np.asarray(state["index"], np.uint8), state.get("recall")
        self.target_recall, self.max_scan = state.get("target_recall", TARGET_RECALL), state.get("max_scan")


class _Top:
    """The ``k`` most similar base rows of each of ``n`` queries, kept as blocks of their similarities go
    by (``add``), most similar first at the end (``result``)."""

    def __init__(self, n: int, k: int):
        self.k = k
        self.sims = np.full((n, k), -np.inf, np.float32)
        self.idx = np.full((n, k), -1, np.int64)

    def add(self, queries: np.ndarray | slice, sims: np.ndarray, rows: np.ndarray) -> None:
        """Merge ``sims``: a row per query of ``queries`` (positions), a column per base row of ``rows``
        (the same for every query, or a row of its own per query)."""
        both = np.concatenate([self.sims[queries], sims], axis=1)
        idx = np.concatenate([self.idx[queries], np.broadcast_to(rows, sims.shape)], axis=1)
        top = np.argpartition(-both, self.k - 1, axis=1)[:, :self.k]
        self.sims[queries], self.idx[queries] = np.take_along_axis(both, top, 1), np.take_along_axis(idx, top, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-self.sims, axis=1, kind="stable")
        return np.take_along_axis(self.sims, order, 1), np.take_along_axis(self.idx, order, 1)


def _first_rows(chunks: Iterable[np.ndarray], values: int) -> tuple[np.ndarray, int]:
    """The first rows of the chunks, up to ``values`` numbers (at least one chunk), and how many rows there are."""
    kept, held, n = [], 0, 0
    for chunk in chunks:
        n += len(chunk)
        if not kept or held + chunk.size <= values:
            kept.append(np.asarray(chunk, np.float32))
            held += chunk.size
    return np.ascontiguousarray(np.concatenate(kept)), n


def _calibrate(ivf, found: Callable[[], np.ndarray], truth: np.ndarray, target: float,
               max_scan: int | None) -> float:
    """Set ``ivf.nprobe`` to the smallest power of two (or all the cells) whose search (``found()``: the
    sample's neighbours) reaches recall ``target`` against ``truth``, at most the cells of ``max_scan``
    rows; return the recall reached."""
    most = ivf.nlist if max_scan is None else max(1, min(ivf.nlist, max_scan * ivf.nlist // max(1, ivf.ntotal)))
    for nprobe in sorted({int(p) for p in 2 ** np.arange(int(np.log2(most)) + 1)} | {most}):
        ivf.nprobe = nprobe
        reached = _recall(found(), truth)
        if reached >= target:
            break
    return reached


def describe_search(ivf, recall: float | None, held: str, target: float, max_scan: int | None) -> str:
    """``an inverted file of 6325 cells (a byte per feature), 8 probed: recall@10 0.812 on 500 rows``
    (``exact`` where ``ivf`` is None), and where the calibration stopped at ``max_scan`` rows short of
    ``target``, that it did."""
    if ivf is None:
        return "exact"
    bound = (f" (below the {target} sought: more probed cells would compare each row with more than "
             f"{max_scan} others)") if recall < target and ivf.nprobe < ivf.nlist else ""
    return (f"an inverted file of {ivf.nlist} cell{'s' * (ivf.nlist != 1)} ({held}), {ivf.nprobe} probed: "
            f"recall@10 {recall:.3f} on {min(ivf.ntotal, RECALL_QUERIES)} rows{bound}")


def recall(index: NeighbourIndex, queries: np.ndarray, k: int = 10, exclude: np.ndarray | None = None) -> float:
    """The fraction of each query's exact ``k`` nearest rows that ``index`` finds (recall@k), averaged
    over ``queries``: 1.0 for an exact index."""
    return _recall(index.search(queries, k, exclude)[1], index.search(queries, k, exclude, exact=True)[1])


def knn(queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
        block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``base`` most cosine-similar to each query, most similar first: (similarities,
    indices), both ``(len(queries), k)``; ``-1`` indices where ``base`` has fewer rows. Inputs are
    normalised rows. ``exclude[i]`` is a row of ``base`` that query ``i`` may not get (itself), or -1.
    One search: to search a base more than once, build a :class:`NeighbourIndex` and keep it."""
    return NeighbourIndex(base, block=block).search(queries, k, exclude)


class Nearest(NamedTuple):
    """Every row's nearest others, as :func:`knn` gives them (``sims``, ``idx``), and how they were
    found (``search``: :func:`describe_search`)."""

    sims: np.ndarray
    idx: np.ndarray
    search: str


def nearest_others(X: np.ndarray | RowChunks, k: int, block: int = BLOCK) -> Nearest:
    """Every row's ``k`` nearest other rows of normalised features ``X``, each row compared with at most
    :data:`SCAN_ROWS` others; for rows read by chunks (:class:`~pipeline.batched.RowChunks`, too many to
    hold) from a :class:`ChunkedIndex` of them, searched a chunk of queries at a time."""
    from .batched import RowChunks

    if not isinstance(X, RowChunks):
        index = NeighbourIndex(X, block=block, max_scan=SCAN_ROWS)
        return Nearest(*index.search(X, k, np.arange(len(X))), index.describe())
    index = ChunkedIndex(lambda: (chunk for _, chunk in X), max_scan=SCAN_ROWS)
    sims, idx = np.empty((len(X), k), np.float32), np.empty((len(X), k), np.int64)  # filled: never a second copy
    for where, chunk in X:
        sims[where], idx[where] = index.search(chunk, k, np.arange(where.start, where.stop), cell_by_cell=True)
    return Nearest(sims, idx, index.describe())


def _cell_join(ivf, queries: np.ndarray, k: int,
               vectors: Callable[[int, np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What the inverted file ``ivf``'s search finds (each query against the rows of its ``nprobe``
    nearest cells), cell by cell: every query that probes a cell against its rows (``vectors(cell,
    rows)``) in faiss's exact search (matrix products, each query's best kept on all cores), some 4x
    faster than faiss scans them query by query (200,000 of 10^6 x 512 rows, ``nprobe`` 16: 21.6 s
    against 77.8 s, 2-core AMD EPYC), and 3.3x faster than numpy's products ranked by ``argpartition``
    (65,536 of 10^6 x 128 rows, ``nprobe`` 32: 10.2 s against 33.4 s)."""
    import faiss

    bounds, asking = _probers(ivf, queries)
    top = _Top(len(queries), k)
    for cell in range(ivf.nlist):
        rows, asked = _cell_rows(ivf, cell), asking[bounds[cell]:bounds[cell + 1]]
        if not len(rows) or not len(asked):
            continue
        sims, at = faiss.knn(np.ascontiguousarray(queries[asked]), np.ascontiguousarray(vectors(cell, rows)),
                             min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
        top.add(asked, sims, rows[at])
    return top.result()


def _probers(ivf, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The queries that probe each cell of ``ivf``: those of cell ``c`` are ``asking[bounds[c]:bounds[c + 1]]``."""
    probes = ivf.quantizer.search(queries, ivf.nprobe)[1].ravel()
    asking = np.argsort(probes, kind="stable")
    bounds = np.searchsorted(probes[asking], np.arange(ivf.nlist + 1))
    asking //= ivf.nprobe  # an entry's query
    return bounds, asking


def _cell_rows(ivf, cell: int) -> np.ndarray:
    """The base rows an inverted file holds in ``cell``."""
    import faiss

    size = ivf.invlists.list_size(cell)
    return faiss.rev_swig_ptr(ivf.invlists.get_ids(cell), size).copy() if size else np.zeros(0, np.int64)


def _ivf_index(base: np.ndarray, seed: int):
    """An inverted file of 2 sqrt(n) k-means cells, the k-means on a seeded sample of 39 rows a cell
    (faiss's minimum), 10 iterations. k-means costs nlist^2 and a search nlist + nprobe n / nlist, so
    2 sqrt(n) cells, not 4: a whole base searched against itself costs about the same, the build 4x less."""
    import faiss

    n, dim = base.shape
    nlist = max(1, min(round(2 * np.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.max_points_per_centroid = seed, 10, 39
    index.train(base)
    index.add(base)
    return index


@contextmanager
def _threads(n_jobs: int | None) -> Iterator[None]:
    """faiss's OpenMP threads limited to ``n_jobs`` (-1: all cores) for the duration."""
    if n_jobs is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads((os.cpu_count() or 1) if n_jobs < 0 else n_jobs)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _sample(n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(n, RECALL_QUERIES), replace=False))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(np.mean(hits))


def _excluding(sims: np.ndarray, idx: np.ndarray, exclude: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A search's ``k`` (+ 1 with ``exclude``) nearest without each query's ``exclude`` row (the last
    one dropped where it was not found), padded to ``k`` columns with NaN and -1."""
    if exclude is not None and idx.shape[1]:
        drop = idx == np.asarray(exclude)[:, None]
        drop[:, -1] |= ~drop.any(axis=1)  # keep k per row: the last one goes when nothing was excluded
        sims, idx = sims[~drop].reshape(len(idx), -1), idx[~drop].reshape(len(idx), -1)
    pad = k - idx.shape[1]
    if pad > 0:
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=np.nan)
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    return sims, idx


def _empty(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)


def _blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    return ((s, min(s + block, n)) for s in range(0, n, block))


def _numpy_knn(queries: np.ndarray, base: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by blocks: a running best ``k`` per query, merged with each block of ``base``."""
    top = _Top(len(queries), k)
    for qs, qe in _blocks(len(queries), block):
        for bs, be in _blocks(len(base), block):
            top.add(slice(qs, qe), queries[qs:qe] @ np.asarray(base[bs:be], np.float32).T, np.arange(bs, be))
    return top.result()
