"""Image batches: files decoded and transformed in DataLoader workers, a failure per image instead of
a failed batch. Every stage that reads images (extract, predict, verify, finetune) batches them here."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from .data import Sample, load_image


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


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
                  pin_memory: bool = False, min_side: int | None = None) -> torch.utils.data.DataLoader:
    """Batches of (indices into ``samples``, image tensor or None, [(index, error)]), decoded in workers
    (JPEGs at reduced scale down to ``min_side``, see ``load_image``)."""
    return torch.utils.data.DataLoader(
        _ImageRows(samples, transform, min_side), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, pin_memory=pin_memory,
    )
