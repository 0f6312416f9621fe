"""The extract stage: run frozen backbones over a source's images once and keep their features.

Only rows that are missing, invalid, or whose file bytes changed are computed; everything else is
reused, and an image whose bytes another source's cache of the same spec holds (a parquet file of a
folder's images) is copied from there. Images that cannot be read or decoded are recorded in the cache's ``failures`` and skipped.

Everything but the forward pass hides behind it: images are decoded (at reduced JPEG scale where the
resize allows), cut and resized to uint8 pixels in supervised worker processes, copied from pinned memory
without blocking, converted and normalised on the device, and written to HDF5 by a background thread.
Backbones with the same preprocessing share one decode pass. Under ``torchrun``, each rank extracts its
share of the images into a shard file and rank 0 writes the cache as HDF5 virtual datasets over the shards.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..backbones import check_taps
from ..devices import resolve_device
from ..batches import default_workers
from ..cache import (CacheWriter, cache_path, check_master, check_source, held_stamps, same_spec_caches, shard_path,
                     spec_to_write, write_master)
from ..errors import Interrupted, PipelineError
from ..featurizer import Featurizer, planned_spec
from ..sources import ImageSource, Stamps, load_source, source_location, source_name
from ..locks import lock_cache
from ..spec import SPEC_INPUTS, spec_rules
from ..validation import at_least, name_part, optional, positive, validate_params
from ..workers import DEFAULT_TIMEOUT, Workers


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
    copied: int = 0  # of ``reused``, copied from other sources' caches of the same spec (same bytes)
    gone: int = 0  # rows of images the source no longer lists, kept for predict, left out of audit and neighbors
    note: str = ""  # what the user must do next (a distributed run's shards to merge)

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


@validate_params(dict(batch_size=at_least(1), workers=optional(at_least(0)), decode_timeout=positive(),
                      name=optional(name_part()), **spec_rules()))
def extract(
    source: str | os.PathLike,
    backbones: str | Sequence[str],
    cache_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    taps: Sequence[str] = ("pooled",),
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    dtype: str = SPEC_INPUTS["dtype"].default,
    amp: str = SPEC_INPUTS["amp"].default,
    channels_last: bool = True,
    tta: str | None = SPEC_INPUTS["tta"].default,
    jpeg_draft: bool = SPEC_INPUTS["jpeg_draft"].default,
    decode: str | None = SPEC_INPUTS["decode"].default,
    compile: bool = False,
    retry_failed: bool = False,
    allow_outside_root: bool = False,
    progress: bool = True,
    decode_timeout: float = DEFAULT_TIMEOUT,
    name: str | None = None,
) -> list[ExtractResult]:
    """Extract features of every image in ``source`` with each backbone into ``cache_dir``.

    Each backbone gets its own HDF5 file, named ``<source>__<backbone>__<key>.h5`` where the key is its
    feature spec's (weights, preprocessing, dtype, autocast dtype, ``tta``, JPEG draft, ``decode`` path),
    so changing any of them makes a new cache. ``decode`` None is the default for new caches (``turbo``),
    except where ``cache_dir`` already holds this source's cache decoded as before (``pil``): it keeps
    its decode, so an upgrade recomputes nothing. Run under ``torchrun``, the ranks split the images between
    them. ``compile`` runs normalisation and the forward pass as one ``torch.compile``d step (worth its
    compilation time on long runs; not part of the spec).

    Images are decoded in ``workers`` processes: a batch whose decoder crashes its process, or takes longer
    than ``decode_timeout`` seconds, is decoded again one image per task, and an image that does it again
    is a recorded failure. ``workers=0`` decodes in this process, without that protection.

    ``name`` names the source in its cache files instead of the folder's or file's own name (two sources
    both called ``nat300``, a tar folder and a parquet file, can then share one cache folder).
    """
    names = [backbones] if isinstance(backbones, str) else list(backbones)
    if not names:
        raise PipelineError("no backbone given; pass --backbone NAME (e.g. tf_efficientnet_lite0.in1k)")
    if weights is not None and len(names) > 1:
        raise PipelineError("--weights names one file, so give exactly one --backbone with it")
    pool = Workers(default_workers() if workers is None else workers, decode_timeout)
    taps = check_taps(taps)
    rank, world, own_group = _distributed()
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    with ExitStack() as held:
        # Every cache's lock before any slow work (listing, hashing, loading a model): a second writer
        # is refused at once. (Weights from the hub are hashed once loaded: their cache is locked then.)
        name_of_source, locks = name or source_name(source), {}
        for name in names:
            spec = planned_spec(name, weights, str(dev), amp, dtype, tta, jpeg_draft, decode)
            if spec is not None:
                spec = spec_to_write(cache_dir, name_of_source, spec, decode)
                path = _write_path(cache_path(cache_dir, name_of_source, spec), rank, world)
                locks[path] = held.enter_context(lock_cache(path))
                check_source(path, source_location(source))
        src = load_source(source, allow_outside_root)
        if world > 1:
            src = src.subset(np.fromiter((_rank_of(sid, world) == rank for sid in src.ids), bool, len(src)))
        hashes, read_errors, stamps = src.content_hashes(known=_stamps_of(locks))

        jobs = []
        for name in names:
            fz = Featurizer.create(name, weights, str(dev), amp, channels_last, dtype, tta, jpeg_draft, decode, compile)
            kept = spec_to_write(cache_dir, name_of_source, fz.spec, decode)
            path = cache_path(cache_dir, name_of_source, kept)
            note = "" if kept == fz.spec else (f"{path.name} is this source's cache decoded with {kept.decode}, the "
                                               f"default before {fz.spec.decode}, and goes on with {kept.decode} "
                                               f"(--decode {fz.spec.decode} makes a new cache)")
            fz = fz.with_spec(kept)
            if world > 1:
                check_master(path, world)
            jobs.append(_Job(fz, fz.backbone.resolve_taps(taps), path, _write_path(path, rank, world), note))

        present = set(src.ids)
        groups: dict[str, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.fz.spec.decode_key, []).append(job)
        results = []
        for group in groups.values():
            with ExitStack() as stack:
                writers = [stack.enter_context(CacheWriter(j.write_to, j.fz.spec, j.fz.backbone.weights_source, name_of_source,
                                                           j.fz.backbone.tap_dims(j.taps), locks.get(j.write_to),
                                                           location=source_location(source)))
                           for j in group]
                plans = [w.copy_from(same_spec_caches(j.path), w.sync(src, hashes, read_errors, retry_failed, stamps),
                                     hashes) for j, w in zip(group, writers)]
                start = time.perf_counter()
                try:
                    done = _run(src, group, writers, plans, batch_size, pool, progress and rank == 0)
                except OSError as e:  # disk full, file system gone read-only, ...
                    raise PipelineError(
                        f"writing to {', '.join(str(w.path) for w in writers)} failed: "
                        f"{os.strerror(e.errno) if e.errno else e.strerror or e}; the rows "
                        "written before are kept, so run the same command again once it is fixed"
                    ) from e
                seconds = time.perf_counter() - start
                for job, w, plan, n in zip(group, writers, plans, done):
                    w.finish()
                    results.append(ExtractResult(job.fz.spec.backbone, job.path, n, plan.reused, plan.changed,
                                                 plan.new, len(w.failed_ids() & present), seconds, plan.copied,
                                                 gone=plan.gone, note=job.note))
    if world > 1:
        results = _gather(results, jobs, rank, world)
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()  # left to interpreter exit, gloo's threads can abort the process
    return results


def _stamps_of(caches: Iterable[Path]) -> Stamps | None:
    """The file stamps kept by the first of ``caches`` (those this run writes, their locks held) that
    has any: every cache of a source hashed the same files, so one cache's stamps spare the others' reads."""
    return next(filter(None, map(held_stamps, caches)), None)


@dataclass
class _Job:
    fz: Featurizer
    taps: tuple[str, ...]
    path: Path  # the cache a user reads
    write_to: Path  # the same, or this rank's shard of it
    note: str = ""


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


def _write_path(path: Path, rank: int, world: int) -> Path:
    """Where this process writes the cache ``path``: the file itself, or under torchrun its rank's shard."""
    return shard_path(path, rank, world) if world > 1 else path


def _rank_of(sample_id: str, world: int) -> int:
    """The rank that owns an image: by a hash of its id, so adding images does not move the others."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little") % world


def _gather(results: list[ExtractResult], jobs: list[_Job], rank: int, world: int) -> list[ExtractResult]:
    """Wait for every rank; rank 0 writes each cache over its shards; all ranks get the summed counts."""
    import torch.distributed as dist

    dist.barrier()
    notes = {}
    if rank == 0:
        for job in jobs:
            shards = [shard_path(job.path, r, world) for r in range(world)]
            if all(s.is_file() for s in shards):
                write_master(job.path, shards)
            else:  # each node wrote into its own folder: no shared file system
                notes[job.path] = (f"rank 0 sees {sum(s.is_file() for s in shards)} of the {world} shard files, so it wrote no "
                                   f"cache over them: each node's are in its {shards[0].parent.name} folder; copy them to "
                                   f"one machine and join them with `pipeline cache merge FOLDERS... --out DIR`")
    everyone: list = [None] * world
    dist.all_gather_object(everyone, results)
    out = []
    for per_backbone in zip(*everyone):
        r0 = per_backbone[0]
        written = r0.cache if r0.cache not in notes else shard_path(r0.cache, rank, world).parent  # no cache over them
        summed = {k: sum(getattr(r, k) for r in per_backbone)
                  for k in ("extracted", "reused", "changed", "new", "failed", "copied", "gone")}
        out.append(ExtractResult(r0.backbone, written, seconds=max(r.seconds for r in per_backbone),
                                 note=notes.get(r0.cache, r0.note), **summed))
    return out


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


def _run(src: ImageSource, group: list[_Job], writers: list[CacheWriter], plans: list, batch_size: int,
         workers: Workers, progress: bool) -> list[int]:
    """One decode pass over the images any backbone of ``group`` (same decode) still needs."""
    wanted = np.unique(np.concatenate([plan.indices for plan in plans]))
    todo = src.subset(wanted)
    rows = []  # per job, each todo image's cache row, or -1 where the job does not need it
    for plan in plans:
        row = np.full(len(wanted), -1, np.int64)
        row[np.searchsorted(wanted, plan.indices)] = plan.todo
        rows.append(row)
    done = [0] * len(group)
    label = "extract " + ", ".join(j.fz.spec.backbone for j in group)
    try:
        with _InOrder() as background:  # on Ctrl-C, the writes already handed over finish before it exits
            for idx, x, failed in group[0].fz.device_batches(todo, batch_size, workers, progress, label):
                for k, (job, writer, row_of) in enumerate(zip(group, writers, rows)):
                    lost = [(todo.ids[i], "decode", err) for i, err in failed if row_of[i] >= 0]
                    if lost:
                        background.submit(writer.record_failures, lost)
                    sel = [j for j, i in enumerate(idx) if row_of[i] >= 0]
                    if not sel:
                        continue
                    feats = job.fz.features(x if len(sel) == len(idx) else x[sel], job.taps)
                    background.submit(writer.write, row_of[[idx[j] for j in sel]], feats)
                    done[k] += len(sel)
    except KeyboardInterrupt:
        kept = "; ".join(f"{n} image(s) written to {w.path} and kept, {len(plan.indices) - n} still to extract"
                         for n, plan, w in zip(done, plans, writers))
        raise Interrupted(f"{kept}; the same command extracts the rest") from None
    return done
