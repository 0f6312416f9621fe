"""The extract stage: run frozen backbones over a source's images once and keep their features.

Only rows that are missing, invalid, or whose file bytes changed are computed; everything else is
reused. Images that cannot be read or decoded are recorded in the cache's ``failures`` and skipped.

Everything but the forward pass hides behind it: images are decoded (at reduced JPEG scale where the
resize allows) in DataLoader worker processes, copied from pinned memory without blocking, and written to
HDF5 by a background thread. Backbones with the same preprocessing share one decode pass. Under
``torchrun``, each rank extracts its share of the images into a shard file and rank 0 writes the cache
as HDF5 virtual datasets over the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .backbones import Backbone, check_taps, load_backbone, resolve_device
from .cache import DTYPES, UNREADABLE, CacheWriter, cache_key, cache_path, check_master, shard_path, write_master
from .data import Sample, content_hash, load_image, load_source
from .errors import PipelineError
from .progress import progress_bar


@dataclass
class ExtractResult:
    """What one backbone's pass over a source did."""

    backbone: str
    cache: Path
    extracted: int
    reused: int
    changed: int
    new: int
    failed: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


TTA = ("flip",)


def extract(
    source: str | os.PathLike,
    backbones: str | Sequence[str],
    cache_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    taps: Sequence[str] = ("pooled",),
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
    amp: str = "auto",
    channels_last: bool = True,
    tta: str | None = None,
    jpeg_draft: bool = True,
    retry_failed: bool = False,
    allow_outside_root: bool = False,
    progress: bool = True,
) -> list[ExtractResult]:
    """Extract features of every image in ``source`` with each backbone into ``cache_dir``.

    Each backbone gets its own HDF5 file, named ``<source>__<backbone>__<key>.h5`` where the key hashes
    the weights, the preprocessing, the dtype, the autocast dtype and ``tta``, so changing any of them
    makes a new cache. Run under ``torchrun``, the ranks split the images between them.
    """
    names = [backbones] if isinstance(backbones, str) else list(backbones)
    if not names:
        raise PipelineError("no backbone given; pass --backbone NAME (e.g. tf_efficientnet_lite0.in1k)")
    if weights is not None and len(names) > 1:
        raise PipelineError("--weights names one file, so give exactly one --backbone with it")
    if dtype not in DTYPES:
        raise PipelineError(f"unknown dtype {dtype!r}; choose {' or '.join(DTYPES)}")
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be at least 1, got {batch_size}")
    if tta is not None and tta not in TTA:
        raise PipelineError(f"unknown --tta {tta!r}; choose {', '.join(TTA)}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise PipelineError(f"--workers must be 0 or more, got {workers}")
    taps = check_taps(taps)
    src = load_source(source, allow_outside_root)
    rank, world, own_group = _distributed()
    samples = list(src.samples) if world == 1 else [s for s in src.samples if _rank_of(s.id, world) == rank]
    hashes, read_errors = _hash_files(samples)
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    jobs = []
    for name in names:
        bb = load_backbone(name, weights, str(dev), amp, channels_last)
        job_taps = bb.resolve_taps(taps)
        key = cache_key(bb.weights_sha256, bb.data_config, dtype, bb.amp, tta)
        path = cache_path(cache_dir, src.name, name, key)
        if world > 1:
            check_master(path, world)
        meta = dict(backbone=name, weights_sha256=bb.weights_sha256, weights_source=bb.weights_source,
                    data_config=bb.data_config, dtype=dtype, source=src.name, amp=bb.amp, tta=tta)
        jobs.append(_Job(bb, job_taps, path, shard_path(path, rank, world) if world > 1 else path, meta))

    present = {s.id for s in samples}
    groups: dict[str, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(json.dumps(job.bb.data_config, sort_keys=True), []).append(job)
    results = []
    for group in groups.values():
        with ExitStack() as stack:
            writers = [stack.enter_context(CacheWriter(j.write_to, j.meta, j.bb.tap_dims(j.taps))) for j in group]
            plans = [w.sync(samples, hashes, read_errors, retry_failed=retry_failed) for w in writers]
            start = time.perf_counter()
            try:
                done = _run(group, writers, plans, batch_size, workers, tta, jpeg_draft, progress and rank == 0)
            except OSError as e:  # disk full, file system gone read-only, ...
                raise PipelineError(
                    f"writing to {', '.join(str(w.path) for w in writers)} failed: "
                    f"{os.strerror(e.errno) if e.errno else e.strerror or e}; the rows "
                    "written before are kept, so run the same command again once it is fixed"
                ) from e
            seconds = time.perf_counter() - start
            for job, w, plan, n in zip(group, writers, plans, done):
                w.finish()
                results.append(ExtractResult(job.bb.name, job.path, n, plan.reused, plan.changed, plan.new,
                                             len(w.failed_ids() & present), seconds))
    if world > 1:
        results = _gather(results, jobs, rank, world)
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()  # left to interpreter exit, gloo's threads can abort the process
    return results


@dataclass
class _Job:
    bb: Backbone
    taps: tuple[str, ...]
    path: Path  # the cache a user reads
    write_to: Path  # the same, or this rank's shard of it
    meta: dict


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group): torchrun's rank and size when it
    launched us (with a gloo group, used only to wait for each other), else (0, 1, False)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        # Ranks finish their shares at different times; the final barrier must not time out.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), own


def _rank_of(sample_id: str, world: int) -> int:
    """The rank that owns an image: by a hash of its id, so adding images does not move the others."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little") % world


def _gather(results: list[ExtractResult], jobs: list[_Job], rank: int, world: int) -> list[ExtractResult]:
    """Wait for every rank; rank 0 writes each cache over its shards; all ranks get the summed counts."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        for job in jobs:
            write_master(job.path, [shard_path(job.path, r, world) for r in range(world)])
    everyone: list = [None] * world
    dist.all_gather_object(everyone, results)
    out = []
    for per_backbone in zip(*everyone):
        r0 = per_backbone[0]
        out.append(ExtractResult(
            r0.backbone, r0.cache, *(sum(getattr(r, k) for r in per_backbone) for k in ("extracted", "reused", "changed", "new", "failed")),
            max(r.seconds for r in per_backbone),
        ))
    return out


def _hash_files(samples: Sequence[Sample]) -> tuple[list[bytes], dict[str, str]]:
    """Content hash of every sample (``UNREADABLE`` where the file cannot be read) and the read errors."""
    errors: dict[str, str] = {}

    def one(s: Sample) -> bytes:
        try:
            return content_hash(s.path)
        except OSError as e:
            errors[s.id] = f"{type(e).__name__}: {e.strerror or e}"
            return UNREADABLE

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, samples)), errors


class _ImageRows(torch.utils.data.Dataset):
    """Decoded, transformed images; a sample that fails yields its error instead of a tensor."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, min_side: int | None):
        self.samples = samples
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(load_image(self.samples[i].path, min_side=self.min_side)), ""
        except Exception as e:  # any decode error is that image's failure, never the run's
            return i, None, " ".join(f"{type(e).__name__}: {e}".split())


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, t) for i, t, _ in batch if t is not None]
    failed = [(i, err) for i, t, err in batch if t is None]
    x = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], x, failed


def image_batches(samples: Sequence[Sample], transform: Callable, batch_size: int, workers: int,
                  pin_memory: bool = False, min_side: int | None = None):
    """Batches of (indices into ``samples``, image tensor or None, [(index, error)]), decoded in workers
    (JPEGs at reduced scale down to ``min_side``, see ``load_image``)."""
    return torch.utils.data.DataLoader(
        _ImageRows(samples, transform, min_side), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, pin_memory=pin_memory,
    )


def device_batches(bb: Backbone, samples: Sequence[Sample], batch_size: int, workers: int, progress: bool = False,
                   label: str = "", jpeg_draft: bool = True) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """``image_batches`` for ``bb``'s preprocessing, on ``bb``'s device, with a progress bar over ``samples``."""
    cuda = bb.device.type == "cuda"
    loader = image_batches(samples, bb.transform(), batch_size, workers, pin_memory=cuda,
                           min_side=bb.decode_size if jpeg_draft else None)
    with progress_bar(progress) as bar:
        task = bar.add_task(label, total=len(samples))
        for idx, x, failed in loader:
            yield idx, None if x is None else x.to(bb.device, non_blocking=cuda), failed
            bar.advance(task, len(idx) + len(failed))


def forward_batches(bb: Backbone, samples: Sequence[Sample], taps: tuple[str, ...], batch_size: int,
                    workers: int, progress: bool = False, label: str = "",
                    tta: str | None = None) -> Iterator[tuple[list[int], dict[str, np.ndarray], list[tuple[int, str]]]]:
    """Per batch: (indices into ``samples``, float32 features per tap, [(index, error)])."""
    for idx, x, failed in device_batches(bb, samples, batch_size, workers, progress, label):
        yield idx, {} if x is None else _features(bb, x, taps, tta), failed


def _features(bb: Backbone, x: torch.Tensor, taps: tuple[str, ...], tta: str | None) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {k: v.cpu().numpy() for k, v in bb.forward(x, taps, tta).items()}


class _InOrder:
    """Runs calls in order on one background thread with at most ``depth`` waiting, so HDF5 writes
    overlap the next forward pass while memory stays bounded. An error in a call is raised in the caller
    at its next ``submit`` or at exit; calls after a failed one are dropped."""

    def __init__(self, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0](*item[1:])
                except BaseException as e:  # handed to the caller's thread
                    self._error = e

    def submit(self, fn: Callable, *args) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((fn, *args))

    def __enter__(self) -> "_InOrder":
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def _run(group: list[_Job], writers: list[CacheWriter], plans: list, batch_size: int, workers: int,
         tta: str | None, jpeg_draft: bool, progress: bool) -> list[int]:
    """One decode pass over the images any backbone of ``group`` (same preprocessing) still needs."""
    rows = [dict(zip((s.id for s in plan.samples), plan.todo.tolist())) for plan in plans]
    todo = list({s.id: s for plan in plans for s in plan.samples}.values())
    done = [0] * len(group)
    label = "extract " + ", ".join(j.bb.name for j in group)
    with _InOrder() as background:
        for idx, x, failed in device_batches(group[0].bb, todo, batch_size, workers, progress, label, jpeg_draft):
            ids = [todo[i].id for i in idx]
            for k, (job, writer, row_of) in enumerate(zip(group, writers, rows)):
                lost = [(todo[i].id, "decode", err) for i, err in failed if todo[i].id in row_of]
                if lost:
                    background.submit(writer.record_failures, lost)
                sel = [j for j, sid in enumerate(ids) if sid in row_of]
                if not sel:
                    continue
                feats = _features(job.bb, x if len(sel) == len(ids) else x[sel], job.taps, tta)
                background.submit(writer.write, np.array([row_of[ids[j]] for j in sel]), feats)
                done[k] += len(sel)
    return done
