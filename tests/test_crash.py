"""Crash-proof in the ways jobs really die: the main process killed alone (its decode workers must die
with it and must never hold the cache), a second writer refused before any slow work, decoders that
crash or hang their process, and file systems that keep no locks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import PATCHED_CLI, TINY, held_at, kill_when_rows, make_many, run_cli
from pipeline import FeatureCache
from pipeline.cache import schema_problems
from pipeline.locks import lock_holder

pytestmark = pytest.mark.slow  # subprocesses, kills, several processes


def _extract_cmd(data: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PATCHED_CLI), "extract", str(data), "--backbone", TINY, "--cache", str(cache),
            "--no-progress", *extra]


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"  # a zombie holds no files
    except FileNotFoundError:
        return True


def _open_files(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("moment", ["first file", "first rows", "mid-run"])
def test_main_process_killed_alone_leaves_the_cache_free_at_once(tmp_path, moment):
    """SIGKILL of the main process only (as the OOM killer does): plain h5py opens the cache the instant
    the process is gone, the decode workers die with it, and a re-run finishes the job, reusing the rows
    the killed run left. The run is held at its last image, so it is always killed before it ends."""
    data = make_many(tmp_path / "many", 240)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(_extract_cmd(data, cache, "--workers", "2", "--batch-size", "2", "--decode-timeout", "600"),
                            env={**os.environ, **held_at(tmp_path, "0238.jpg")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if moment == "first file":
        while proc.poll() is None and not list(cache.glob("*.h5")):
            time.sleep(0.002)
        seen = 0
    else:
        seen = kill_when_rows(proc, lambda: list(cache.glob("*.h5")), 4 if moment == "first rows" else 100, lambda: [])
        assert seen is not None, proc.stderr.read()
    workers = _children(proc.pid)
    [path] = cache.glob("*.h5")
    if moment != "first file":
        assert len(workers) == 2
        held = {f for w in workers for f in _open_files(w) if f.startswith(str(cache))}
        assert not held, f"a decode worker holds {held}"
    os.kill(proc.pid, signal.SIGKILL)  # the main process alone, not its group
    proc.wait()
    with h5py.File(path, "r") as f:  # plain h5py, with HDF5's file locking, at once
        assert schema_problems(f, scan_values=True) == []  # whole rows: finite features, failures of known ids
        left = int(f["valid"][()].sum())
        assert seen <= left < 240 and not f.attrs["complete"]
    assert lock_holder(path) is None
    deadline = time.time() + 2
    while not all(map(_gone, workers)) and time.time() < deadline:
        time.sleep(0.01)
    assert all(map(_gone, workers)), "decode workers outlived the main process"
    again = run_cli("extract", data, "--backbone", TINY, "--cache", cache, "--workers", "2", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"extracted {240 - left}, reused from cache {left}," in again.stdout, again.stdout
    with FeatureCache(next(cache.glob("*.h5"))) as c:
        assert c.valid.all() and c.attrs["complete"]


def test_second_writer_is_refused_before_any_slow_work(tmp_path):
    """The second writer takes the lock before it lists, hashes or loads a model, so it is refused at
    once; the first goes on and finishes."""
    data = make_many(tmp_path / "many", 240)
    cache = tmp_path / "cache"
    first_log, second_log = tmp_path / "first.events", tmp_path / "second.events"
    first = subprocess.Popen(_extract_cmd(data, cache, "--workers", "0", "--batch-size", "2"),
                             env={**os.environ, "PIPELINE_TEST_EVENTS": str(first_log), **held_at(tmp_path, "0121.jpg")},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert kill_when_rows(first, lambda: list(cache.glob("*.h5")), 2, lambda: []) is not None, first.stderr.read()
        start = time.perf_counter()
        second = subprocess.run(_extract_cmd(data, cache), env={**os.environ, "PIPELINE_TEST_EVENTS": str(second_log)},
                                capture_output=True, text=True, timeout=120)
        seconds = time.perf_counter() - start
        still_writing = first.poll() is None
        start = time.perf_counter()  # the same start-up, probes and imports, and nothing else, beside the same first writer
        path = os.pathsep.join([str(PATCHED_CLI.parent), os.environ.get("PYTHONPATH", "")])
        subprocess.run([sys.executable, "-c", "import patched_cli, cli, pipeline.stages.extract"], check=True,
                       env={**os.environ, "PYTHONPATH": path, "PIPELINE_TEST_EVENTS": str(tmp_path / "imports.events")})
        print(f"\nsecond writer refused {seconds:.2f} s after its start; starting Python with the same imports alone: "
              f"{time.perf_counter() - start:.2f} s")
    finally:
        (tmp_path / "gate").touch()
        out, err = first.communicate(timeout=300)
    assert second.returncode == 1 and f"being written by another process (pid {first.pid})" in second.stderr, second.stderr
    assert still_writing  # refused while the first was writing, not after it ended
    assert not second_log.exists(), f"the second writer worked before it was refused: {second_log.read_text()}"
    events = [line.split()[2] for line in first_log.read_text().splitlines()]
    assert events[0] == "list" and "hash" in events and "model" in events  # the probes see what a run does
    assert first.returncode == 0 and "extracted 240" in out, err


def test_a_decoder_that_crashes_or_hangs_costs_only_its_image(tmp_path):
    """A segfault, an abort, an out-of-memory kill and a hang, each on one file, in batches with good
    images: those four are recorded failures with the reason, every other image has its features (the
    same as a run without faults), and the run exits 0."""
    data = make_many(tmp_path / "many", 40)
    faults = {"0005.jpg": "segv", "0011.jpg": "abort", "0016.jpg": "oom", "0022.jpg": "hang"}
    env = {**os.environ, "PIPELINE_TEST_FAULTS": ",".join(f"{k}:{v}" for k, v in faults.items())}
    start = time.perf_counter()
    r = subprocess.run(_extract_cmd(data, tmp_path / "cache", "--workers", "2", "--batch-size", "4",
                                    "--decode-timeout", "5", "--amp", "off"),
                       env=env, capture_output=True, text=True, timeout=300)
    print(f"\nrun with four faulty files: {time.perf_counter() - start:.1f} s; {r.stdout.strip()}")
    assert r.returncode == 0, r.stderr
    assert "extracted 36, reused from cache 0, failed 4" in r.stdout
    clean = run_cli("extract", data, "--backbone", TINY, "--cache", tmp_path / "clean", "--workers", "0", "--amp", "off",
                    "--no-progress")
    assert clean.returncode == 0, clean.stderr
    with FeatureCache(next((tmp_path / "cache").glob("*.h5"))) as c, \
            FeatureCache(next((tmp_path / "clean").glob("*.h5"))) as ref:
        failures = {sid.split("/")[-1]: (stage, reason) for sid, stage, reason in c.failures}
        assert sorted(failures) == sorted(faults)
        for name, signal_name in (("0005.jpg", "SIGSEGV"), ("0011.jpg", "SIGABRT"), ("0016.jpg", "SIGKILL")):
            stage, reason = failures[name]
            assert stage == "decode" and f"crashed its worker process, which was killed by {signal_name}" in reason
        assert failures["0022.jpg"] == ("decode", "decoding took over 5 s; its worker process was killed")
        good = np.array([sid.split("/")[-1] not in faults for sid in c.ids])
        assert (c.valid == good).all() and c.attrs["complete"]
        assert list(c.ids) == list(ref.ids)
        np.testing.assert_allclose(c.features()[good], ref.features()[good], rtol=2e-3, atol=2e-3)


def test_in_process_decoding_is_not_isolated_but_the_cache_stays_whole(tmp_path):
    """``--workers 0`` decodes in the main process: a crash there ends the run (nothing can catch a
    segfault in-process), the cache it leaves opens, and a run with workers records the file and finishes."""
    data = make_many(tmp_path / "many", 24)
    env = {**os.environ, "PIPELINE_TEST_FAULTS": "0017.jpg:segv"}
    cache = tmp_path / "cache"
    r = subprocess.run(_extract_cmd(data, cache, "--workers", "0", "--batch-size", "4"), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGSEGV
    for path in cache.glob("*.h5"):
        with FeatureCache(path) as c:
            assert not c.attrs["complete"]
    r = subprocess.run(_extract_cmd(data, cache, "--workers", "1", "--batch-size", "4"), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "failed 1" in r.stdout, r.stderr


_NO_FLOCK = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* flock() on a file under $NOFLOCK_UNDER fails with ENOLCK; elsewhere it is the C library's. */
int flock(int fd, int op) {
    char link[64], path[4096];
    const char *under = getenv("NOFLOCK_UNDER");
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (under && n > 0) {
        path[n] = 0;
        if (strncmp(path, under, strlen(under)) == 0) { errno = ENOLCK; return -1; }
    }
    int (*real)(int, int) = (int (*)(int, int))dlsym(RTLD_NEXT, "flock");
    return real(fd, op);
}
"""


def _no_flock_library(tmp_path: Path) -> Path:
    """A shared library whose flock() fails with ENOLCK under one directory, as on NFS without its lock
    daemon: preloaded, it stands in for the C library's in Python's fcntl.flock and in HDF5's locking."""
    src = tmp_path / "noflock.c"
    src.write_text(_NO_FLOCK)
    lib = tmp_path / "libnoflock.so"
    try:
        r = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no C compiler (cc) to build the flock stand-in with")
    assert r.returncode == 0, r.stderr
    return lib


def test_a_file_system_without_locks(tmp_path):
    """Every flock() fails with ENOLCK: h5py alone cannot open a file there; the pipeline says so in one
    line, opens HDF5 with its locking off, guards the cache with its own writer file, refuses a second
    writer, and a run killed there leaves a writer file that the next run on this host replaces."""
    env = {**os.environ, "LD_PRELOAD": str(_no_flock_library(tmp_path)), "NOFLOCK_UNDER": str(tmp_path.resolve())}
    plain = subprocess.run([sys.executable, "-c", "import h5py; h5py.File('x.h5', 'w')"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert plain.returncode != 0 and "unable to lock file, errno = 37" in plain.stderr  # what users hit without the fallback

    data = make_many(tmp_path / "many", 400)
    cache = tmp_path / "cache"
    first = subprocess.Popen(_extract_cmd(data, cache, "--workers", "1", "--batch-size", "1", "--decode-timeout", "600"),
                             env={**env, **held_at(tmp_path, "0201.jpg")},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert kill_when_rows(first, lambda: list(cache.glob("*.h5")), 4, lambda: []) is not None, first.stderr.read()
        [path] = cache.glob("*.h5")
        writer_file = path.with_name(path.name + ".writer")
        assert writer_file.read_text().split()[1] == str(first.pid)
        second = subprocess.run(_extract_cmd(data, cache), env=env, capture_output=True, text=True, timeout=120)
        reader = subprocess.run([sys.executable, "-m", "pipeline", "cache", "info", str(path)], env=env,
                                capture_output=True, text=True)
        assert first.poll() is None, "the first run ended too soon to test a second writer against it"
        assert second.returncode == 1 and f"being written by another process (pid {first.pid})" in second.stderr
        assert reader.returncode == 1 and f"(pid {first.pid})" in reader.stderr
    finally:
        first.kill()  # killed: its writer file stays behind
        first.wait()
    assert writer_file.exists()
    r = subprocess.run(_extract_cmd(data, cache, "--workers", "1"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "keeps no file locks" in line]
    assert len(notes) == 1 and "No locks available" in notes[0] and str(cache.resolve()) in notes[0], r.stderr
    assert not writer_file.exists()
    info = subprocess.run([sys.executable, "-m", "pipeline", "cache", "info", str(path)], env=env,
                          capture_output=True, text=True)
    assert info.returncode == 0 and "400 valid" in info.stdout, info.stderr
