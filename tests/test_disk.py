"""A real full file system and a real read-only one (small tmpfs mounts; needs root, else skipped): the
run ends with one line and exit 1, and the cache is as it was before the failed batch."""

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TINY, make_many, run_cli

pytestmark = pytest.mark.slow  # subprocesses, kills, several processes


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _extract(data: Path, cache: Path, batch: int = 8) -> subprocess.CompletedProcess:
    return run_cli("extract", data, "--backbone", TINY, "--cache", cache, "--batch-size", batch, "--workers", "0",
                   "--dtype", "float32", "--taps", "pooled,logits", "--no-progress")


def _snapshot(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        valid = f["valid"][()]
        return {sid.decode(): row for sid, row, ok in zip(f["ids"][()], f["features/pooled"][()], valid) if ok}


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path]:
    """A folder of 16 images, and another holding those plus 584 more (more than one 256-row chunk, so
    the file must grow), copied into the first when the test grows it."""
    many = make_many(tmp_path / "all" / "imgs", 600)
    few = tmp_path / "part" / "imgs"
    for p in sorted(many.glob("a/*.jpg"))[:8] + sorted(many.glob("b/*.jpg"))[:8]:
        (few / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, few / p.parent.name / p.name)
    return few, many


def test_disk_full_mid_run_keeps_the_cache_as_it_was(images, tmp_path):
    few, many = images
    reference = _extract(many, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr
    [ref_file] = (tmp_path / "ref").glob("*.h5")
    ref = _snapshot(ref_file)
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        # The first run fits (one chunk of 256 rows); then a filler leaves too little room for a second.
        assert _extract(few, mnt / "cache").returncode == 0
        [path] = (mnt / "cache").glob("*.h5")
        before = _snapshot(path)
        assert len(before) == 16
        filler = mnt / "filler"
        free = shutil.disk_usage(mnt).free
        filler.write_bytes(b"\0" * max(0, free - 256 * 1024))  # a chunk of 256 rows of 1,000 logits is 1 MB
        shutil.copytree(many, few, dirs_exist_ok=True)  # the same data source, grown
        r = _extract(few, mnt / "cache")
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        after = _snapshot(path)  # opens with plain h5py
        assert set(before) < set(after) < set(ref)  # the batches before the full disk are kept
        for sid, row in after.items():  # every row marked valid is whole and right
            np.testing.assert_allclose(row, ref[sid], rtol=1e-4, atol=1e-4)
        filler.unlink()
        again = _extract(few, mnt / "cache")
        assert again.returncode == 0, again.stderr
        done = _snapshot(path)
        assert set(done) == set(ref)
        for sid, row in done.items():
            np.testing.assert_allclose(row, ref[sid], rtol=1e-4, atol=1e-4)


def test_read_only_cache_dir_is_one_line_and_untouched(images, tmp_path):
    few, many = images
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        assert _extract(few, mnt / "cache").returncode == 0
        [path] = (mnt / "cache").glob("*.h5")
        before = path.read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        shutil.copytree(many, few, dirs_exist_ok=True)
        r = _extract(few, mnt / "cache")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "Read-only file system" in r.stderr and str(mnt / "cache") in r.stderr, r.stderr
        assert path.read_bytes() == before
        # fit reads a cache on a read-only mount, and a run directory there is refused in one line
        ok = run_cli("fit", path, "--out", tmp_path / "run", "--heads", "knn", "--no-progress")
        assert ok.returncode == 0, ok.stderr
        bad = run_cli("fit", path, "--out", mnt / "run", "--heads", "knn", "--no-progress")
        assert bad.returncode == 1 and "Traceback" not in bad.stderr and "Read-only file system" in bad.stderr, bad.stderr
