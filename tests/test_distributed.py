"""`torchrun` extraction on CPU with the gloo backend: two ranks write shards, rank 0 a cache over them
through HDF5 virtual datasets that reads like any other; the features equal a single process's, and a
run killed with SIGKILL resumes with only the unfinished rows."""

import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TINY, kill_when_rows, make_many, run_cli, valid_rows
from pipeline import FeatureCache, PipelineError, extract

pytestmark = pytest.mark.slow  # subprocesses, kills, several processes


def _torchrun(*args: str, per_rank_folders: bool = False, **popen) -> subprocess.Popen:
    """Two ranks extracting; with ``per_rank_folders``, ``{rank}`` in the arguments is each rank's number
    (tests/rank_local_cli.py), so each writes into its own folder as nodes without a shared file system do."""
    program = [str(Path(__file__).with_name("rank_local_cli.py"))] if per_rank_folders else ["-m", "pipeline"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *program, "extract", *map(str, args), "--workers", "0", "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _by_id(path: Path) -> dict[str, np.ndarray]:
    with FeatureCache(path) as c:
        assert c.valid.all()
        return dict(zip(c.ids, c.features()))


def _counts(stdout: str) -> tuple[int, int]:
    m = re.search(r"extracted (\d+), reused from cache (\d+)", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


def test_two_ranks_equal_one_process(folder, tmp_path):
    proc = _torchrun(folder, "--backbone", TINY, "--cache", tmp_path / "dist")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _counts(out) == (36, 0)  # rank 0 reports the sum over both ranks
    [master] = (tmp_path / "dist").glob("*.h5")
    shards = sorted((tmp_path / "dist").glob("*.shards/rank*-of-2.h5"))
    assert len(shards) == 2
    with h5py.File(master, "r") as f:  # plain h5py: features are virtual datasets over both shards
        assert f["features/pooled"].is_virtual and f.attrs["complete"]
        sizes = [h5py.File(s, "r")["ids"].shape[0] for s in shards]
        assert all(sizes) and sum(sizes) == f["ids"].shape[0] == 36

    [single] = extract(folder, TINY, tmp_path / "single", workers=0, progress=False)
    assert single.cache.name == master.name  # same key: same weights, preprocessing, dtype
    a, b = _by_id(master), _by_id(single.cache)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2e-3)

    info = run_cli("cache", "info", master)
    assert info.returncode == 0 and "virtual over 2 shard files" in info.stdout
    fit = run_cli("fit", master, "--out", tmp_path / "run", "--heads", "knn", "--no-progress")
    assert fit.returncode == 0, fit.stderr

    # The cache belongs to 2-process runs: a single process is told how to update it.
    with pytest.raises(PipelineError, match="torchrun --nproc-per-node 2"):
        extract(folder, TINY, tmp_path / "dist", workers=0, progress=False)
    again = _torchrun(folder, "--backbone", TINY, "--cache", tmp_path / "dist")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and _counts(out) == (0, 36), err


def test_missing_shard_is_an_error_not_zeros(folder, tmp_path):
    proc = _torchrun(folder, "--backbone", TINY, "--cache", tmp_path / "dist")
    assert proc.wait(timeout=300) == 0
    [master] = (tmp_path / "dist").glob("*.h5")
    next((tmp_path / "dist").glob("*.shards/rank1-of-2.h5")).unlink()
    with pytest.raises(PipelineError, match="shard files that are missing"):
        FeatureCache(master)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_killed_distributed_run_resumes_unfinished_rows(tmp_path):
    data = make_many(tmp_path / "many")
    cache = tmp_path / "dist"
    proc = _torchrun(data, "--backbone", TINY, "--cache", cache, "--batch-size", "2")
    shards = lambda: list(cache.glob("*.shards/*.h5"))  # noqa: E731
    # What a scheduler does: SIGKILL to the launcher and to every worker (they run in their own sessions).
    killed_at = kill_when_rows(proc, shards, 20, lambda: [*_children(proc.pid), proc.pid])
    proc.communicate()
    assert killed_at is not None, "the run ended before it could be killed"
    assert not list(cache.glob("*.h5")), "no cache over the shards before every rank finished"
    done = valid_rows(shards())
    assert 20 <= done < 240

    resumed = _torchrun(data, "--backbone", TINY, "--cache", cache, "--batch-size", "2")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _counts(out) == (240 - done, done)
    [master] = cache.glob("*.h5")
    [clean] = extract(data, TINY, tmp_path / "clean", workers=0, progress=False)
    a, b = _by_id(master), _by_id(clean.cache)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2e-3)


def test_ranks_without_a_shared_file_system_are_merged_by_content_hash(folder, tmp_path):
    """Each rank writes its shard into its own folder: rank 0 writes no cache over shards it cannot see and
    says so; `pipeline cache merge` joins the two folders into a cache equal to one process's, and a
    second merge adds nothing."""
    proc = _torchrun(folder, "--backbone", TINY, "--cache", tmp_path / "node{rank}", per_rank_folders=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _counts(out) == (36, 0) and "note: rank 0 sees 1 of the 2 shard files, so it wrote no cache over them" in err
    assert "no longer lists" not in err  # the summed counts land in their own fields, the note in its own
    assert not list((tmp_path / "node0").glob("*.h5"))
    shards = [next((tmp_path / f"node{r}").glob("*.shards")) for r in (0, 1)]
    merged = run_cli("cache", "merge", *shards, "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    assert re.match(r"merged 2 cache\(s\) into .*: 36 rows, 36 copied, 0 already there, 0 recorded failures", merged.stdout)
    [cache] = (tmp_path / "merged").glob("*.h5")
    [single] = extract(folder, TINY, tmp_path / "single", workers=0, progress=False)
    assert cache.name == single.cache.name
    a, b = _by_id(cache), _by_id(single.cache)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2e-3)
    with FeatureCache(cache) as c:
        assert c.attrs["complete"] and set(c.splits) == {"train", "val"}
    again = run_cli("cache", "merge", *shards, "--out", tmp_path / "merged")
    assert "36 rows, 0 copied, 36 already there" in again.stdout, again.stderr
