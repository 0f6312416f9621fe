"""The issue's small-scale goal: about 7,000 images with a classes, a tags and a numbers task, the
default heads, 5 folds, in at most 5 minutes. Generated embeddings (``--dims`` wide, lite0's 1,280 by
default) with a class each (``--classes`` Gaussian classes), tags that follow the class (one to three of
10 per class, each dropped for 10 % of the images) and a number that is a linear function of the features
plus noise, written as one parquet file with ``label``, ``labels`` and ``target`` columns, brought in with
``pipeline cache import`` (which writes a label file per column), then ``pipeline fit`` on the three
tasks in one process (no split column: 5-fold cross-validation). Prints the wall seconds, the peak
resident memory of the largest process (``wait4``) and the seconds each head's jobs took (``run.json``).

    python benchmarks/three_tasks.py [--rows 7000] [--dims 1280] [--out /tmp/three-tasks]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(path: Path, n: int, dims: int, classes: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = (rng.normal(size=(classes, dims))[y] + 1.5 * rng.normal(size=(n, dims))).astype(np.float32)
    tags_of = [rng.choice(10, size=rng.integers(1, 4), replace=False) for _ in range(classes)]
    tags = ["|".join(f"t{t}" for t in sorted(tags_of[c]) if rng.random() > 0.1) for c in y]
    target = X @ (rng.normal(size=dims) / np.sqrt(dims)) + 0.5 * rng.normal(size=n)
    pq.write_table(pa.table({"id": [f"img/{i:05d}.jpg" for i in range(n)], "embedding": list(X),
                             "label": [f"c{c}" for c in y], "labels": tags, "target": target}), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=7000)
    p.add_argument("--dims", type=int, default=1280)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("/tmp/three-tasks"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    generate(a.out / "emb.parquet", a.rows, a.dims, a.classes)
    exe = [sys.executable, "-m", "pipeline", "--quiet"]
    subprocess.run([*exe, "cache", "import", "emb.parquet", "--out", "cache", "--overwrite"], cwd=a.out, check=True)
    [cache] = sorted((a.out / "cache").glob("*.h5"))
    labels = [x for column in ("labels", "target") for x in ("--labels", str(cache.with_suffix(f".{column}.csv")))]
    start = time.perf_counter()
    proc = subprocess.Popen([*exe, "fit", str(cache), *labels, "--out", "run", "--overwrite"], cwd=a.out)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"fit failed (exit {os.waitstatus_to_exitcode(status)})")
    heads = json.loads((a.out / "run" / "run.json").read_text())[-1]["timings"]["heads"]
    print(f"{a.rows:,} rows x {a.dims:,}, classes + tags + numbers, default heads, 5 folds: fit {seconds:.1f} s "
          f"(goal 300 s), peak {usage.ru_maxrss // 1024:,} MB; job seconds per head, summed over workers: "
          + ", ".join(f"{h} {s:.1f}" for h, s in sorted(heads.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
