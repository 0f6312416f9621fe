"""A cross-validated sweep, the project against the same sweep written plainly with scikit-learn and
joblib: every cache and their concatenation x the heads (default: logreg, linear-svm, ridge, mlp, knn,
centroid), 5 stratified folds (seed 0) scored out of fold, then each head refit on all rows.

The plain script's heads are scikit-learn's own, as this project's registry defined them before its
linear heads were batched: ``GridSearchCV`` over ``LogisticRegression`` (13 C, 5-fold, log loss) and
over ``LinearSVC`` (6 C, 5-fold, accuracy), ``RidgeClassifierCV``, ``MLPClassifier``, cosine kNN and
nearest centroid, one joblib job per row. Each side runs in a fresh process, ``--repeats`` times,
alternating; the script prints the median wall seconds of the sweep (inside the process, after
imports) and of the whole process, their ratio, each row's accuracy on both sides, and where the time
went (per head on both sides, per stage in the project). ``--sequential`` also times the plain script
once in a single process without joblib, as a script without a process pool runs it.

    python benchmarks/cv_sweep.py --caches cache/*lite0*.h5 cache/*lite2*.h5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEADS = "logreg,linear-svm,ridge,mlp,knn,centroid"


def plain_head(name: str):
    """The head as plain scikit-learn."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifierCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    inner = StratifiedKFold(5, shuffle=True, random_state=0)
    return {
        "logreg": lambda: GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                                       {"logisticregression__C": np.logspace(-4, 2, 13)}, cv=inner, scoring="neg_log_loss"),
        "linear-svm": lambda: GridSearchCV(make_pipeline(StandardScaler(), LinearSVC(max_iter=5000, random_state=0)),
                                           {"linearsvc__C": np.logspace(-5, 0, 6)}, cv=inner),
        "ridge": lambda: make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 5, 13))),
        "mlp": lambda: make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(512,), alpha=1e-3, max_iter=500,
                                                                     random_state=0)),
        "knn": lambda: KNeighborsClassifier(n_neighbors=10, metric="cosine", weights="distance"),
        "centroid": lambda: make_pipeline(Normalizer(), NearestCentroid()),
    }[name]()


def features(caches: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features of every valid labelled row per backbone (and their concatenation), and labels."""
    from pipeline import FeatureCache

    Xs, y = {}, None
    for path in caches:
        with FeatureCache(path) as c:
            rows = np.flatnonzero(c.valid & (np.asarray(c.labels) != ""))
            Xs[c.backbone] = c.features("pooled", rows)
            y = np.asarray(c.labels)[rows].astype(str)
    Xs["+".join(Xs)] = np.hstack(list(Xs.values()))
    return Xs, y


def plain_row(name: str, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Out-of-fold accuracy of one row, and the seconds its folds and refit took."""
    import warnings

    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = cross_val_predict(plain_head(name), X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
        plain_head(name).fit(X, y)
    return float(np.mean(pred == y)), time.perf_counter() - start


def child_plain(caches: list[str], heads: list[str], n_jobs: int) -> dict:
    from joblib import Parallel, delayed

    Xs, y = features(caches)
    start = time.perf_counter()
    jobs = [(b, h) for b in Xs for h in heads]
    out = Parallel(n_jobs=n_jobs)(delayed(plain_row)(h, Xs[b], y) for b, h in jobs)
    heads = {}
    for (_, h), (_, seconds) in zip(jobs, out):
        heads[h] = heads.get(h, 0.0) + seconds
    return {"sweep": time.perf_counter() - start, "acc": {f"{b} | {h}": a for (b, h), (a, _) in zip(jobs, out)},
            "timings": {"heads": heads}}


def child_project(caches: list[str], heads: list[str], n_jobs: int) -> dict:
    from pipeline import fit

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = fit(caches, Path(tmp) / "run", heads=heads, concat=True, cv=5, n_jobs=n_jobs, progress=False)
        sweep = time.perf_counter() - start
    if any(r.eval != "cv5" for r in res.rows):
        sys.exit("the caches' data has a train/val split, which fit scores on instead of 5 folds: give caches of "
                 "a folder laid out class/image")
    return {"sweep": sweep, "acc": {f"{r.backbone} | {r.head}": r.metrics.get("accuracy") for r in res.rows},
            "timings": res.timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caches", nargs="+", required=True)
    ap.add_argument("--heads", default=HEADS)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per side (medians are reported)")
    ap.add_argument("--n-jobs", type=int, default=-1)
    ap.add_argument("--sequential", action="store_true",
                    help="also time the plain script in one process without joblib (n_jobs 1, BLAS threads as they "
                         "come), once")
    ap.add_argument("--child", choices=["plain", "project"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    heads = args.heads.split(",")
    if args.child:
        run = child_plain if args.child == "plain" else child_project
        print(json.dumps(run(args.caches, heads, args.n_jobs)))
        return

    runs: dict[str, list[dict]] = {"plain": [], "project": []}
    sides = [("plain", "plain", args.n_jobs), ("project", "project", args.n_jobs)]
    if args.sequential:
        runs["plain, one process"] = []
    for i in range(args.repeats):
        for side, child, n_jobs in sides + ([("plain, one process", "plain", 1)] if args.sequential and i == 0 else []):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", child, "--heads", args.heads, "--n-jobs",
                                  str(n_jobs), "--caches", *args.caches], capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            runs[side].append({**json.loads(out.stdout.splitlines()[-1]), "process": time.perf_counter() - start})

    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("sweep", "process")} for side, rs in runs.items()}
    print(f"{len(runs['plain'][0]['acc'])} rows, {args.repeats} fresh processes per side, medians\n")
    print("| side | sweep s | runs | whole process s |")
    print("| --- | --- | --- | --- |")
    for side, rs in runs.items():
        each = ", ".join(f"{r['sweep']:.1f}" for r in rs)
        print(f"| {side} | {med[side]['sweep']:.1f} | {each} | {med[side]['process']:.1f} |")
    for side in runs:
        if side != "project":
            print(f"\nproject speed-up over {side}: sweep {med[side]['sweep'] / med['project']['sweep']:.1f}x, "
                  f"whole process {med[side]['process'] / med['project']['process']:.1f}x")
    print()

    plain, ours = runs["plain"][0]["acc"], runs["project"][0]["acc"]
    print("| backbone | head | plain accuracy | project accuracy | points |")
    print("| --- | --- | --- | --- | --- |")
    diffs = []
    for key, acc in plain.items():
        mine = ours.get(key)
        diffs.append(abs(100 * (mine - acc)) if mine is not None else float("inf"))
        print(f"| {key} | {acc:.4f} | {mine if mine is None else f'{mine:.4f}'} | {100 * (mine - acc) if mine is not None else float('nan'):+.2f} |")
    print(f"\nlargest accuracy difference: {max(diffs):.2f} points")
    middle = {side: rs[len(rs) // 2]["timings"] for side, rs in runs.items()}
    print("\nseconds per head, summed over the rows and workers (middle run of each side):\n")
    print("| head | " + " | ".join(middle) + " |")
    print("| --- |" + " --- |" * len(middle))
    for head in args.heads.split(","):
        print(f"| {head} | " + " | ".join(f"{t['heads'].get(head, 0):.1f}" for t in middle.values()) + " |")
    stages = middle["project"]["stages"]
    print("\nproject, wall seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
