"""Where a sweep's fits run: joblib's own process or thread pool, or an existing (or local) Dask or Ray
cluster through joblib's backends, so the code that makes the jobs does not change."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from typing import Iterator

from joblib import parallel_config

from .errors import PipelineError
from .validation import one_of, validate_params

BACKENDS = ("loky", "threading", "dask", "ray")


@contextmanager
@validate_params(dict(backend=one_of(*BACKENDS)))
def parallel_backend(backend: str = "loky", address: str | None = None, n_jobs: int = -1) -> Iterator[None]:
    """Run the ``joblib.Parallel`` calls inside on ``backend``.

    ``dask`` connects to the scheduler at ``address`` (``tcp://host:8786``), else starts a local
    cluster of ``n_jobs`` worker processes (all cores for -1) for the duration; ``ray`` does the same
    with ``ray.init(address)``. Both are optional extras (``pip install -e '.[dask]'`` / ``'.[ray]'`` in the repository);
    their workers need this package installed and, for heads that read the cache by chunks, the cache
    files at the same paths."""
    if address and backend not in ("dask", "ray"):
        raise PipelineError(f"--cluster names a Dask or Ray cluster; it does not apply to --backend {backend}")
    workers = local_workers(n_jobs)
    with ExitStack() as stack:
        if backend == "dask":
            _dask_client(stack, address, workers)
        elif backend == "ray":
            _ray_session(stack, address, workers)
        stack.enter_context(parallel_config(backend=backend, n_jobs=n_jobs))
        yield


def local_workers(n_jobs: int) -> int:
    """The processes ``n_jobs`` runs at once on this machine (all cores for -1): a local cluster's size,
    and the number of jobs that share ``fit``'s ``--max-memory``."""
    return (os.cpu_count() or 1) if n_jobs < 0 else max(1, n_jobs)


def _dask_client(stack: ExitStack, address: str | None, workers: int) -> None:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise PipelineError("--backend dask needs dask.distributed: pip install -e '.[dask]' (in the repository)") from None
    if address is None:
        cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1,
                                                   dashboard_address=None, silence_logs=logging.ERROR))
        address = cluster.scheduler_address
    try:
        stack.enter_context(Client(address, timeout="10s"))
    except OSError as e:
        raise PipelineError(f"--cluster {address}: cannot reach the Dask scheduler ({e})") from None


def _ray_session(stack: ExitStack, address: str | None, workers: int) -> None:
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError:
        raise PipelineError("--backend ray needs ray: pip install -e '.[ray]' (in the repository)") from None
    register_ray()
    if ray.is_initialized():
        return
    try:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError) as e:
        raise PipelineError(f"--cluster {address}: cannot connect to the Ray cluster ({e})") from None
    stack.callback(ray.shutdown)
