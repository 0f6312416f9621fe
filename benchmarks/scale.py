"""Every stage a user runs on a cache, at growing sizes: time, peak memory and the growth exponent.

Generated embeddings with class structure (``--classes`` Gaussian classes), planted near-copies (a row
repeated with a little noise) and flipped labels are written as parquet in row groups and brought in
with ``pipeline cache import``; then, each in its own process (peak memory is the process's maximum
resident set, from ``wait4``):

- ``import``: ``pipeline cache import``;
- ``fit``: ``pipeline fit CACHE --heads H --max-memory M`` on the file's own split (``split``), and on a
  label file without one (``cv``, 5 folds), with each head's accuracy; with ``--max-memory``, also the
  split without it (``fit in memory``), so each head's accuracy read by chunks meets its fit in memory;
- ``audit``: ``pipeline audit CACHE --map none``, with the recall of the planted copies in its
  ``duplicates.csv`` and the precision of its label issues on the flipped labels (top k, k = flips);
  with ``--max-memory``, also ``audit by chunks``, the same under the bound (which reads the features
  by chunks where their copies exceed it);
- ``neighbors``: the cache's index (:class:`pipeline.similarity.NeighbourIndex`) built, then 200 queries:
  build seconds and milliseconds per query;
- ``predict``: the fit's best head on 10,000 cached rows (load and predict).

The growth exponent between two sizes is log(t2 / t1) / log(n2 / n1): 1 is linear, 2 quadratic.

    python benchmarks/scale.py --rows 50000 200000 --dims 512 --out /tmp/scale
    python benchmarks/scale.py --rows 100000 1000000 --dims 1280 --heads ridge,knn,torch-logreg --max-memory 6GB
    python benchmarks/scale.py --rows 200000 1000000 --max-memory 512MB --skip audit  # only the audit by chunks
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CHUNK = 50_000
# Class means drawn with this spread per dimension against unit noise: images of one class have cosine
# about 0.7, of two classes about 0 (as pooled features of a pretrained backbone roughly do), so the data
# has neighbourhoods an approximate index can find, and flipped labels and copies something to stand out from.
SPREAD = 1.5


def generate(folder: Path, n: int, dims: int, classes: int, seed: int = 0, copies: float = 0.005,
             flips: float = 0.02) -> dict:
    """Write ``n`` rows of parquet (id, embedding) in row groups of :data:`CHUNK`, and two label files:
    ``labels_split.csv`` (id, label, split: 80 % train) and ``labels_cv.csv`` (id, label: 5 folds). Return
    the planted copies (pairs of ids) and the flipped ids. A copy repeats a row of its own chunk with
    noise of 5 % of the noise's scale; a flip gives a row another class's label (its features keep theirs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dims)).astype(np.float32) * SPREAD
    planted, flipped = [], []
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    with (pq.ParquetWriter(folder / "embeddings.parquet", schema) as writer,
          open(folder / "labels_split.csv", "w", newline="") as split_fh,
          open(folder / "labels_cv.csv", "w", newline="") as cv_fh):
        with_split, without = csv.writer(split_fh), csv.writer(cv_fh)
        with_split.writerow(("id", "label", "split"))
        without.writerow(("id", "label"))
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            y = rng.integers(classes, size=m)
            X = means[y] + rng.normal(size=(m, dims)).astype(np.float32)
            ids = np.array([f"r{start + i:08d}" for i in range(m)])
            copy = rng.random(m) < copies
            copy[0] = False
            source = np.array([rng.integers(i) if c else i for i, c in enumerate(copy)])
            X[copy] = X[source[copy]] + 0.05 * rng.normal(size=(int(copy.sum()), dims)).astype(np.float32)
            y[copy] = y[source[copy]]
            planted += [(ids[i], ids[j]) for i, j in zip(np.flatnonzero(copy), source[copy])]
            labels = y.copy()
            flip = (rng.random(m) < flips) & ~copy
            labels[flip] = (y[flip] + rng.integers(1, classes, size=int(flip.sum()))) % classes
            flipped += list(ids[flip])
            names = np.char.add("c", labels.astype(str))
            with_split.writerows(zip(ids, names, np.where(rng.random(m) < 0.8, "train", "val")))
            without.writerows(zip(ids, names))
            embedding = pa.FixedSizeListArray.from_arrays(X.ravel(), dims).cast(pa.list_(pa.float32()))
            writer.write_table(pa.table({"id": ids, "embedding": embedding}, schema=schema))
    return dict(copies=planted, flips=flipped)


def run_stage(name: str, args: list[str], cwd: Path) -> dict:
    """Run ``args`` as a child; its wall seconds, its own peak resident memory (MB, from ``wait4``) and
    what its last output line says when that is a JSON object."""
    log = cwd / f"{name.replace(' ', '_')}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    out = dict(seconds=round(time.perf_counter() - start, 2), peak_mb=round(usage.ru_maxrss / 1024))
    code = os.waitstatus_to_exitcode(status)
    lines = log.read_text().strip().splitlines() or [""]
    if code:
        out["error"] = f"exit {code}: {lines[-1][:200]} ({log})"
    elif lines[-1].startswith("{"):
        out.update(json.loads(lines[-1]))
    print(f"  {cwd.name} {name}: {json.dumps(out)}", flush=True)  # as it lands: a long run can be followed
    return out


NEIGHBOURS = """
import sys, time, json, numpy as np
from pipeline import FeatureCache
from pipeline.similarity import NeighbourIndex, normalized
with FeatureCache(sys.argv[1]) as c:
    X = normalized(c.features("pooled"))
start = time.perf_counter()
index = NeighbourIndex(X)
built = time.perf_counter() - start
q = X[np.random.default_rng(0).choice(len(X), 200, replace=False)]
start = time.perf_counter()
for row in q:
    index.search(row[None], 10)
print(json.dumps(dict(build_s=round(built, 2), ms_per_query=round((time.perf_counter() - start) / len(q) * 1e3, 3),
                      approximate=bool(index.approximate))))
"""

PREDICT = """
import sys, time, json, numpy as np
from pipeline import FeatureCache, RunFolder, load_head
run = RunFolder(sys.argv[2])
row = run.best_row()
start = time.perf_counter()
head = load_head(run.resolve(row.head_file))
with FeatureCache(sys.argv[1]) as c:
    X = c.features("pooled", rows=np.arange(min(10000, len(c.ids))))
head.predict(X)
print(json.dumps(dict(head=row.head, rows=len(X), seconds=round(time.perf_counter() - start, 2))))
"""


def one_size(n: int, a: argparse.Namespace, root: Path) -> dict:
    """Every stage at ``n`` rows; per stage its seconds and peak MB (and what it found)."""
    here = root / f"n{n}"
    here.mkdir(parents=True, exist_ok=True)
    truth_file = here / "truth.json"
    if not truth_file.is_file():
        # in a process of its own: Linux keeps a process's peak resident memory across fork and exec, so
        # every stage started after a generation in this process would report at least its peak
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            truth_file.write_text(json.dumps(pool.submit(generate, here, n, a.dims, a.classes).result()))
    truth = json.loads(truth_file.read_text())
    exe = [sys.executable, "-m", "pipeline", "--quiet"]
    memory = ["--max-memory", a.max_memory] if a.max_memory else []
    stages = {"import": run_stage("import", [*exe, "cache", "import", "embeddings.parquet", "--out", "cache",
                                             "--overwrite"], here)}
    [cache] = sorted((here / "cache").glob("*.h5"))
    for protocol in a.protocols.split(","):
        stages[f"fit {protocol}"] = run_stage(f"fit {protocol}", [
            *exe, "fit", str(cache), "--labels", f"labels_{protocol}.csv", "--heads", a.heads, "--out",
            f"run_{protocol}", "--overwrite", *memory], here)
        stages[f"fit {protocol}"].update(scores(here / f"run_{protocol}"))
    if memory and "fit in memory" not in a.skip:  # the same heads holding the features: what reading by chunks costs
        stages["fit in memory"] = run_stage("fit in memory", [
            *exe, "fit", str(cache), "--labels", "labels_split.csv", "--heads", a.heads, "--out", "run_memory",
            "--overwrite"], here)
        stages["fit in memory"].update(scores(here / "run_memory"))
    audits = {"audit": []} | ({"audit by chunks": memory} if memory else {})  # the second over the bound reads by chunks
    for name, bound in audits.items():
        if name not in [x.strip() for x in a.skip.split(",")]:
            stages[name] = run_stage(name, [*exe, "audit", str(cache), "--labels", "labels_split.csv", "--out",
                                            name.replace(" ", "_"), "--map", "none", "--overwrite", *bound], here)
            stages[name].update(audit_quality(here / name.replace(" ", "_"), truth))
    for name, script, extra in (("neighbors", NEIGHBOURS, []), ("predict", PREDICT, [f"run_{a.protocols.split(',')[0]}"])):
        stages[name] = run_stage(name, [sys.executable, "-c", script, str(cache), *extra], here)
    return stages


def scores(run: Path) -> dict:
    """Each head's primary metric in the run's leaderboard (or its error)."""
    with open(run / "leaderboard.csv", newline="") as fh:
        return {r["head"]: round(float(r["accuracy"]), 4) if r["accuracy"] else r["error"][:60]
                for r in csv.DictReader(fh)}


def audit_quality(folder: Path, truth: dict) -> dict:
    """Recall of the planted copies among the audit's pairs; precision of its top label issues (k = flips)."""
    found = {}
    dup = folder / "duplicates.csv"
    if dup.is_file():
        with open(dup, newline="") as fh:
            pairs = {frozenset((r["id_a"], r["id_b"])) for r in csv.DictReader(fh)}
        planted = {frozenset(p) for p in truth["copies"]}
        found["copies_recall"] = round(len(planted & pairs) / max(len(planted), 1), 4)
        found["pairs"] = len(pairs)
    issues = sorted(folder.glob("label_issues_*.csv"))
    if issues:
        with open(issues[0], newline="") as fh:
            top = [r["id"] for r in csv.DictReader(fh)][:len(truth["flips"])]
        found["flips_precision"] = round(len(set(top) & set(truth["flips"])) / max(len(truth["flips"]), 1), 4)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--dims", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--heads", default="ridge,knn,torch-logreg")
    p.add_argument("--max-memory", default="")
    p.add_argument("--protocols", default="split,cv")
    p.add_argument("--out", type=Path, default=Path("/tmp/pipeline-scale"))
    p.add_argument("--skip", default="", help="stages not to run, comma-separated: audit, audit by chunks, fit in memory")
    a = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores; {a.dims} dims, {a.classes} classes, heads {a.heads}, "
          f"--max-memory {a.max_memory or 'none'}")
    results = {n: one_size(n, a, a.out) for n in a.rows}
    (a.out / "scale.json").write_text(json.dumps({str(n): r for n, r in results.items()}, indent=1))
    print(f"{'stage':<12}" + "".join(f"{n:>24,}" for n in a.rows) + "   exponent")
    for stage in results[a.rows[0]]:
        cells = [results[n][stage] for n in a.rows]
        text = "".join(f"{c['seconds']:>12.1f} s {c['peak_mb']:>7,} MB" if "error" not in c else f"{'error':>24}"
                       for c in cells)
        ok = [c for c in cells if "error" not in c]
        grow = (math.log(ok[-1]["seconds"] / ok[0]["seconds"]) / math.log(a.rows[-1] / a.rows[0])
                if len(ok) == len(cells) > 1 else float("nan"))
        print(f"{stage:<12}{text}   {grow:.2f}")
        extras = {k: v for c in cells for k, v in c.items() if k not in ("seconds", "peak_mb")}
        if extras:
            print(f"{'':<12}" + "  ".join(json.dumps({k: v for k, v in c.items() if k not in ("seconds", "peak_mb")})
                                        for c in cells))


if __name__ == "__main__":
    main()
