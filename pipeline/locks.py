"""Who may write a cache, on any file system, and how HDF5 files are opened there.

A writer holds ``<cache>.lock`` with a kernel lock (``flock``), which the kernel drops when the process
dies, however it dies. Some shared file systems keep no locks (NFS without its lock daemon, Lustre
mounted without ``flock``): locking calls fail with ENOLCK or ENOSYS there, HDF5's among them, so h5py
refuses to open any file. There, HDF5 files are opened with HDF5's locking off (one line says so) and a
writer instead creates ``<cache>.writer`` exclusively (``O_EXCL``), naming its host and pid; it removes it
when done, and a later run on the same host removes one whose process is gone (a killed run's).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import h5py

from .errors import PipelineError
from .workers import private_fd, release_fd

# What a locking call fails with where the file system keeps no locks.
NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})
_HDF5_LOCK_ERROR = re.compile(r"unable to lock file, errno = (\d+)")
_unlocked_dirs: set[Path] = set()  # directories found to keep no locks (said once per process)


def _said_no_locks(directory: Path, why: str) -> None:
    if directory not in _unlocked_dirs:
        _unlocked_dirs.add(directory)
        print(f"note: {directory} keeps no file locks ({why}); HDF5's locking is off there and the pipeline's "
              "own lock files guard its caches", file=sys.stderr)


def open_h5(path: str | os.PathLike, mode: str, **kwargs) -> h5py.File:
    """``h5py.File(path, mode, **kwargs)``; where the file system keeps no locks, the same with HDF5's
    locking off (HDF5 refuses to open files there otherwise)."""
    path = Path(path)
    directory = path.resolve().parent
    if directory in _unlocked_dirs:
        return h5py.File(path, mode, locking=False, **kwargs)
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as e:
        found = _HDF5_LOCK_ERROR.search(str(e))
        if not found or int(found[1]) not in NO_LOCKS:
            raise
        _said_no_locks(directory, f"HDF5: {os.strerror(int(found[1]))}")
        return h5py.File(path, mode, locking=False, **kwargs)


class CacheLock:
    """The right to write one cache, held until :meth:`release` or the process's death."""

    def __init__(self, path: Path, fd: int | None, writer_file: Path | None, made_dir: Path | None = None):
        self.path = path
        self._fd = fd  # the flocked lock file, or None
        self._writer_file = writer_file  # the O_EXCL file where there are no kernel locks, or None
        self._made_dir = made_dir  # the highest directory taking the lock created, or None

    def __enter__(self) -> "CacheLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give the right up and remove the lock file, so none is left beside the cache; where no cache
        was made (a refused or failed run), the directories taking it created go too."""
        made_nothing = not self.path.exists()
        if self._fd is not None:
            _lock_file(self.path).unlink(missing_ok=True)  # still held: a writer that opened it retries (lock_cache)
            release_fd(self._fd)
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._writer_file is not None:
            self._writer_file.unlink(missing_ok=True)
            self._writer_file = None
        if made_nothing and self._made_dir is not None:
            _remove_empty(self.path.parent, self._made_dir)
        self._made_dir = None


def lock_cache(path: str | os.PathLike) -> CacheLock:
    """Take the right to write the cache at ``path``, or fail at once naming the process that has it
    (this one too: a process holds a cache's lock once)."""
    path = Path(path)
    made_dir = next((p for p in reversed(path.parents) if not p.exists()), None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create the cache directory {path.parent}: {e.strerror}") from e
    while True:
        try:
            fd = os.open(_lock_file(path), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PipelineError(f"cannot write in the cache directory {path.parent}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise _busy(path, f"pid {holder}") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKS:
                raise
            _said_no_locks(path.resolve().parent, f"flock: {os.strerror(e.errno)}")
            return CacheLock(path, None, _claim_writer_file(path), made_dir)
        if _still_linked(fd, _lock_file(path)):
            break
        os.close(fd)  # its holder removed it before letting go (it made no cache): take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return CacheLock(path, private_fd(fd), None, made_dir)


def _still_linked(fd: int, lock_file: Path) -> bool:
    try:
        return os.stat(lock_file).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_empty(directory: Path, top: Path) -> None:
    """Remove ``directory`` and its parents up to ``top`` while they are empty."""
    for d in (directory, *directory.parents):
        try:
            d.rmdir()
        except OSError:
            return
        if d == top:
            return


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who writes the cache at ``path`` now ("pid N", or "pid N on host H"), or None."""
    path = Path(path)
    try:
        fd = os.open(_lock_file(path), os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"pid {_read_pid(fd)}"
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
        finally:
            os.close(fd)
    owner = _read_owner(_writer_file(path))
    return None if owner is None or _is_stale(owner) else _describe(owner)


def _lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _writer_file(path: Path) -> Path:
    return path.with_name(path.name + ".writer")


def _read_pid(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


def _busy(path: Path, holder: str, hint: str = "") -> PipelineError:
    return PipelineError(f"cache {path} is being written by another process ({holder}); wait for it to finish or "
                         f"use another --cache{hint}")


def _claim_writer_file(path: Path) -> Path:
    """Create ``<cache>.writer`` naming this process, or fail naming its holder. A file left by a process
    of this host that is gone is removed first; a local lock makes that check-and-remove one step, so
    two runs cannot both remove it and both think they hold it."""
    writer = _writer_file(path)
    with _local_lock(writer):
        owner = _read_owner(writer)
        if owner is not None and _is_stale(owner):
            writer.unlink(missing_ok=True)
        try:
            fd = os.open(writer, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(writer) or ("?", "unknown")
            raise _busy(path, _describe(owner), f" (if that run is gone, delete {writer})") from None
        except OSError as e:
            raise PipelineError(f"cannot write in the cache directory {path.parent}: {e.strerror}") from e
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")
    return writer


def _local_lock(writer: Path):
    """An flock in this host's temporary directory, named after ``writer``: serialises the runs of one host
    (not where that directory keeps no locks either)."""
    name = hashlib.sha256(str(writer.absolute()).encode()).hexdigest()[:16]
    fh = open(Path(tempfile.gettempdir()) / f"pipeline-{name}.lock", "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in NO_LOCKS:
            fh.close()
            raise
    return fh  # closing it (leaving the with block) drops the lock


def _read_owner(writer: Path) -> tuple[str, str] | None:
    try:
        host, pid = writer.read_text().split()
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ("?", "unknown")  # being written this instant, or damaged: taken as held
    return host, pid


def _is_stale(owner: tuple[str, str]) -> bool:
    """Whether the process named in a writer file is gone (known only for processes of this host)."""
    host, pid = owner
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _describe(owner: tuple[str, str]) -> str:
    host, pid = owner
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on host {host}"
