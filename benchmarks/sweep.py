"""What a sweep costs: a full leaderboard (every cache × task × head, plus the concatenation of the
caches) on each joblib backend, against the time of one fine-tuning epoch of the first cache's backbone.

Prints, per backend: leaderboard rows, wall seconds (backend start-up included), rows per second, the
wall time relative to loky, and how many such sweeps fit in one fine-tuning epoch (full network, the
training part of one epoch on the same data, timed by `finetune --epochs 2 --head-epochs 1`).

    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/sweep.py --caches cache/*.h5 \
        --labels data/hymenoptera_coinflip.csv --data ../shared/data/hymenoptera
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from pipeline import FeatureCache, fit, finetune

HEADS = "logreg,mlp,knn,torch-logreg,linear-svm,ridge,centroid,sgd"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caches", nargs="+", required=True)
    ap.add_argument("--labels", nargs="*", default=[])
    ap.add_argument("--heads", default=HEADS)
    ap.add_argument("--backends", default="loky,threading,dask,ray")
    ap.add_argument("--repeats", type=int, default=3, help="runs per backend (the median is reported)")
    ap.add_argument("--n-jobs", type=int, default=-1)
    ap.add_argument("--data", default=None, help="image folder of the caches: also time one fine-tuning epoch")
    args = ap.parse_args()

    heads = args.heads.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            if backend in ("dask", "ray") and importlib.util.find_spec("distributed" if backend == "dask" else "ray") is None:
                print(f"{backend}: not installed (pip install -e '.[{backend}]'), skipped")
                continue
            walls = []
            for i in range(args.repeats):
                start = time.perf_counter()
                res = fit(args.caches, Path(tmp) / f"{backend}{i}", labels=args.labels, heads=heads, concat=len(args.caches) > 1,
                          n_jobs=args.n_jobs, backend=backend, progress=False)
                walls.append(time.perf_counter() - start)
            results.append((backend, len(res.rows), statistics.median(walls), walls))
        epoch = None
        if args.data:
            with FeatureCache(args.caches[0]) as c:
                backbone, weights = c.backbone, c.attrs["weights_source"]
            ft = finetune(args.data, backbone, Path(tmp) / "ft", strategy="freeze-unfreeze", epochs=2, head_epochs=1,
                          unfreeze="all", weights=weights if Path(weights).is_file() else None, patience=None,
                          progress=False)
            epoch = ft.history[-1]["train_seconds"] - ft.history[-2]["train_seconds"]

    base = next((w for b, _, w, _ in results if b == "loky"), None)
    print("| backend | rows | wall s (median) | runs | rows/s | × loky time |" + (" sweeps per fine-tune epoch |" if epoch else ""))
    print("| --- | --- | --- | --- | --- | --- |" + (" --- |" if epoch else ""))
    for backend, n, wall, walls in results:
        ratio = f"{wall / base:.2f}" if base else ""
        per_epoch = f" {epoch / wall:.2f} |" if epoch else ""
        print(f"| {backend} | {n} | {wall:.1f} | {', '.join(f'{w:.1f}' for w in walls)} | {n / wall:.1f} | {ratio} |{per_epoch}")
    if epoch:
        print(f"\none fine-tuning epoch (all blocks, training only): {epoch:.1f} s")


if __name__ == "__main__":
    main()
