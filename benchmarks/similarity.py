"""The similarity searches at scale: the near-duplicate pairs (blocked numpy), and nearest neighbours by
blocked numpy against faiss, on the same generated features.

    python benchmarks/similarity.py --n 50000 --dim 1280

Makes ``--n`` unit vectors in ``--clusters`` clusters (so neighbours are near, as with real features),
plants ``--copies`` noisy copies, and times ``pairs_above`` (every pair over the threshold) and ``knn``
(10 neighbours of every row, the outlier score's search; numpy, then faiss when installed), with the peak memory the numpy search
allocated beyond its input (tracemalloc, which sees numpy's buffers but not faiss's) and whether both
found the same.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import similarity  # noqa: E402


def features(n: int, dim: int, clusters: int, copies: int, seed: int) -> tuple[np.ndarray, set]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    X = centres[rng.integers(clusters, size=n)] + 1.2 * rng.normal(size=(n, dim)).astype(np.float32)
    src = rng.choice(n - copies, copies, replace=False)
    X[n - copies:] = X[src] + 0.1 * rng.normal(size=(copies, dim)).astype(np.float32)
    return similarity.normalized(X), {(int(a), n - copies + i) for i, a in enumerate(src)}


def measure(fn):
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--copies", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    X, planted = features(args.n, args.dim, args.clusters, args.copies, args.seed)
    print(f"{args.n:,} x {args.dim:,} features ({X.nbytes / 2**20:.0f} MiB), {len(planted)} planted copies, "
          f"threshold {similarity.DUPLICATE_COSINE}")
    (i, j, _), pair_s, pair_mb = measure(lambda: similarity.pairs_above(X, similarity.DUPLICATE_COSINE))
    pairs = set(zip(i.tolist(), j.tolist()))
    print(f"pairs_above (numpy blocks) {pair_s:.1f} s, peak {pair_mb:.0f} MiB: {len(pairs)} pairs, "
          f"{len(pairs & planted)} of {len(planted)} planted")
    found = {}
    for name, use_faiss in [("numpy blocks", False)] + ([("faiss", True)] if similarity.faiss_available() else []):
        similarity.faiss_available = (lambda f: lambda: f)(use_faiss)
        (_, idx), seconds, mb = measure(lambda: similarity.knn(X, X, 10, exclude=np.arange(len(X))))
        found[name] = idx
        memory = "faiss's own (C++) memory is not seen" if use_faiss else f"peak {mb:.0f} MiB"
        print(f"knn k=10 ({name}) {seconds:.1f} s, {memory}")
    if len(found) == 2:
        a, b = found.values()
        print(f"same 10 neighbours: {np.mean(np.sort(a, 1) == np.sort(b, 1)):.4f} of entries")


if __name__ == "__main__":
    main()
