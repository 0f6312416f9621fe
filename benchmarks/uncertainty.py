"""How ``predict`` says it does not know, on real images: out-of-distribution flags across two data sets
(a run fit on one, predicting the other's images, and its own held-out images), and the coverage of
``--coverage 0.9`` prediction sets on held-out hymenoptera images.

    export PIPELINE_WEIGHTS_DIR=../shared/weights
    python benchmarks/uncertainty.py ../shared/data/hymenoptera ../shared/data/lego --out /tmp/uncertainty

Each data set's features are extracted (tf_efficientnet_lite0, reused when cached) into ``OUT/cache``; the
coverage is measured over ``--draws`` random halves of hymenoptera's val split: one half calibrates (the
run's val), the other is predicted. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from pipeline import FeatureCache, extract, fit, predict

BACKBONE = "tf_efficientnet_lite0.in1k"


def flagged(rows: list[dict]) -> str:
    marks = [r["ood"] for r in rows if r["ood"] != ""]
    scores = [r["ood_score"] for r in rows if r["ood_score"] != ""]
    return f"{sum(marks)} of {len(marks)} flagged ({np.mean(marks):.1%}), median ood_score {np.median(scores):.1f}"


def images_of(cache_path: Path, root: Path, split: str | None = None) -> list[Path]:
    with FeatureCache(cache_path) as cache:
        return [root / i for i, s in zip(cache.ids, cache.splits) if split is None or s == split]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path, help="an image folder with train/val splits (hymenoptera)")
    ap.add_argument("second", type=Path, help="another image folder (lego)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    caches = {d: extract(d, BACKBONE, args.out / "cache", workers=0, progress=False)[0].cache
              for d in (args.first, args.second)}
    runs = {d: fit(caches[d], args.out / f"run_{d.name}", heads=["logreg"], n_jobs=1, progress=False).out
            for d in caches}
    first, second = args.first, args.second
    print(f"run on {first.name}, its val images: {flagged(predict(runs[first], images_of(caches[first], first, 'val'), progress=False))}")
    print(f"run on {first.name}, {second.name} images: {flagged(predict(runs[first], images_of(caches[second], second), progress=False))}")
    print(f"run on {second.name} (cross-validated: every image trains), {first.name} images: "
          f"{flagged(predict(runs[second], images_of(caches[first], first), progress=False))}")

    with FeatureCache(caches[first]) as cache:
        ids, labels, splits = cache.ids, cache.labels, cache.splits
    val = np.flatnonzero(splits == "val")
    covered, sizes = [], []
    for draw in range(args.draws):
        calib = np.zeros(len(ids), bool)
        calib[np.random.default_rng(draw).choice(val, len(val) // 2, replace=False)] = True
        held = (splits == "val") & ~calib
        label_file = args.out / f"halves{draw}.csv"
        with label_file.open("w", newline="") as fh:
            csv.writer(fh).writerows([("id", "label", "split")] + [(i, y, s) for i, y, s, c, h in
                                                                   zip(ids, labels, splits, calib, held) if not h])
        run = fit(caches[first], args.out / f"halves{draw}", labels=[label_file], heads=["logreg"], n_jobs=1,
                  progress=False).out
        rows = predict(run, [first / i for i in ids[held]], task=label_file.stem, coverage=0.9, progress=False)
        sets = [r["prediction_set"].split("|") if r["prediction_set"] else [] for r in rows]
        covered.append(np.mean([y in s for y, s in zip(labels[held], sets)]))
        sizes.append(np.mean([len(s) for s in sets]))
        print(f"draw {draw}: {calib.sum()} calibrate, {held.sum()} held out: coverage {covered[-1]:.3f}, "
              f"mean set size {sizes[-1]:.2f}")
    print(f"coverage at 0.9 over {args.draws} draws: mean {np.mean(covered):.3f} (median {np.median(covered):.3f}), "
          f"mean set size {np.mean(sizes):.2f}")


if __name__ == "__main__":
    main()
