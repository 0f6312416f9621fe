"""Image batches: files decoded and transformed in worker processes, a failure per image instead of a
failed batch. Every stage that reads images (extract, predict, verify, finetune) batches them here.

A decoder that raises fails its image; one that crashes or hangs its worker process fails only the image
it was decoding (see :mod:`pipeline.workers`, which runs the batches)."""

from __future__ import annotations

import os
import random
from typing import Callable, Iterator, Sequence

import torch

from .data import Sample, load_image
from .workers import Job, Workers, run_tasks

ImageBatch = tuple[list[int], "torch.Tensor | None", list[tuple[int, str]]]  # indices, images, [(index, error)]
Task = tuple["int | None", list[int]]  # (seed for random augmentations, or None in this process; indices)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


class _Decode(Job[Task, ImageBatch]):
    """A task is (seed, indices into ``samples``); its result, the batch of those images."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, min_side: int | None):
        self.samples = samples
        self.transform = transform
        self.min_side = min_side

    def start(self) -> None:
        # The parent's OpenMP thread pool does not survive a fork: torch ops in the worker would wait on it forever.
        torch.set_num_threads(1)

    def run(self, task: Task) -> ImageBatch:
        seed, indices = task
        if seed is not None:  # in a worker: random augmentations depend on the task, not on the worker
            torch.manual_seed(seed)
            random.seed(seed)
        return _collate([self._one(i) for i in indices])

    def _one(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(load_image(self.samples[i].path, min_side=self.min_side)), ""
        except Exception as e:  # any decode error is that image's failure, never the run's
            return i, None, " ".join(f"{type(e).__name__}: {e}".split())

    def parts(self, task: Task) -> list[Task]:
        seed, indices = task
        return [(seed, [i]) for i in indices] if len(indices) > 1 else []

    def lost(self, task: Task, reason: str) -> ImageBatch:
        return [], None, [(i, f"decoding {reason}") for i in task[1]]

    def combine(self, results: list[ImageBatch]) -> ImageBatch:
        xs = [x for _, x, _ in results if x is not None]
        return ([i for idx, _, _ in results for i in idx], torch.cat(xs) if xs else None,
                [f for _, _, failed in results for f in failed])


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> ImageBatch:
    good = [(i, t) for i, t, _ in batch if t is not None]
    failed = [(i, err) for i, t, err in batch if t is None]
    x = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], x, failed


def image_batches(samples: Sequence[Sample], transform: Callable, batch_size: int, workers: int | Workers,
                  pin_memory: bool = False, min_side: int | None = None) -> Iterator[ImageBatch]:
    """Batches, in order, of (indices into ``samples``, image tensor or None, [(index, error)]), decoded in
    ``workers`` processes (an int: that many, with the default timeout) and JPEGs at reduced scale down
    to ``min_side`` (see ``load_image``)."""
    workers = workers if isinstance(workers, Workers) else Workers(workers)
    # One draw from torch's generator, as a DataLoader makes, whether or not workers use it.
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    tasks = [(seed + k if workers.n else None, list(range(start, min(start + batch_size, len(samples)))))
             for k, start in enumerate(range(0, len(samples), batch_size))]
    for idx, x, failed in run_tasks(_Decode(samples, transform, min_side), tasks, workers):
        yield idx, x.pin_memory() if pin_memory and x is not None else x, failed
