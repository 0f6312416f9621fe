"""`python tests/patched_cli.py ARGS...`: the `pipeline` command with faults and probes put in on purpose.

- ``PIPELINE_TEST_FAULTS="name:fault,..."``: decoding the file called ``name`` segfaults (``segv``),
  aborts (``abort``), is killed as the out-of-memory killer would (``oom``) or never returns (``hang``),
  inside whatever process decodes it, or waits until the file named by ``PIPELINE_TEST_GATE`` exists
  (``gate``), so a test holds a run mid-way for as long as it needs.
- ``PIPELINE_TEST_EVENTS=FILE``: appends one line per event (``list``, ``hash``, ``model``) with the time,
  to see what a run did before it stopped.
"""

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import pipeline.data as data

FAULTS = dict(f.split(":") for f in os.environ.get("PIPELINE_TEST_FAULTS", "").split(",") if f)
EVENTS = os.environ.get("PIPELINE_TEST_EVENTS")


def _fault(kind: str) -> None:
    if kind == "segv":
        ctypes.string_at(0)  # a real invalid read
    elif kind == "abort":
        os.abort()
    elif kind == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        time.sleep(3600)
    elif kind == "gate":
        while not Path(os.environ["PIPELINE_TEST_GATE"]).exists():
            time.sleep(0.01)


def _event(name: str, fn):
    def logged(*args, **kwargs):
        with open(EVENTS, "a") as fh:
            fh.write(f"{time.time():.6f} {os.getpid()} {name}\n")
        return fn(*args, **kwargs)
    return logged


if FAULTS:  # every decode path reads an image's bytes through data.read_bytes
    real_read_bytes = data.read_bytes

    def read_bytes(path, *args, **kwargs):
        name = Path(path).name if isinstance(path, (str, os.PathLike)) else None  # not a tar or parquet member
        if name in FAULTS:
            _fault(FAULTS[name])
        return real_read_bytes(path, *args, **kwargs)

    data.read_bytes = read_bytes

if EVENTS:
    import pipeline.backbones as backbones
    import pipeline.sources as sources

    sources.load_source = _event("list", sources.load_source)
    sources.content_hash = _event("hash", sources.content_hash)
    backbones.load_backbone = _event("model", backbones.load_backbone)

if __name__ == "__main__":
    from cli import main

    sys.argv[0] = "pipeline"
    main()
