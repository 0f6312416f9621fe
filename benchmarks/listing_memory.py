"""Peak memory of listing and hashing a large source: a CSV manifest of small files, webdataset tar
shards, or a parquet file, generated with N samples of a few hundred bytes each (listing and hashing
never decode, so the bytes need not be images).

Prints, per format: the samples, the seconds, the process's peak RSS growth, Python's traced peak
(``tracemalloc``) per sample, and that peak less the columns a cache stores anyway (ids, label and
split pointers, 32-byte hashes). With ``--rate``, without ``tracemalloc`` (which slows Python several
times): the samples listed and hashed per second, the median of ``--repeats`` runs (the files cached by
the operating system after the first; ``folder`` is a class-per-folder tree of files), and the same
for a re-run that knows the first one's file stamps (``Stamps``, as a cache keeps them: a file whose
size and modification time are unchanged is not read again), with its cost as a share of the first's.
The files are dated an hour back (a re-run comes later). ``--bytes`` sets each sample's size.

    python benchmarks/listing_memory.py --n 1000000 --formats shards,parquet,manifest
    python benchmarks/listing_memory.py --n 100000 --formats folder,manifest,shards,parquet --rate
    python benchmarks/listing_memory.py --n 20000 --bytes 100000 --formats folder,manifest --rate
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

from pipeline import load_source
from pipeline.sources import Stamps


def make(fmt: str, n: int, root: Path, size: int = 300) -> Path:
    blob = b"\xff\xd8" + bytes(size)
    an_hour_ago = time.time() - 3600

    def write(path: Path, i: int) -> None:
        path.write_bytes(blob + i.to_bytes(4, "little"))
        os.utime(path, (an_hour_ago, an_hour_ago))

    if fmt == "folder":
        for i in range(n):
            (root / "data" / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
            write(root / "data" / f"c{i % 10}" / f"{i:07d}.jpg", i)
        return root / "data"
    if fmt == "manifest":
        (root / "img").mkdir()
        with open(root / "m.csv", "w") as fh:
            fh.write("path,label\n")
            for i in range(n):
                write(root / "img" / f"{i:07d}.jpg", i)
                fh.write(f"img/{i:07d}.jpg,c{i % 10}\n")
        return root / "m.csv"
    if fmt == "shards":
        per = 10_000
        for s in range(0, n, per):
            with tarfile.open(root / f"part-{s // per:06d}.tar", "w") as tar:
                for i in range(s, min(s + per, n)):
                    for ext, data in (("jpg", blob + i.to_bytes(4, "little")), ("cls", f"c{i % 10}".encode())):
                        info = tarfile.TarInfo(f"{i:07d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return root
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(root / "p.parquet", pa.schema([("jpg", pa.binary()), ("label", pa.string())])) as writer:
        for s in range(0, n, 100_000):
            idx = range(s, min(s + 100_000, n))
            writer.write_table(pa.table({"jpg": [blob + i.to_bytes(4, "little") for i in idx],
                                         "label": [f"c{i % 10}" for i in idx]}), row_group_size=1000)
    return root / "p.parquet"


def measure(data: Path, n: int) -> dict:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    src = load_source(data)
    hashes, _, _ = src.content_hashes()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    stored = sum(len(i) + 49 + 8 for i in src.ids) + 16 * len(src) + hashes.nbytes
    return dict(samples=len(src), seconds=seconds, rss_mib=rss / 1024, traced=peak / n, beyond=(peak - stored) / n)


def rate(data: Path, repeats: int) -> tuple[int, float, float]:
    """Samples, and samples listed and hashed per second, first and with the first's stamps known
    (medians of ``repeats``), without tracemalloc."""
    first, again = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        src = load_source(data)
        hashes, _, stamps = src.content_hashes()
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_source(data).content_hashes(known=Stamps(src.ids, stamps, hashes))
        again.append(time.perf_counter() - start)
    return len(src), len(src) / statistics.median(first), len(src) / statistics.median(again)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--formats", default="shards,parquet,manifest")
    ap.add_argument("--rate", action="store_true", help="samples per second without tracemalloc")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bytes", type=int, default=300, help="each sample's size")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one format, in a process of its own (RSS is a high-water mark)
    args = ap.parse_args()
    if args.one and args.rate:
        with tempfile.TemporaryDirectory() as tmp:
            n, speed, rerun = rate(make(args.one, args.n, Path(tmp), args.bytes), args.repeats)
        print(f"| {args.one} | {n:,} | {speed:,.0f} | {rerun:,.0f} | {speed / rerun:.1%} |", flush=True)
        return
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            data = make(args.one, args.n, Path(tmp), args.bytes)
            m = measure(data, args.n)
        print(f"| {args.one} | {m['samples']:,} | {m['seconds']:.1f} | {m['rss_mib']:.0f} | {m['traced']:.0f} | "
              f"{m['beyond']:.0f} |", flush=True)
        return
    if args.rate:
        print(f"| format | samples | listed and hashed per s | re-run, stamps known, per s | re-run's cost of the first |\n"
              "| --- | --- | --- | --- | --- |", flush=True)
    else:
        print("| format | samples | list + hash s | peak RSS growth MiB | traced peak bytes/sample | beyond the cache's columns |")
        print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for fmt in args.formats.split(","):
        subprocess.run([sys.executable, __file__, "--n", str(args.n), "--one", fmt, "--repeats", str(args.repeats),
                        "--bytes", str(args.bytes), *(["--rate"] if args.rate else [])], check=True)


if __name__ == "__main__":
    main()
