"""The supervised worker pool on its own, with a job that misbehaves on purpose: results in order, a task
that crashes, hangs or raises costs only its own item, and cache descriptors never reach a worker."""

import multiprocessing
import os
import signal
import time

import pytest

from pipeline.workers import Job, Workers, describe_exit, private_fd, release_fd, run_tasks

pytestmark = pytest.mark.slow  # several processes


class Squares(Job):
    """Tasks are lists of ints; item 13 segfaults its process, 17 hangs, 19 raises."""

    def run(self, task):
        out = []
        for i in task:
            if i == 13:
                os.kill(os.getpid(), signal.SIGSEGV)
            if i == 17:
                time.sleep(3600)
            if i == 19:
                raise ValueError("nineteen")
            out.append(i * i)
        return out

    def parts(self, task):
        return [[i] for i in task] if len(task) > 1 else []

    def lost(self, task, reason):
        return [f"{task[0]}: {reason}"]

    def combine(self, results):
        return [x for r in results for x in r]


def test_results_in_order_and_each_fault_costs_only_its_item():
    tasks = [list(range(k, k + 4)) for k in range(0, 40, 4)]
    out = [x for r in run_tasks(Squares(), tasks, Workers(2, timeout=2)) for x in r]
    expected = [i * i for i in range(40)]
    expected[13] = "13: crashed its worker process, which was killed by SIGSEGV (Segmentation fault)"
    expected[17] = "17: took over 2 s; its worker process was killed"
    expected[19] = "19: ValueError: nineteen"
    assert out == expected


def test_in_this_process_with_no_workers():
    assert list(run_tasks(Squares(), [[1, 2], [3]], Workers(0))) == [[1, 4], [9]]


def test_a_private_descriptor_is_closed_in_forked_children(tmp_path):
    path = tmp_path / "cache.h5"
    path.write_bytes(b"x")
    fd = private_fd(os.open(path, os.O_RDONLY))
    kept = os.open(path, os.O_RDONLY)

    def child(fd, kept):
        os._exit((0 if not _is(fd, path) else 1) + (0 if _is(kept, path) else 2))

    try:
        p = multiprocessing.get_context("fork").Process(target=child, args=(fd, kept))
        p.start()
        p.join()
        assert p.exitcode == 0
    finally:
        release_fd(fd)
        os.close(fd)
        os.close(kept)


def _is(fd: int, path) -> bool:
    """Whether ``fd`` is open on ``path`` (a closed number may have been reused for another file)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def test_describe_exit():
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL (Killed; the out-of-memory killer sends it)"
    assert describe_exit(3) == "exited with code 3"
