"""How well `pipeline audit` finds planted problems: flipped labels and near-copies of training images
re-encoded into the evaluation split.

    python benchmarks/audit_quality.py --data ../shared/data/hymenoptera --backbone tf_efficientnet_lite0.in1k

Copies DATA to WORK/data, re-encodes --copies training images into its val split (JPEG at several
qualities, resized, PNG), writes a label file with --flip of the training labels flipped, extracts,
audits, and prints precision and recall of both findings, plus what calibrates the duplicate threshold:
the cosine similarity of each kind of copy to its original against the most similar distinct images.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import FeatureCache, audit, extract, load_source  # noqa: E402
from pipeline.stages.audit import joined_features  # noqa: E402

# name -> how a copy is made from the original (an RGB image) and saved
COPIES = {
    "jpeg q50": lambda im, p: im.save(p.with_suffix(".jpg"), quality=50),
    "jpeg q70": lambda im, p: im.save(p.with_suffix(".jpg"), quality=70),
    "jpeg q90": lambda im, p: im.save(p.with_suffix(".jpg"), quality=90),
    "resize 50% + jpeg q85": lambda im, p: im.resize((im.width // 2, im.height // 2)).save(p.with_suffix(".jpg"), quality=85),
    "resize 75% + jpeg q85": lambda im, p: im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(p.with_suffix(".jpg"), quality=85),
    "png": lambda im, p: im.save(p.with_suffix(".png")),
}


def plant(data: Path, work: Path, n_copies: int, flip: float, seed: int) -> tuple[dict, dict, Path]:
    """The data copy with planted copies ({val id: (train id, kind)}), the flipped labels ({id: true
    label}), and the label file."""
    rng = np.random.default_rng(seed)
    root = work / "data"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(data, root)
    train = [s for s in load_source(root).samples if s.split == "train" and s.path.suffix.lower() in (".jpg", ".jpeg")]
    planted = {}
    kinds = list(COPIES)
    for n, i in enumerate(rng.choice(len(train), n_copies, replace=False)):
        s, kind = train[i], kinds[n % len(kinds)]
        target = root / "val" / s.label / f"planted_{n:03d}"
        with Image.open(s.path) as im:
            COPIES[kind](im.convert("RGB"), target)
        made = next(target.parent.glob(f"{target.name}.*"))
        planted[made.relative_to(root).as_posix()] = (s.id, kind)
    samples = load_source(root).samples
    labels = sorted({s.label for s in samples})
    train_ids = [s.id for s in samples if s.split == "train"]
    flipped_ids = set(rng.choice(train_ids, round(flip * len(train_ids)), replace=False))
    flipped = {}
    label_file = work / "labels_flipped.csv"
    with label_file.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("id", "label", "split"))
        for s in samples:
            given = s.label
            if s.id in flipped_ids:
                given = rng.choice([c for c in labels if c != s.label])
                flipped[s.id] = s.label
            w.writerow((s.id, given, s.split))
    return planted, flipped, label_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/hymenoptera")
    ap.add_argument("--backbone", action="append", help="repeat for several (audited side by side)")
    ap.add_argument("--work", default="audit-quality")
    ap.add_argument("--copies", type=int, default=24)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--head", default="auto")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    planted, flipped, label_file = plant(Path(args.data), work, args.copies, args.flip, args.seed)
    caches = [r.cache for r in extract(work / "data", args.backbone or ["tf_efficientnet_lite0.in1k"], work / "cache", progress=False)]
    result = audit(caches, work / "audit", [label_file], data=work / "data", head=args.head, overwrite=True)
    print("\n".join(result.lines()))

    task = next(t for t in result.tasks if t.task == label_file.stem)
    flagged = [d["id"] for d in task.issues]
    hits = len(set(flagged) & set(flipped))
    print(f"\nlabel issues ({len(flipped)} training labels flipped of {sum(1 for _ in task.protocol.ids)} images):")
    print(f"  flagged {len(flagged)}: precision {_ratio(hits, len(flagged))}, recall {_ratio(hits, len(flipped))}")
    top = {d["id"] for d in task.ranking[:len(flipped)]}
    print(f"  top {len(flipped)} of the ranking: {len(top & set(flipped))} flipped")

    cross = {(d["id_a"], d["id_b"]) for d in result.cross_split}
    found = sum((v, t) in cross for v, (t, _) in planted.items())
    planted_pairs = {(v, t) for v, (t, _) in planted.items()}
    print(f"\nnear-duplicates ({len(planted)} training images copied into val):")
    print(f"  cross-split pairs reported {len(cross)}: precision {_ratio(len(cross & planted_pairs), len(cross))}, "
          f"recall {_ratio(found, len(planted))}")
    missed = [(v, t, kind) for v, (t, kind) in planted.items() if (v, t) not in cross]
    for v, t, kind in missed:
        print(f"  missed: {v} (copy of {t}, {kind})")
    _calibration(caches, planted)


def _calibration(caches: list[Path], planted: dict) -> None:
    """Cosine of each kind of copy to its original, and of the most similar distinct images."""
    opened = [FeatureCache(p) for p in caches]
    ids, X = joined_features(opened, "pooled")
    for c in opened:
        c.close()
    row = {s: i for i, s in enumerate(ids)}
    by_kind: dict[str, list[float]] = {}
    for v, (t, kind) in planted.items():
        by_kind.setdefault(kind, []).append(float(X[row[v]] @ X[row[t]]))
    print("\ncosine similarity of a copy to its original (min / median / max):")
    for kind, sims in by_kind.items():
        print(f"  {kind:24s} {min(sims):.4f} / {np.median(sims):.4f} / {max(sims):.4f}  ({len(sims)} copies)")
    original = np.array([i for i, s in enumerate(ids) if not s.split("/")[-1].startswith("planted_")])
    S = X[original] @ X[original].T
    np.fill_diagonal(S, -1)
    upper = S[np.triu_indices(len(original), 1)]
    top = np.sort(upper)[::-1][:5]
    print(f"most similar distinct images (of {len(upper)} pairs): " + ", ".join(f"{s:.4f}" for s in top)
          + f"; 99.9th percentile {np.percentile(upper, 99.9):.4f}")


def _ratio(a: int, b: int) -> str:
    return f"{a}/{b} = {a / b:.3f}" if b else f"{a}/0"


if __name__ == "__main__":
    main()
