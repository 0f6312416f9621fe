"""Peak memory of `extract` against dataset size: it must stay flat.

Generates --images small JPEGs once, then extracts the first 1/10, 4/10 and all of them with a tiny
random-weight timm model (written to a temporary safetensors file, so nothing is downloaded), each in a
fresh process, and prints that process's peak RSS and its largest decode worker's.

    python benchmarks/extract_memory.py --images 50000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

MODEL = "test_efficientnet.r160_in1k"


def child(manifest: str, cache: str) -> None:
    from pipeline import extract

    start = time.perf_counter()
    [res] = extract(manifest, MODEL, cache, allow_outside_root=True, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(dict(extracted=res.extracted, seconds=time.perf_counter() - start, peak_mib=peak, worker_mib=workers)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import timm
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = timm.create_model(MODEL, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / f"{MODEL}.safetensors"))
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        paths = []
        for i in range(args.images):
            p = tmp / "images" / f"{i // 1000:03d}" / f"{i:06d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(p, quality=80)
            paths.append(p)
        print(f"generated {args.images} JPEGs (64x48) in {time.perf_counter() - start:.0f} s")
        env = {**os.environ, "PIPELINE_WEIGHTS_DIR": str(tmp)}
        print(f"{'images':>8} {'extracted':>9} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13} {'worker peak MiB':>16}")
        for n in sorted({max(1, args.images // 10), max(1, 4 * args.images // 10), args.images}):
            manifest = tmp / f"m{n}.csv"
            with open(manifest, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "label"])
                w.writerows([str(p), str(i % 10)] for i, p in enumerate(paths[:n]))
            out = subprocess.run([sys.executable, __file__, "--child", str(manifest), str(tmp / f"cache{n}")],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>8} {r['extracted']:>9} {r['seconds']:>8.1f} {r['extracted'] / r['seconds']:>9.0f} "
                  f"{r['peak_mib']:>13.0f} {r['worker_mib']:>16.0f}")


if __name__ == "__main__":
    main()
