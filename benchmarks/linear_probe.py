"""The fast linear probe (`torch-logreg`) against scikit-learn's `LogisticRegression`, same features.

Both choose C from the same grid on the same stratified 20 % hold-out of the training rows (log loss)
and refit at the chosen C on all of them; scikit-learn fits every C from scratch (lbfgs, as
`LogisticRegression` does), the probe walks the path warm-started and stops once the hold-out loss has
risen twice. Also timed: one scikit-learn fit at the probe's chosen C (the solvers alone). Prints fit
seconds, their ratio and the test accuracy difference, on generated features with structure
(100 classes around low-rank centres, noise in every direction) and, with --cache, on a real cache's
train/val split.

    python benchmarks/linear_probe.py --n 50000 --dim 1280 --classes 100
    python benchmarks/linear_probe.py --n 0 --cache cache/hymenoptera__tf_efficientnet_lite0.in1k__*.h5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from pipeline.linear_probe import TorchLogisticRegression
from pipeline.tasks import load_task

GRID = np.logspace(-4, 2, 13)


def generated(n: int, n_test: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 64))
    proj = rng.normal(size=(64, dim)) / 8
    y = rng.integers(0, classes, n + n_test)
    X = (centres[y] + 1.5 * rng.normal(size=(n + n_test, 64))) @ proj + 0.5 * rng.normal(size=(n + n_test, dim))
    X = X.astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


def sklearn_protocol(X, y, seed: int) -> tuple[LogisticRegression, float]:
    """Every C of the grid on the hold-out, then the best refit on all rows."""
    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    losses = []
    for C in GRID:
        clf = LogisticRegression(C=C, max_iter=1000).fit(X[tr], y[tr])
        p = clf.predict_proba(X[va])
        losses.append(-np.mean(np.log(np.clip(p[np.arange(len(va)), np.searchsorted(clf.classes_, y[va])], 1e-15, None))))
        if len(losses) > 2 and losses[-1] > losses[-2] > losses[-3]:
            break  # the same early stop as the probe: scikit-learn is not charged for the weak end either
    best = GRID[int(np.argmin(losses))]
    return LogisticRegression(C=best, max_iter=1000).fit(X, y), best


def compare(name: str, Xtr, ytr, Xte, yte) -> None:
    scaler = StandardScaler().fit(Xtr)
    Xtr, Xte = scaler.transform(Xtr).astype(np.float32), scaler.transform(Xte).astype(np.float32)
    t = time.perf_counter()
    probe = TorchLogisticRegression(Cs=tuple(GRID)).fit(Xtr, ytr)
    probe_s = time.perf_counter() - t
    t = time.perf_counter()
    sk, sk_C = sklearn_protocol(Xtr, ytr, 0)
    sk_s = time.perf_counter() - t
    t = time.perf_counter()
    one = LogisticRegression(C=probe.C_, max_iter=1000).fit(Xtr, ytr)
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    TorchLogisticRegression(Cs=(probe.C_,)).fit(Xtr, ytr)
    one_probe_s = time.perf_counter() - t
    acc = probe.score(Xte, yte)
    print(f"\n{name}: train {Xtr.shape}, test {len(yte)}, {len(np.unique(ytr))} classes")
    print("| fit | C | seconds | test accuracy |")
    print("| --- | --- | --- | --- |")
    print(f"| torch-logreg: path + refit | {probe.C_:.3g} | {probe_s:.1f} | {acc:.4f} |")
    print(f"| sklearn LogisticRegression: same grid + hold-out + refit | {sk_C:.3g} | {sk_s:.1f} | {sk.score(Xte, yte):.4f} |")
    print(f"| torch-logreg: one fit at C | {probe.C_:.3g} | {one_probe_s:.1f} | |")
    print(f"| sklearn LogisticRegression: one fit at C | {probe.C_:.3g} | {one_s:.1f} | {one.score(Xte, yte):.4f} |")
    print(f"speed-up, same protocol: {sk_s / probe_s:.1f}x; one fit: {one_s / one_probe_s:.1f}x; "
          f"accuracy difference (torch - sklearn, same protocol): {100 * (acc - sk.score(Xte, yte)):+.2f} points")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50000, help="generated training rows (0: skip)")
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--cache", default=None, help="a real cache with a train/val split")
    args = ap.parse_args()
    if args.n:
        compare("generated", *generated(args.n, args.n_test, args.dim, args.classes))
    if args.cache:
        compare(args.cache, *load_task(args.cache).holdout())


if __name__ == "__main__":
    main()
