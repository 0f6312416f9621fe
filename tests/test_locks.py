"""The cache lock: a kernel lock where the file system keeps locks, the pipeline's own writer file where
it does not; and the cache path known before any slow work."""

import errno
import os
import socket
import subprocess
import sys

import pytest

from conftest import TINY, TINY_VIT
import pipeline.locks as locks
from pipeline.errors import PipelineError
from pipeline.featurizer import Featurizer, planned_spec
from pipeline.locks import lock_cache, lock_holder


@pytest.fixture
def no_flock(monkeypatch):
    """flock() fails as on NFS without its lock daemon (ENOLCK), except in the host's temporary directory."""
    real = locks.fcntl.flock

    def flock(fd, op):
        name = fd.name if hasattr(fd, "name") else os.readlink(f"/proc/self/fd/{fd}")
        if str(name).startswith(str(locks.tempfile.gettempdir()) + "/pipeline-"):
            return real(fd, op)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    monkeypatch.setattr(locks, "_unlocked_dirs", set())


def test_kernel_lock_refuses_a_second_writer_and_names_it(tmp_path):
    path = tmp_path / "cache" / "a.h5"
    with lock_cache(path):
        assert lock_holder(path) == f"pid {os.getpid()}"
        with pytest.raises(PipelineError, match=rf"being written by another process \(pid {os.getpid()}\)"):
            lock_cache(path)
    assert lock_holder(path) is None
    lock_cache(path).release()  # free again


def test_without_kernel_locks_a_writer_file_guards_the_cache(tmp_path, no_flock, capsys):
    path = tmp_path / "a.h5"
    writer = tmp_path / "a.h5.writer"
    with lock_cache(path):
        assert writer.read_text().split() == [socket.gethostname(), str(os.getpid())]
        assert lock_holder(path) == f"pid {os.getpid()}"
        with pytest.raises(PipelineError, match=r"\(pid \d+\).*if that run is gone, delete .*a.h5.writer"):
            lock_cache(path)
    assert not writer.exists() and lock_holder(path) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: {tmp_path} keeps no file locks (flock: No locks available)")


def test_a_writer_file_left_by_a_dead_process_of_this_host_is_taken_over(tmp_path, no_flock):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "a.h5"
    writer = tmp_path / "a.h5.writer"
    writer.write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")
    assert lock_holder(path) is None  # a killed run's file is not a writer
    with lock_cache(path):
        assert writer.read_text().split()[1] == str(os.getpid())


def test_a_writer_file_of_another_host_is_never_taken_over(tmp_path, no_flock):
    path = tmp_path / "a.h5"
    (tmp_path / "a.h5.writer").write_text("elsewhere 4242\n")
    assert lock_holder(path) == "pid 4242 on host elsewhere"
    with pytest.raises(PipelineError, match=r"\(pid 4242 on host elsewhere\)"):
        lock_cache(path)


@pytest.mark.parametrize("kw", [dict(), dict(dtype="float32", tta="flip", jpeg_draft=False, amp="off")])
@pytest.mark.parametrize("name", [TINY, TINY_VIT])
def test_the_planned_spec_is_the_spec_of_the_loaded_model(name, kw):
    """What the cache lock is taken on before loading is what loading states (else the lock is on another file)."""
    planned = planned_spec(name, device="cpu", **kw)
    assert planned is not None
    assert planned == Featurizer.create(name, device="cpu", **kw).spec


def test_no_planned_spec_for_hub_weights(monkeypatch):
    monkeypatch.delenv("PIPELINE_WEIGHTS_DIR")
    assert planned_spec(TINY, device="cpu") is None


def test_a_refused_run_leaves_no_lock_and_no_folder(tmp_path):
    """A run that made no cache (an empty folder, a bad manifest) leaves no <cache>.lock and no cache
    folder it created; a run that made one leaves no lock file beside it either."""
    from pipeline import extract

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError):
        extract(empty, TINY, cache_dir=tmp_path / "new" / "cache", progress=False, workers=0)
    assert not (tmp_path / "new").exists()
    path = tmp_path / "kept" / "a.h5"
    with lock_cache(path):
        path.write_bytes(b"made")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.h5"]


def test_a_writer_waiting_on_a_removed_lock_takes_the_new_one(tmp_path):
    path = tmp_path / "c" / "a.h5"
    first = lock_cache(path)
    stale_fd = os.open(path.with_name("a.h5.lock"), os.O_RDWR)  # a second writer opened it before the first let go
    first.release()  # the file is removed while still held
    assert not path.with_name("a.h5.lock").exists()
    assert not locks._still_linked(stale_fd, path.with_name("a.h5.lock"))
    os.close(stale_fd)
    with lock_cache(path):
        assert lock_holder(path) == f"pid {os.getpid()}"
