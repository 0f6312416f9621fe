"""The merge stage: one cache from caches of one source's images made apart, with one backbone and
feature spec. Under ``torchrun`` without a shared file system, each node's ranks write their shard files
into that node's own ``--cache`` folder (rank 0 cannot see the others, so it writes no cache over them);
copied to one machine, ``pipeline cache merge`` joins them into a plain cache. Also for caches of two
halves of a source extracted on two machines.

Caches are of one source when they carry its name (``extract --name``; each may have listed another
folder or manifest). Rows are matched by id and content hash, as a resumed extraction matches them: an id
whose bytes differ between two caches is refused, naming both; a row already valid in the target is kept; the others' features
are copied from the first cache that holds them valid (:meth:`pipeline.cache.CacheWriter.copy_from`), and
failures recorded by the caches are recorded again. Running it again with more caches adds their rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cache import CacheWriter, FeatureCache, cache_path, find_caches
from ..errors import PipelineError
from ..sources import ImageSource


@dataclass
class MergeResult:
    """Where the merged cache is, and what the merge did with its rows."""

    cache: Path
    parts: int
    rows: int
    copied: int
    kept: int
    failed: int

    def summary(self) -> str:
        return (f"merged {self.parts} cache(s) into {self.cache}: {self.rows} rows, {self.copied} copied, "
                f"{self.kept} already there, {self.failed} recorded failures")


@dataclass
class _Part:
    """What one cache says of its rows (read once, the file closed again)."""

    path: Path
    spec: object
    attrs: dict
    taps: dict[str, int]
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    hashes: np.ndarray
    failures: list[tuple[str, str, str]]

    @classmethod
    def read(cls, path: Path) -> "_Part":
        with FeatureCache(path) as c:
            info = c.info()
            return cls(path, c.spec, dict(c.attrs), info["taps"], np.asarray(c.ids, dtype=object),
                       np.asarray(c.labels, dtype=object), np.asarray(c.splits, dtype=object), c.content_hash, c.failures)


def merge_caches(caches: Sequence[str | os.PathLike], out: str | os.PathLike) -> MergeResult:
    """Join ``caches`` (files, or folders of them, e.g. the ``*.shards`` folders of a distributed run)
    into the cache of their source and spec in the folder ``out``."""
    parts = [_Part.read(p) for p in dict.fromkeys(p.resolve() for p in find_caches(list(caches)))]
    first = _check_alike(parts)
    ids, labels, splits, hashes = _union(parts)
    source = ImageSource(first.attrs.get("source", ""), Path(out), ids, labels, splits, lambda i: None,
                         label_kind=first.attrs.get("label_kind", "classification"), hashes=hashes)
    target = cache_path(out, source.name, first.spec)
    # A new cache records where its first part's images are (for the copy check's pixels); an existing one
    # keeps its own: the parts of one source made apart may each name another folder or manifest.
    location = "" if target.exists() else str(first.attrs.get("source_location", ""))
    Path(out).mkdir(parents=True, exist_ok=True)
    with CacheWriter(target, first.spec, first.attrs.get("weights_source", ""), source.name, first.taps,
                     location=location) as writer:
        plan = writer.sync(source, hashes)
        left = writer.copy_from([p.path for p in parts if p.path != target], plan, hashes)
        missing = set(ids[left.indices])
        writer.record_failures([f for p in parts for f in p.failures if f[0] in missing])
        writer.finish()
        failed = len(writer.failed_ids() & set(ids))
    return MergeResult(target, len(parts), len(ids), left.copied, plan.reused, failed)


def _check_alike(parts: list[_Part]) -> _Part:
    """The first part, once every part is of its source, backbone, feature spec and taps."""
    first = parts[0]
    for p in parts[1:]:
        if p.spec != first.spec:
            raise PipelineError(f"{p.path} holds features of another feature spec ({p.spec.key}) than {first.path} "
                                f"({first.spec.key}); only caches of one backbone and spec merge")
        if p.attrs.get("source") != first.attrs.get("source"):
            raise PipelineError(f"{p.path} is of source {p.attrs.get('source')!r}, {first.path} of "
                                f"{first.attrs.get('source')!r}; only caches of one source merge")
        if p.taps != first.taps:
            raise PipelineError(f"{p.path} has taps {sorted(p.taps)}, {first.path} {sorted(first.taps)}; extract "
                                "the same --taps into both")
    return first


def _union(parts: list[_Part]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every id of the parts once, sorted, with its label, split and hash; an id with other bytes in two
    parts is refused."""
    seen: dict[str, tuple[int, int]] = {}
    for k, p in enumerate(parts):
        for r, sid in enumerate(p.ids):
            if sid in seen:
                other, row = seen[sid]
                if parts[other].hashes[row] != p.hashes[r]:
                    raise PipelineError(f"{sid} holds other bytes in {p.path} than in {parts[other].path}; those "
                                        "caches are not of one source's images")
            else:
                seen[sid] = (k, r)
    order = sorted(seen)
    columns = [[getattr(parts[seen[s][0]], c)[seen[s][1]] for s in order] for c in ("labels", "splits", "hashes")]
    return np.array(order, dtype=object), *(np.array(c, dtype=object) for c in columns)
