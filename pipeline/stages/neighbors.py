"""Nearest cached images of any image: the rows of a cache whose features are most cosine-similar.

An image already in the cache (the same bytes, under any name) is read from it and does not count as its
own neighbour; any other image runs through the backbone the cache's feature spec names, as ``predict``
runs it, so an image and its copy outside the cache get the same neighbours.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..batches import default_workers
from ..cache import FeatureCache, find_caches
from ..data import Sample, list_images
from ..errors import PipelineError
from ..featurizer import Featurizer, Part, part_features
from ..files import atomic_path
from ..similarity import NeighbourIndex, normalized
from ..validation import at_least, optional, unknown, validate_params

COLUMNS = ("query", "rank", "id", "similarity", "label", "split", "error")


@validate_params(dict(k=at_least(1), batch_size=at_least(1), workers=optional(at_least(0))))
def neighbors(cache: str | os.PathLike, images: Sequence[str | os.PathLike], k: int = 8, tap: str = "pooled",
              out: str | os.PathLike | None = None, weights: Sequence[str | os.PathLike] = (), batch_size: int = 32,
              workers: int | None = None, device: str = "auto", progress: bool = True) -> list[dict]:
    """The ``k`` nearest images of ``cache`` (a cache file, or a folder holding one; rows of the images its source still lists) for every image (files or folders): one dict per
    (image, rank) with the neighbour's ``id``, cosine ``similarity``, ``label`` and ``split``; an image
    that cannot be read gets one row with its ``error``. Written as CSV to ``out`` when given."""
    paths = list_images(list(images))
    if not paths:
        raise PipelineError("no images to find neighbours of")
    samples = [Sample(str(p), p) for p in paths]
    found_caches = find_caches([cache])
    if len(found_caches) != 1:
        raise PipelineError(f"{cache} holds {len(found_caches)} caches and neighbors searches one: name its .h5 file")
    with FeatureCache(found_caches[0]) as c:
        if tap not in c.taps:
            raise unknown("tap", tap, c.taps, f"(the taps of {c.path.name})")
        rows = np.flatnonzero(c.current)
        index = NeighbourIndex(normalized(c.features(tap, rows)))  # built once, searched by every image
        ids, labels, splits = c.ids[rows], c.labels[rows], c.splits[rows]
        own = {i: j for i, r in c.rows_of_files(paths).items()
               if (j := int(np.searchsorted(rows, r))) < len(rows) and rows[j] == r}
        part = Part(c.spec, tap, str(c.attrs.get("weights_source", "")), [c.path])
    load = lambda: Featurizer.load(part.spec, list(map(Path, weights)), part.weights_source, device)  # noqa: E731
    feats, errors = part_features(part, samples, load, batch_size, default_workers() if workers is None else workers,
                                  progress)
    done = sorted(feats)
    found = {}
    if done:
        exclude = np.array([own.get(i, -1) for i in done])
        sims, idx = index.search(normalized(np.stack([feats[i] for i in done])), k, exclude)
        found = dict(zip(done, zip(sims, idx)))
    result = []
    for i, s in enumerate(samples):
        if i not in found:
            result.append(dict(query=s.id, rank="", id="", similarity="", label="", split="",
                               error=errors.get(i, "no features")))
            continue
        for rank, (sim, j) in enumerate(zip(*found[i]), 1):
            if j >= 0:
                result.append(dict(query=s.id, rank=rank, id=ids[j], similarity=round(float(sim), 4), label=labels[j],
                                   split=splits[j], error=""))
    if out is not None:
        write_csv(result, out)
    return result


def write_csv(rows: list[dict], out: str | os.PathLike) -> Path:
    with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return Path(out)
