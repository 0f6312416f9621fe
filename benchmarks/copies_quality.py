"""How well the copy finder (:mod:`pipeline.copies`) finds planted re-encoded copies, per kind of copy,
and how many distinct pairs it calls copies (the goal is none).

    python benchmarks/copies_quality.py --data ../shared/data/hymenoptera ../shared/data/lego

For each data set: copies it to WORK/<name>/data, plants ``--per-kind`` copies of each kind (JPEG quality
50/70/90, resized to 50/75/90 %, cropped to the central 90 %, PNG, rotated 3 degrees) of randomly chosen
images (from ``train`` into ``val`` where the data has splits, else beside the original), extracts pooled
features with the real weights (reused on a second run: the cache is matched by content), then prints:

- how far the original is down its copy's nearest neighbours, and the candidate threshold the cache's
  own similarities give;
- for each pixel check (grey thumbnails at two sizes, perceptual hashes), each planted copy's score
  against its original and the highest score of a distinct candidate pair: what separates them;
- the copy finder's precision and recall per kind of copy, and the distinct pairs it confirms, with the
  images and without them (the embeddings-only fallback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import FeatureCache, extract, load_source  # noqa: E402
from pipeline.copies import Images, candidates, edges, find_copies, pixel_similarity  # noqa: E402
from pipeline.data import load_image  # noqa: E402
from pipeline.similarity import normalized  # noqa: E402


def _rotate(im: Image.Image, degrees: float) -> Image.Image:
    """Rotated about the centre, the uncovered corners filled with the image's median border colour."""
    a = np.asarray(im)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return im.rotate(degrees, Image.BICUBIC, fillcolor=tuple(int(v) for v in np.median(border, axis=0)))


def _crop(im: Image.Image, keep: float) -> Image.Image:
    w, h = round(im.width * keep), round(im.height * keep)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


def _resized(im: Image.Image, scale: float) -> Image.Image:
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)


# name -> (how a copy is made from the original RGB image, the file suffix it is saved with, save options)
COPIES = {
    "jpeg q50": (lambda im: im, ".jpg", dict(quality=50)),
    "jpeg q70": (lambda im: im, ".jpg", dict(quality=70)),
    "jpeg q90": (lambda im: im, ".jpg", dict(quality=90)),
    "resize 50%": (lambda im: _resized(im, 0.5), ".jpg", dict(quality=85)),
    "resize 75%": (lambda im: _resized(im, 0.75), ".jpg", dict(quality=85)),
    "resize 90%": (lambda im: _resized(im, 0.9), ".jpg", dict(quality=85)),
    "crop 90%": (lambda im: _crop(im, 0.9), ".jpg", dict(quality=90)),
    "png": (lambda im: im, ".png", {}),
    "rotate 3deg": (lambda im: _rotate(im, 3), ".jpg", dict(quality=90)),
}


def plant(data: Path, root: Path, per_kind: int, seed: int) -> dict[str, tuple[str, str]]:
    """Copy ``data`` to ``root`` and plant the copies: {copy id: (original id, kind)}."""
    rng = np.random.default_rng(seed)
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(data, root)
    samples = load_source(root).samples
    has_splits = any(s.split == "train" for s in samples)
    pool = [s for s in samples if s.split == "train" or not has_splits]
    pool = [s for s in pool if s.path.suffix.lower() in (".jpg", ".jpeg", ".png")]
    chosen = rng.choice(len(pool), per_kind * len(COPIES), replace=False)
    planted = {}
    for n, i in enumerate(chosen):
        s, kind = pool[i], list(COPIES)[n % len(COPIES)]
        make, suffix, options = COPIES[kind]
        folder = root / "val" / s.label if has_splits else s.path.parent
        target = folder / f"planted_{n:03d}{suffix}"
        make(load_image(s.path)).save(target, **options)
        planted[target.relative_to(root).as_posix()] = (s.id, kind)
    return planted


def features(root: Path, cache_dir: Path, backbone: str) -> Path:
    """Extract (or reuse) the pooled features of ``root``: the cache file."""
    started = time.perf_counter()
    cache = extract(root, [backbone], cache_dir, progress=False)[0].cache
    print(f"  features of {root}: {time.perf_counter() - started:.0f} s")
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["../shared/data/hymenoptera", "../shared/data/lego"])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0.in1k")
    ap.add_argument("--work", default="copies-quality")
    ap.add_argument("--per-kind", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("PIPELINE_WEIGHTS_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "weights"))
    for data in map(Path, args.data):
        work = Path(args.work) / data.name
        planted = plant(data, work / "data", args.per_kind, args.seed)
        cache = features(work / "data", work / "cache", args.backbone)
        print(f"\n== {data.name}: {len(planted)} copies planted; {cache}")
        report(cache, work / "data", planted)


def report(cache_path: Path, root: Path, planted: dict[str, tuple[str, str]]) -> None:
    with FeatureCache(cache_path) as cache:
        rows = np.flatnonzero(cache.valid)
        ids, X = cache.ids[rows], normalized(cache.features("pooled", rows))
        images = Images.of_cache(cache, root)
    row = {sid: n for n, sid in enumerate(ids)}
    truth = {(min(row[c], row[o]), max(row[c], row[o])): kind for c, (o, kind) in planted.items()}
    sims, idx, (ci, cj), cs = candidates(X)
    ranks = [int(np.flatnonzero(idx[row[c]] == row[o])[0]) + 1 if row[o] in idx[row[c]] else 0 for c, (o, _) in planted.items()]
    print(f"  original among its copy's {idx.shape[1]} nearest: {sum(r > 0 for r in ranks)} of {len(ranks)} "
          f"(ranks {sorted(r for r in ranks if r)}); nearest similarity of the originals, percentiles 5/50/95: "
          + " / ".join(f"{v:.3f}" for v in np.percentile(sims[:, 0], [5, 50, 95])))
    compare_checks(ids, root, truth, list(zip(ci, cj)))
    for name, found in (("pixels", find_copies(X, ids, images)), ("embeddings only", find_copies(X, ids, None))):
        confirmed = {(int(a), int(b)) for a, b in zip(found.i[found.confirmed], found.j[found.confirmed])}
        distinct = confirmed - set(truth)
        print(f"  copy finder, {name} ({found.rule()}): {len(confirmed & set(truth))}/{len(truth)} copies found, "
              f"{len(distinct)} distinct pairs called copies")
        for kind in COPIES:
            pairs = [p for p, k in truth.items() if k == kind]
            print(f"    {kind:12s} recall {sum(p in confirmed for p in pairs)}/{len(pairs)}")
        for a, b in sorted(distinct)[:5]:
            print(f"    distinct: {ids[a]} ~ {ids[b]}")
        if found.by_pixels:
            print(f"    pairs whose pixels were compared: {int((~np.isnan(found.pixel_similarity)).sum())} of {len(found.i)} candidates")


def _hash_checks(rgb: dict) -> dict:
    """Perceptual hashes as checks, where ``imagehash`` is installed (``pip install imagehash``: only this
    comparison uses it; the project's check is the edge correlation)."""
    try:
        import imagehash
    except ImportError:
        print("    (imagehash not installed: perceptual hashes left out of the comparison)")
        return {}
    hashes = {name: {n: fn(im) for n, im in rgb.items()} for name, fn in (("phash", imagehash.phash), ("dhash", imagehash.dhash))}
    return {"phash (1 - bits/64)": lambda a, b: 1 - (hashes["phash"][a] - hashes["phash"][b]) / 64,
            "dhash (1 - bits/64)": lambda a, b: 1 - (hashes["dhash"][a] - hashes["dhash"][b]) / 64}


def compare_checks(ids: np.ndarray, root: Path, truth: dict, pairs: list[tuple[int, int]]) -> None:
    """Each pixel check's score of the planted copies (lowest per kind) against the highest score of a
    distinct candidate pair: a check separates them when the first is above the second."""
    from PIL import ImageOps

    paths = {s.id: s.path for s in load_source(root).samples}
    rgb = {n: load_image(paths[ids[n]], min_side=256) for n in {x for p in pairs for x in p}}
    grey = {n: ImageOps.autocontrast(im.convert("L"), cutoff=1) for n, im in rgb.items()}

    def thumb(n: int, side: int) -> np.ndarray:
        v = np.asarray(grey[n].resize((side, side), Image.BOX), np.float32).ravel()
        v -= v.mean()
        return v / (np.linalg.norm(v) or 1.0)

    checks = {
        "grey 16x16 correlation": lambda a, b: float(thumb(a, 16) @ thumb(b, 16)),
        "grey 32x32 correlation": lambda a, b: float(thumb(a, 32) @ thumb(b, 32)),
        **_hash_checks(rgb),
        "edges 128, as is": lambda a, b: float(edges(grey[a]) @ edges(grey[b])),
        "edges 128, aligned (chosen)": lambda a, b: pixel_similarity(grey[a], grey[b]),
    }
    print(f"  pixel checks over {len(pairs)} candidate pairs: lowest copy score per kind | highest distinct pair")
    for name, check in checks.items():
        lowest = {k: min(check(*p) for p, kk in truth.items() if kk == k) for k in COPIES}
        top = max(check(*p) for p in pairs if tuple(p) not in truth)
        print(f"    {name:28s} " + " ".join(f"{v:.3f}" for v in lowest.values())
              + f" | {top:.3f}  {'separates' if min(lowest.values()) > top else 'does not separate'}")
    print(f"    (kinds: {', '.join(COPIES)})")


if __name__ == "__main__":
    main()
