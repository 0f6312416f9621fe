"""How unlike its training data an image is: ``predict``'s ``ood_score``.

An image's distance is the cosine distance from its features (those the head reads) to the nearest
training image's; its score is the percentile of that distance among the training images' own nearest-
neighbour distances, each to the other training images (leave-one-out, so an image is not its own
neighbour). ``fit`` computes those once per cache, tap and task and saves them in the run (``RunFolder.
ood_path``); ``predict`` reads the training features from the cache and searches them
(:func:`pipeline.similarity.knn`). Above :data:`REFERENCE_ROWS` training images both sides use one seeded
sample of them (its ids saved with the reference): the percentile compares like with like, and neither
``fit`` nor ``predict`` holds more than that many rows, whatever the training set's size. An image from
the training distribution is past the 99th percentile 1 % of the time; one from elsewhere (another data
set, a broken camera) mostly is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import atomic_path
from .similarity import knn, normalized

# Training distances kept: all of them up to this many, else this many evenly spaced quantiles (a score
# resolution of 0.1 percentile whatever the training set's size).
KEPT = 1001
REFERENCE_ROWS = 20_000  # training images a reference is made of, at most (a seeded sample above)


def reference_sample(n_train: int, seed: int = 0) -> np.ndarray | None:
    """Positions among ``n_train`` training images a reference is made of (ascending); None for all of them."""
    if n_train <= REFERENCE_ROWS:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_train, REFERENCE_ROWS, replace=False))


def reference_name(caches: Sequence[str | os.PathLike], tap: str, task: str) -> str:
    """The name of a source of features in a run: ``<cache stems>__<tap>__<task>``, as its heads are named."""
    return f"{'+'.join(Path(c).stem for c in caches)}__{tap}__{task}"


def nearest_distances(queries: np.ndarray, base: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Cosine distance from each normalised query to its nearest normalised ``base`` row (NaN when there
    is none); ``exclude`` as in ``knn``."""
    sims, _ = knn(queries, base, 1, exclude)
    return np.clip(1.0 - sims[:, 0].astype(np.float64), 0.0, 2.0)


@dataclass
class Reference:
    """The training images' leave-one-out nearest-neighbour distances (sorted; or their quantiles), the
    protocol whose training images they are, and ``ids``: the sample of them it was made of (None: all)."""

    protocol: str
    n: int
    distances: np.ndarray
    ids: list[str] | None = None

    @classmethod
    def of(cls, X_train: np.ndarray, protocol: str, ids: Sequence[str] | None = None) -> "Reference | None":
        """The reference of training features ``X_train`` (of the sampled images ``ids``, if a sample);
        None with fewer than two images."""
        X = normalized(X_train)
        d = nearest_distances(X, X, np.arange(len(X)))
        d = np.sort(d[np.isfinite(d)])
        if not len(d):
            return None
        kept = d if len(d) <= KEPT else np.quantile(d, np.linspace(0, 1, KEPT))
        return cls(protocol, len(d), kept, None if ids is None else list(map(str, ids)))

    def percentile(self, distances: np.ndarray) -> np.ndarray:
        """The share of training images (percent, 0-100) whose own nearest neighbour is closer than each
        distance."""
        return 100.0 * np.searchsorted(self.distances, distances, side="left") / len(self.distances)

    def scores(self, queries: np.ndarray, X_train: np.ndarray) -> np.ndarray:
        """The ``ood_score`` of each query's features against the training features."""
        return self.percentile(nearest_distances(normalized(queries), normalized(X_train)))

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dict(protocol=self.protocol, n=self.n, ids=self.ids,
                                           distances=[round(float(v), 7) for v in self.distances])))

    @classmethod
    def load(cls, path: Path) -> "Reference":
        d = json.loads(Path(path).read_text())
        return cls(d["protocol"], d["n"], np.asarray(d["distances"], dtype=np.float64), d.get("ids"))
