"""A run killed with SIGKILL mid-extraction leaves a cache that opens, whose valid rows are whole, and
that the next run completes by computing only the rest."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import PATCHED_CLI, TINY, held_at, kill_when_rows, make_many, run_cli, valid_rows
from pipeline import FeatureCache, extract, fit

pytestmark = pytest.mark.slow  # subprocesses, kills, several processes


def _start_extract(data, cache_dir, stderr=subprocess.DEVNULL, hold: dict[str, str] | None = None) -> subprocess.Popen:
    """`pipeline extract` in a subprocess, in small batches so there are many moments to interrupt; with
    ``hold`` (:func:`~conftest.held_at`), the test CLI held at an image, so it is still running when looked at."""
    cli = [str(PATCHED_CLI)] if hold else ["-m", "pipeline"]
    return subprocess.Popen(
        [sys.executable, *cli, "extract", str(data), "--backbone", TINY, "--cache", str(cache_dir),
         "--batch-size", "2", "--workers", "0", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **(hold or {})},
    )


def test_kill_mid_run_then_resume(tmp_path):
    data = make_many(tmp_path / "many")
    cache_dir = tmp_path / "cache"
    proc = _start_extract(data, cache_dir, stderr=subprocess.PIPE)
    killed_at = kill_when_rows(proc, lambda: list(cache_dir.glob("*.h5")), 20, lambda: [proc.pid])
    proc.wait()
    assert killed_at is not None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
    [path] = cache_dir.glob("*.h5")
    with FeatureCache(path) as c:  # opens normally after SIGKILL
        done = c.valid.copy()
        partial = c.features()
    assert 20 <= done.sum() < 240

    [clean] = extract(data, TINY, tmp_path / "clean", workers=0, progress=False)
    expected = FeatureCache(clean.cache).features()
    np.testing.assert_allclose(partial[done], expected[done], rtol=2e-3, atol=2e-3)

    [resumed] = extract(data, TINY, cache_dir, workers=0, progress=False)
    assert resumed.extracted == 240 - done.sum() and resumed.reused == done.sum()
    with FeatureCache(resumed.cache) as c:
        assert c.valid.all() and c.attrs["complete"]
        np.testing.assert_allclose(c.features(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("trigger", ["0.5s", "1.5s", "3s", "first file"])
def test_kill_at_any_moment_then_resume(tmp_path, trigger):
    """Killed during imports and model load, while the cache file is being created, or in the first
    batches: whatever is left opens (or is absent), and the re-run reuses its rows and ends with a clean
    run's features. The run is held at its last image, so the kill always comes before its end."""
    data = make_many(tmp_path / "many", 120)
    cache_dir = tmp_path / "cache"
    proc = _start_extract(data, cache_dir, hold=held_at(tmp_path, "0118.jpg"))
    deadline = time.time() + (float(trigger[:-1]) if trigger.endswith("s") else 60)
    while time.time() < deadline and proc.poll() is None:
        if trigger == "first file" and cache_dir.is_dir() and any(cache_dir.iterdir()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run stopped before it was killed"
    proc.kill()
    proc.wait()
    left = 0
    for path in cache_dir.glob("*.h5"):
        with FeatureCache(path) as c:  # whatever was left is a cache that opens
            left = int(c.valid.sum())
            assert left < 120 and not c.attrs["complete"]
    [resumed] = extract(data, TINY, cache_dir, workers=0, progress=False)
    assert resumed.reused == left and resumed.extracted == 120 - left
    [clean] = extract(data, TINY, tmp_path / "clean", workers=0, progress=False)
    with FeatureCache(resumed.cache) as a, FeatureCache(clean.cache) as b:
        assert a.valid.all() and a.attrs["complete"] and list(a.ids) == list(b.ids)
        np.testing.assert_allclose(a.features(), b.features(), rtol=2e-3, atol=2e-3)


def test_sigterm_keeps_the_written_rows_and_says_how_to_go_on(tmp_path):
    """SIGTERM (as Ctrl-C) ends an extract with one line on what it kept and exit status 130; the same
    command then extracts exactly the rest."""
    data = make_many(tmp_path / "many", 120)
    cache_dir = tmp_path / "cache"
    proc = _start_extract(data, cache_dir, stderr=subprocess.PIPE, hold=held_at(tmp_path, "0118.jpg"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and valid_rows(list(cache_dir.glob("*.h5"))) < 100:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, err
    said = re.fullmatch(r"interrupted: (\d+) image\(s\) written to (.+\.h5) and kept, (\d+) still to extract; "
                        r"the same command extracts the rest\n", err)
    assert said, err
    kept, path, rest = int(said[1]), said[2], int(said[3])
    assert kept + rest == 120 and kept >= 100
    with FeatureCache(path) as c:
        assert int(c.valid.sum()) == kept
    [resumed] = extract(data, TINY, cache_dir, workers=0, progress=False)
    assert (resumed.reused, resumed.extracted) == (kept, rest)


def test_reader_during_a_write_is_told_who_writes(tmp_path):
    data = make_many(tmp_path / "many")
    cache_dir = tmp_path / "cache"
    proc = _start_extract(data, cache_dir, hold=held_at(tmp_path, "0121.jpg"))
    try:
        assert kill_when_rows(proc, lambda: list(cache_dir.glob("*.h5")), 4, lambda: []) is not None
        [path] = cache_dir.glob("*.h5")
        r = run_cli("cache", "info", path)
        assert proc.poll() is None  # held at 0121.jpg: still writing when the reader looked
        assert r.returncode == 1 and f"being written by another process (pid {proc.pid})" in r.stderr, r.stderr
    finally:
        (tmp_path / "gate").touch()
        proc.wait(timeout=120)
    assert proc.returncode == 0
    assert run_cli("cache", "info", path).returncode == 0  # and readable once it is done


def _whole(run) -> int:
    """Every output file of a fit run directory (not the hidden temporaries) parses whole; how many."""
    from pipeline import load_head

    files = [p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".skops":
            load_head(p)
        elif p.suffix == ".csv":
            rows = list(csv.reader(p.open()))
            assert rows and all(len(r) == len(rows[0]) for r in rows), p
        elif p.suffix == ".png":
            assert p.read_bytes()[-8:] == b"IEND\xaeB`\x82", p  # a PNG ends with its IEND chunk
        elif p.suffix == ".html":
            assert p.read_text().endswith("</html>"), p
    return len(files)


@pytest.mark.parametrize("trigger", ["first head file", "ten head files", "leaderboard.csv"])
def test_fit_killed_while_writing_leaves_only_whole_files(tiny_run, tmp_path, trigger):
    run = tmp_path / "run"
    heads = "logreg,mlp,knn,torch-logreg,linear-svm,ridge,centroid"
    args = [sys.executable, "-m", "pipeline", "fit", str(tiny_run["cache"]), "--out", str(run), "--heads", heads,
            "--n-jobs", "1", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    ready = {
        "first head file": lambda: len(list(run.glob("heads/*"))) >= 1,
        "ten head files": lambda: len(list(run.glob("heads/*"))) >= 10,
        "leaderboard.csv": lambda: (run / "leaderboard.csv").exists(),
    }[trigger]
    deadline = time.time() + 120
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    _whole(run)
    if (run / "leaderboard.json").exists():  # rows are saved as they finish: each one kept has its head file
        kept = json.loads((run / "leaderboard.json").read_text())
        assert all((run / r["head_file"]).is_file() for r in kept if r.get("head_file"))
    again = run_cli("fit", tiny_run["cache"], "--out", run, "--heads", heads, "--n-jobs", "1", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert _whole(run) >= 7 * 3 + 4  # a head, its card and its predictions per row; leaderboard x3, report
    rows = json.loads((run / "leaderboard.json").read_text())
    reference = fit(tiny_run["cache"], tmp_path / "ref", heads=heads.split(","), n_jobs=1, progress=False).rows
    assert sorted((r["head"], r["accuracy"]) for r in rows) == sorted((r.head, r.metrics["accuracy"]) for r in reference)
