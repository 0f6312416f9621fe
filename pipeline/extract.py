"""The extract stage: run frozen backbones over a source's images once and keep their features.

Only rows that are missing, invalid, or whose file bytes changed are computed; everything else is
reused. Images that cannot be read or decoded are recorded in the cache's ``failures`` and skipped.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .backbones import Backbone, check_taps, load_backbone
from .cache import DTYPES, UNREADABLE, CacheWriter, cache_key, cache_path
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
    retry_failed: bool = False,
    progress: bool = True,
) -> list[ExtractResult]:
    """Extract features of every image in ``source`` with each backbone into ``cache_dir``.

    Each backbone gets its own HDF5 file, named ``<source>__<backbone>__<key>.h5`` where the key hashes
    the weights, the preprocessing and the dtype, so changing any of them makes a new cache.
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
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise PipelineError(f"--workers must be 0 or more, got {workers}")
    taps = check_taps(taps)
    src = load_source(source)
    hashes, read_errors = _hash_files(src.samples)

    present = {s.id for s in src.samples}
    results = []
    for name in names:
        bb = load_backbone(name, weights, device)
        if "logits" in taps and bb.model.num_classes == 0:
            raise PipelineError(f"{name} has no classifier in its weights, so it has no 'logits' tap; use --taps pooled")
        key = cache_key(bb.weights_sha256, bb.data_config, dtype)
        meta = dict(
            backbone=name, weights_sha256=bb.weights_sha256, weights_source=bb.weights_source,
            data_config=bb.data_config, dtype=dtype, source=src.name,
        )
        path = cache_path(cache_dir, src.name, name, key)
        with CacheWriter(path, meta, bb.tap_dims(taps)) as writer:
            plan = writer.sync(list(src.samples), hashes, read_errors, retry_failed=retry_failed)
            start = time.perf_counter()
            done = _run(bb, writer, plan.todo, plan.samples, batch_size, workers, progress, name)
            seconds = time.perf_counter() - start
            writer.finish()
            failed = len(writer.failed_ids() & present)
        results.append(ExtractResult(name, path, done, plan.reused, plan.changed, plan.new, failed, seconds))
    return results


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

    def __init__(self, samples: Sequence[Sample], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(load_image(self.samples[i].path)), ""
        except Exception as e:  # any decode error is that image's failure, never the run's
            return i, None, " ".join(f"{type(e).__name__}: {e}".split())


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, t) for i, t, _ in batch if t is not None]
    failed = [(i, err) for i, t, err in batch if t is None]
    x = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], x, failed


def image_batches(samples: Sequence[Sample], transform: Callable, batch_size: int, workers: int, pin_memory: bool = False):
    """Batches of (indices into ``samples``, image tensor or None, [(index, error)]), decoded in workers."""
    return torch.utils.data.DataLoader(
        _ImageRows(samples, transform), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, pin_memory=pin_memory,
    )


def forward_batches(bb: Backbone, samples: Sequence[Sample], taps: tuple[str, ...], batch_size: int,
                    workers: int, progress: bool = False, label: str = "") -> Iterator[tuple[list[int], dict[str, np.ndarray], list[tuple[int, str]]]]:
    """Per batch: (indices into ``samples``, float32 features per tap, [(index, error)]), decoded in
    worker processes, forwarded in inference mode, with a progress bar over ``samples``."""
    loader = image_batches(samples, bb.transform(), batch_size, workers, pin_memory=bb.device.type == "cuda")
    with progress_bar(progress) as bar:
        task = bar.add_task(label, total=len(samples))
        for idx, x, failed in loader:
            feats = {}
            if x is not None:
                with torch.inference_mode():
                    out = bb.forward(x.to(bb.device, non_blocking=True), taps)
                feats = {k: v.float().cpu().numpy() for k, v in out.items()}
            yield idx, feats, failed
            bar.advance(task, len(idx) + len(failed))


def _run(bb: Backbone, writer: CacheWriter, rows: np.ndarray, samples: list[Sample], batch_size: int,
         workers: int, progress: bool, label: str) -> int:
    done = 0
    for idx, feats, failed in forward_batches(bb, samples, tuple(writer.taps), batch_size, workers, progress,
                                              f"extract {label}"):
        if failed:
            writer.record_failures([(samples[i].id, "decode", err) for i, err in failed])
        if idx:
            writer.write(rows[idx], feats)
            done += len(idx)
    return done
