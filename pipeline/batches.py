"""Image batches: files decoded and transformed in worker processes, a failure per image instead of a
failed batch. Every stage that reads images (extract, predict, verify, finetune) batches them here; what
one image becomes (``load``) and how a batch is put together (``collate``) are the caller's: a feature
spec's decode path (:mod:`pipeline.preprocess`), or a fine-tune's training transform.

A decoder that raises fails its image; one that crashes or hangs its worker process fails only the image
it was decoding (see :mod:`pipeline.workers`, which runs the batches)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .data import Member, Sample
from .workers import Job, Workers, run_tasks

ImageBatch = tuple[list[int], Any, list[tuple[int, str]]]  # indices, the collated images (None: none), [(index, error)]
Task = tuple["int | None", list[int]]  # (seed for random augmentations, or None in this process; indices)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


class _Decode(Job[Task, ImageBatch]):
    """A task is (seed, indices into ``samples``); its result, the batch of those images."""

    def __init__(self, samples: Sequence[Sample], load: Callable[[Path | Member], Any], collate: Callable[[list], Any]):
        self.samples = samples
        self.load = load
        self.collate = collate

    def start(self) -> None:
        # The parent's OpenMP thread pool does not survive a fork: torch ops in the worker would wait on it forever.
        torch.set_num_threads(1)

    def run(self, task: Task) -> ImageBatch:
        seed, indices = task
        if seed is not None:  # in a worker: random augmentations depend on the task, not on the worker
            torch.manual_seed(seed)
            random.seed(seed)
        done = [self._one(i) for i in indices]
        good = [(i, x) for i, x, _ in done if x is not None]
        return ([i for i, _ in good], self.collate([x for _, x in good]) if good else None,
                [(i, err) for i, x, err in done if x is None])

    def _one(self, i: int) -> tuple[int, Any, str]:
        try:
            return i, self.load(self.samples[i].path), ""
        except Exception as e:  # any decode error is that image's failure, never the run's
            return i, None, " ".join(f"{type(e).__name__}: {e}".split())

    def parts(self, task: Task) -> list[Task]:
        seed, indices = task
        return [(seed, [i]) for i in indices] if len(indices) > 1 else []

    def lost(self, task: Task, reason: str) -> ImageBatch:
        return [], None, [(i, f"decoding {reason}") for i in task[1]]

    def combine(self, results: list[ImageBatch]) -> ImageBatch:
        xs = [x for _, x, _ in results if x is not None]
        joined = None if not xs else torch.cat(xs) if isinstance(xs[0], torch.Tensor) else [t for x in xs for t in x]
        return [i for idx, _, _ in results for i in idx], joined, [f for _, _, failed in results for f in failed]


def image_batches(samples: Sequence[Sample], load: Callable[[Path | Member], Any], batch_size: int,
                  workers: int | Workers, pin_memory: bool = False, collate: Callable[[list], Any] = torch.stack,
                  lockstep: bool = False) -> Iterator[ImageBatch]:
    """Batches, in order, of (indices into ``samples``, ``collate`` of their ``load`` or None, [(index,
    error)]), loaded in ``workers`` processes (an int: that many, with the default timeout). A batch that
    is a tensor is pinned with ``pin_memory``.

    By default the workers load the next batches while the caller works on one. ``lockstep`` loads a
    batch only when the caller asks for it, cut in one part per worker: for a caller whose own work needs
    every core (a forward pass on the CPU), so that the two never compete for them."""
    workers = workers if isinstance(workers, Workers) else Workers(workers)
    parts = max(1, workers.n) if lockstep else 1
    # One draw from torch's generator, as a DataLoader makes, whether or not workers use it.
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    step = -(-batch_size // parts)
    tasks = [(seed + k if workers.n else None, list(range(start, min(start + step, len(samples)))))
             for k, start in enumerate(range(0, len(samples), step))]
    job = _Decode(samples, load, collate)
    results = run_tasks(job, tasks, workers, window=parts if lockstep else None)
    while batch := [r for _, r in zip(range(parts), results)]:
        idx, x, failed = job.combine(batch) if parts > 1 else batch[0]
        yield idx, x.pin_memory() if pin_memory and isinstance(x, torch.Tensor) else x, failed
