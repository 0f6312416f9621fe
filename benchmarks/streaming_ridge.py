"""Peak memory and time of fitting the ridge head on a large cache: scikit-learn's RidgeClassifierCV on
the features loaded whole (the old head) against the streaming ridge reading them by chunks (the new
one), each in its own process (peak RSS from ``resource.getrusage``), on a generated 200,000 x 512
float16 cache of 10 classes. Prints medians over ``--repeats`` runs.

    python benchmarks/streaming_ridge.py [--rows 200000] [--dims 512] [--repeats 1] [--dir /tmp/streambench]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODES = {"old": "StandardScaler + RidgeClassifierCV (LOO), features loaded whole",
         "new": "streaming ridge, one pass by chunks of 65536 rows",
         "new-cv5": "streaming ridge, 5 folds + refit from the same one pass"}


def make_cache(folder: Path, rows: int, dims: int) -> Path:
    """A float16 cache of ``rows`` x ``dims`` features, 10 classes with shifted means (made once)."""
    from pipeline.stages.cache_import import import_embeddings

    found = sorted(folder.glob("cache/*.h5"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, rows)
    means = rng.normal(scale=0.3, size=(10, dims))
    emb = np.lib.format.open_memmap(folder / "emb.npy", "w+", np.float16, (rows, dims))
    for i in range(0, rows, 20000):
        emb[i:i + 20000] = rng.normal(size=(min(20000, rows - i), dims)) + means[labels[i:i + 20000]]
    emb.flush()
    with open(folder / "ids.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"])
        writer.writerows((f"r{i}", f"c{c}") for i, c in enumerate(labels))
    return import_embeddings(folder / "emb.npy", folder / "cache", ids=folder / "ids.csv", dtype="float16").cache


def run(mode: str, cache_path: str) -> dict:
    """Fit the ridge head one way (in this process) and report its seconds and peak RSS."""
    import resource

    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.cache import FeatureCache
    from pipeline.heads import create_head
    from pipeline.streaming import fit_subsets_in_one_pass
    from pipeline.tasks import cache_task, join_task

    start = time.perf_counter()
    with FeatureCache(cache_path) as cache:
        data = join_task(cache, cache_task(cache), load=False)
        y = np.asarray(data.y).astype(str)
        if mode == "old":
            X = cache.features("pooled", data.rows)
            make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 5, 13))).fit(X, y)
        else:
            subsets = [np.arange(len(y))]
            if mode == "new-cv5":
                subsets = [tr for tr, _ in StratifiedKFold(5, shuffle=True, random_state=0).split(y, y)] + subsets
            parts = np.array_split(np.arange(len(y)), -(-len(y) // 65536))
            chunks = ((p, cache.features("pooled", data.rows[p]), y[p]) for p in parts)
            fit_subsets_in_one_pass(create_head("ridge"), chunks, subsets, np.unique(y))
    return dict(seconds=time.perf_counter() - start, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/streambench"))
    parser.add_argument("--run", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run(args.run, args.cache)))
        return
    cache = make_cache(args.dir, args.rows, args.dims)
    print(f"cache {cache} ({args.rows} x {args.dims} float16, {cache.stat().st_size / 2**20:.0f} MiB on disk)")
    for mode, words in MODES.items():
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--run", mode, "--cache", str(cache)],
                                          capture_output=True, text=True, check=True).stdout) for _ in range(args.repeats)]
        print(f"{mode:8s} {words}: {statistics.median(r['seconds'] for r in runs):.1f} s, "
              f"peak RSS {statistics.median(r['peak_mib'] for r in runs):.0f} MiB")


if __name__ == "__main__":
    main()
