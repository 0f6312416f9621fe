"""How soon a second `pipeline extract` on a cache that is being written is refused, against what
starting Python and importing the CLI and the extract stage alone take.

Starts a first writer, waits until it has written --rows rows, then times a second, identical command
from its start to its exit; then times `python -c "import cli, pipeline.stages.extract"` while the first
still runs (so both figures see the same load). Repeats --repeats times.

    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/second_writer.py DATA --backbone tf_efficientnet_lite0.in1k
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py


def valid_rows(cache: Path) -> int:
    for path in cache.glob("*.h5"):
        try:
            with h5py.File(path, "r", locking=False) as f:
                return int(f["valid"][()].sum())
        except (OSError, KeyError):
            pass
    return 0


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - start, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0.in1k")
    ap.add_argument("--rows", type=int, default=32, help="rows the first writer has written when the second starts")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pipeline", "extract", args.data, "--backbone", args.backbone, "--cache", tmp,
                   "--workers", "1", "--no-progress"]
            first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while valid_rows(Path(tmp)) < args.rows and first.poll() is None:
                    time.sleep(0.1)
                seconds, second = timed(cmd)
                imports, _ = timed([sys.executable, "-c", "import cli, pipeline.stages.extract"])
                assert first.poll() is None, "the first writer ended before the second was refused; use more images"
            finally:
                first.kill()
                first.wait()
        verdict = "refused" if second.returncode == 1 and "being written by another process" in second.stderr else "NOT refused"
        print(f"second writer {verdict} after {seconds:.2f} s from its start; starting Python and importing the CLI "
              f"and pipeline.stages.extract alone: {imports:.2f} s; difference {seconds - imports:+.2f} s")


if __name__ == "__main__":
    main()
