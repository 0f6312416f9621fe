"""How ``predict`` says it does not know, on real images: out-of-distribution flags across two data sets
(a run fit on one, predicting the other's images, and its own held-out images), for a class held out of
training (each class of the second set in turn), and the coverage of ``--coverage 0.9`` prediction sets
on held-out images of both sets.

    export PIPELINE_WEIGHTS_DIR=../shared/weights
    python benchmarks/uncertainty.py ../shared/data/hymenoptera ../shared/data/lego --out /tmp/uncertainty

Each data set's features are extracted (tf_efficientnet_lite0, reused when cached) into ``OUT/cache``.
Held-out class: the second set's other classes split 70/30 into train and val (seeded), the run fit on
them; its val images are in distribution, the held-out class's images are not. Coverage over ``--draws``
random draws: the first set's train split trains and a random half of its val calibrates (the run's val),
the other half is predicted; the second set (no split) is cut 50/25/25 into train, calibration and
prediction. Split-conformal coverage is guaranteed on average over such draws, so the mean over many is
what is compared with the target. Prints figures; asserts nothing.
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
    ap.add_argument("--draws", type=int, default=40)
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

    for held_out, rates in held_out_classes(caches[second], second, args.out).items():
        print(f"{second.name} without class {held_out}: {rates}")
    for data in (first, second):
        covered, sizes = coverage_draws(caches[data], data, args.out / f"coverage_{data.name}", args.draws)
        print(f"{data.name}: coverage at 0.9 over {args.draws} draws: mean {np.mean(covered):.3f} (median "
              f"{np.median(covered):.3f}, {np.min(covered):.3f} to {np.max(covered):.3f}), mean set size {np.mean(sizes):.2f}")


def write_labels(path: Path, ids, labels, splits) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([("id", "label", "split")] + [(i, y, s) for i, y, s in zip(ids, labels, splits) if s])
    return path


def held_out_classes(cache_path: Path, root: Path, out: Path) -> dict[str, str]:
    """For each class: a run on the other classes (70/30 train/val), its val images and the class's images
    predicted; how many of each are flagged."""
    with FeatureCache(cache_path) as cache:
        ids, labels = cache.ids, cache.labels
    found = {}
    for held_out in sorted(set(labels)):
        rng = np.random.default_rng(0)
        splits = np.where(labels == held_out, "", np.where(rng.random(len(ids)) < 0.7, "train", "val"))
        label_file = write_labels(out / f"without_{held_out}.csv", ids, labels, splits)
        run = fit(cache_path, out / f"without_{held_out}", labels=[label_file], heads=["logreg"], n_jobs=1,
                  progress=False).out
        inside = predict(run, [root / i for i in ids[splits == "val"]], task=label_file.stem, progress=False)
        outside = predict(run, [root / i for i in ids[labels == held_out]], task=label_file.stem, progress=False)
        found[held_out] = f"its own val images {flagged(inside)}; class {held_out}'s images {flagged(outside)}"
    return found


def coverage_draws(cache_path: Path, root: Path, out: Path, draws: int) -> tuple[list[float], list[float]]:
    """Coverage and mean set size of ``--coverage 0.9`` sets on each draw's held-out images."""
    out.mkdir(parents=True, exist_ok=True)
    with FeatureCache(cache_path) as cache:
        ids, labels, splits = cache.ids, cache.labels, cache.splits
    covered, sizes = [], []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        if (splits == "val").any():
            val = np.flatnonzero(splits == "val")
            held = np.zeros(len(ids), bool)
            held[rng.choice(val, len(val) // 2, replace=False)] = True
            parts = np.where(held, "", splits)
        else:
            u = rng.random(len(ids))
            parts = np.where(u < 0.5, "train", np.where(u < 0.75, "val", ""))
            held = parts == ""
        label_file = write_labels(out / f"draw{draw}.csv", ids, labels, parts)
        run = fit(cache_path, out / f"draw{draw}", labels=[label_file], heads=["logreg"], n_jobs=1, progress=False).out
        rows = predict(run, [root / i for i in ids[held]], task=label_file.stem, coverage=0.9, progress=False)
        sets = [r["prediction_set"].split("|") if r["prediction_set"] else [] for r in rows]
        covered.append(float(np.mean([y in s for y, s in zip(labels[held], sets)])))
        sizes.append(float(np.mean([len(s) for s in sets])))
    return covered, sizes


if __name__ == "__main__":
    main()
