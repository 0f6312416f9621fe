"""Exact against approximate nearest neighbours: what ``pipeline.similarity.NeighbourIndex`` chose.

    python benchmarks/ann_index.py --rows 100000 1000000 --dim 128
    python benchmarks/ann_index.py --rows 20000 50000 200000 --dim 512 --hnsw

For each row count, makes clustered unit vectors (``--clusters`` centres, a shared ``--latent``-dimensional
spread around them as large as their distances, and isotropic ``--noise``, so that neighbours mean something, as with image features), then
times on the same ``--queries`` rows of the base (each excluding itself, as the audit searches):

- exact search (faiss's brute-force inner product): time per query, and a whole base against itself;
- the IVF index ``NeighbourIndex`` builds above its threshold: build time (k-means, adding, calibrating
  ``nprobe``), the ``nprobe`` chosen, time per query and recall@10 against exact;
- with ``--hnsw``, faiss's HNSW (``IndexHNSWFlat``, M=32, efConstruction 40) with the smallest power-of-two
  ``efSearch`` that reaches the same recall target: build time, time per query and recall@10.

Search times are medians of ``--repeats`` runs; "self" is the time per query times the rows: searching
the whole base against itself, as the audit's outlier scores and near-duplicate pairs do.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import similarity  # noqa: E402


def features(n: int, dim: int, clusters: int, latent: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    spread = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    X = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # in chunks: the float64 noise of 10^6 rows at once would not fit beside X
        m = min(n - s, 100_000)
        X[s:s + m] = (centres[rng.integers(clusters, size=m)] + rng.normal(size=(m, latent)).astype(np.float32) @ spread
                      + noise * rng.normal(size=(m, dim)).astype(np.float32))
    return similarity.normalized(X)


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def report(name: str, n: int, q: int, seconds: float, found: np.ndarray, truth: np.ndarray, extra: str = "") -> None:
    ms = 1e3 * seconds / q
    print(f"  {name:<6} {ms:8.3f} ms/query, self {ms * n / 1e3:8.1f} s, recall@10 {similarity._recall(found, truth):.4f}"
          f"{extra}", flush=True)


def hnsw(X: np.ndarray, queries: np.ndarray, rows: np.ndarray, truth: np.ndarray, target: float, repeats: int) -> None:
    import faiss

    def build():
        index = faiss.IndexHNSWFlat(X.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.add(X)
        return index

    index, build_s = timed(build)
    for ef in 2 ** np.arange(4, 11):
        index.hnsw.efSearch = int(ef)
        (_, idx), seconds = timed(lambda: index.search(queries, 11), repeats)
        found = similarity._recall(_drop(idx, rows), truth)
        if found >= target or ef == 1024:
            report("hnsw", len(X), len(rows), seconds, _drop(idx, rows), truth, f", efSearch {ef}, build {build_s:.1f} s")
            return


def _drop(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row's 10 nearest others out of 11 found."""
    drop = idx == rows[:, None]
    drop[:, -1] |= ~drop.any(axis=1)
    return idx[~drop].reshape(len(idx), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hnsw", action="store_true", help="also build and search faiss's HNSW (slow to build)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for n in args.rows:
        X = features(n, args.dim, args.clusters, args.latent, args.noise, args.seed)
        rows = np.sort(np.random.default_rng(args.seed + 1).choice(n, min(n, args.queries), replace=False))
        print(f"{n:,} x {args.dim} features ({X.nbytes / 2**20:.0f} MiB), {len(rows)} queries, k=10", flush=True)
        exact = similarity.NeighbourIndex(X, exact_below=n + 1)
        (_, truth), seconds = timed(lambda: exact.search(X[rows], 10, rows), args.repeats)
        report("exact", n, len(rows), seconds, truth, truth)
        ivf, build_s = timed(lambda: similarity.NeighbourIndex(X, exact_below=0))
        (_, idx), seconds = timed(lambda: ivf.search(X[rows], 10, rows), args.repeats)
        cells = f"nlist {ivf._ivf.nlist}, nprobe {ivf._ivf.nprobe}" if ivf.approximate else "exact: nprobe > nlist / 4"
        report("ivf", n, len(rows), seconds, idx, truth, f", {cells}, build {build_s:.1f} s")
        if args.hnsw:
            hnsw(X, X[rows], rows, truth, similarity.TARGET_RECALL, args.repeats)
        del X, exact, ivf


if __name__ == "__main__":
    main()
