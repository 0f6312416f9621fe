"""What a copy is, decided here once: two images of the same picture, however re-encoded (JPEG quality,
resized, PNG, cropped to 90 %, rotated a few degrees).

Features alone cannot say it: on real photos distinct pictures reach cosine 0.87 and re-encoded copies
fall to 0.66, so no one threshold works. So a copy is found in two steps:

1. **Candidates**, from the embeddings: each image's :data:`CANDIDATE_K` nearest neighbours, kept above
   the lower fence (Q1 - 1.5 IQR) of the cache's own neighbour similarities, i.e. neighbours that are not
   unusually far for this data (0.37 on hymenoptera, 0.86 on lego renders).
2. **Confirmation**, from the pixels: the correlation of the edge maps of two grey thumbnails
   (:data:`THUMB` pixels square, autocontrasted), the best over a few alignments (as is, one image
   cropped to its central 90 %, rotated by 2 to 5 degrees either way); a copy reaches :data:`PIXEL_COPY`.
   Edges, not intensities: renders of one object on a white ground correlate at 0.99 in intensity.

Where the images cannot be read (an imported cache, a moved source, changed bytes), the embeddings decide
alone with a stricter rule: mutual nearest neighbours above the upper fence (Q3 + 1.5 IQR) of the
nearest-neighbour similarities and above :data:`EMBEDDING_FLOOR`. ``benchmarks/copies_quality.py`` measures both rules.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .data import Member, decode_pixels, read_bytes
from .evaluation import Protocol
from .similarity import BLOCK, nearest_others

CANDIDATE_K = 8
THUMB = 128
COARSE, COARSE_GATE = 32, 0.8
EXACT = 0.9999  # a cosine that only the same pixels reach
PIXEL_COPY = 0.975  # benchmarks/copies_quality.py: copies 0.983 and up, distinct pairs at most 0.963
# Below this cosine the embeddings alone call nothing a copy: the pixel-confirmed copies of hymenoptera
# (lite0) reach down to 0.862 (docs/audit.md), independent generated embeddings up to 0.39.
EMBEDDING_FLOOR = 0.8
PAIR_ROWS = 2 ** 16  # rows whose candidate pairs are made at once (copies.candidates)
EDGE_IMAGES = 512  # images whose edge maps are kept (each up to ~0.6 MB as float16 with every alignment)
ALIGNMENTS = (("crop", 0.9),) + tuple(("rotate", d) for d in (-5, -4, -3, -2, 2, 3, 4, 5))


@dataclass
class Copies:
    """Candidate pairs ``i < j`` (rows of the features), most similar first, with their cosine
    ``similarity``, ``pixel_similarity`` (NaN where the pixels were not compared) and whether each is a
    ``confirmed`` copy; ``threshold`` is the candidate threshold, ``embedding_cosine`` the embeddings-only
    rule's, and ``by_pixels`` whether the pixels decided (else the embeddings-only rule did)."""

    i: np.ndarray
    j: np.ndarray
    similarity: np.ndarray
    pixel_similarity: np.ndarray
    confirmed: np.ndarray
    threshold: float
    embedding_cosine: float
    by_pixels: bool

    def rule(self) -> str:
        """How the copies were confirmed, in words, for summaries."""
        if self.by_pixels:
            return f"cosine >= {self.threshold:.3f} among {CANDIDATE_K} nearest, confirmed by pixels >= {PIXEL_COPY:g}"
        return (f"images not readable: embeddings only, mutual nearest neighbours with cosine >= "
                f"{self.embedding_cosine:.3f}")


class Images:
    """The images behind a cache's rows, read on demand as grey thumbnails: ``where`` maps an id to its
    path (or container member), ``hashes`` to the sha256 the cache holds, so an image whose bytes changed
    since extraction counts as not readable."""

    def __init__(self, where: dict[str, Path | Member], hashes: dict[str, bytes] | None = None):
        self.where, self.hashes = where, hashes
        self._grey: dict[str, Image.Image | None] = {}
        self._edges: OrderedDict[str, EdgeMaps | None] = OrderedDict()  # the last EDGE_IMAGES used

    @classmethod
    def of_cache(cls, cache, data: str | os.PathLike | None = None) -> "Images | None":
        """The images of ``cache`` (a :class:`~pipeline.cache.FeatureCache`) at ``data``, else where the
        cache says its source is; None when that cannot be listed. A ``data`` that cannot be listed or
        holds none of the cache's images is refused: the user named it."""
        from .errors import PipelineError
        from .sources import load_source

        location = data if data is not None else str(cache.attrs.get("source_location", ""))
        if not location:
            return None
        try:
            source = load_source(location)
        except (PipelineError, OSError):
            if data is not None:
                raise
            return None
        if data is not None and len(cache.ids) and not np.isin(cache.ids, source.ids).any():
            raise PipelineError(f"--data {data} holds none of the images of {cache.path.name} (ids such as "
                                f"{cache.ids[0]!r}); give the folder or manifest it was extracted from")
        return cls({s.id: s.path for s in source.samples}, dict(zip(cache.ids, cache.content_hash)))

    def edge_maps(self, sid: str) -> "EdgeMaps | None":
        """The image's edge maps, kept for its other candidates (None when unreadable or changed)."""
        if sid not in self._edges:
            grey = self.grey(sid)
            self._edges[sid] = None if grey is None else EdgeMaps(grey)
            if len(self._edges) > EDGE_IMAGES:
                self._edges.popitem(last=False)
        self._edges.move_to_end(sid)
        return self._edges[sid]

    def grey(self, sid: str) -> Image.Image | None:
        """Autocontrasted grey image at least ``2 * THUMB`` a side (None when unreadable or changed)."""
        if sid not in self._grey:
            self._grey[sid] = self._read(sid)
        return self._grey[sid]

    def _read(self, sid: str) -> Image.Image | None:
        if sid not in self.where:
            return None
        try:
            data = read_bytes(self.where[sid])
            if self.hashes is not None and hashlib.sha256(data).digest() != self.hashes.get(sid):
                return None
            pixels = decode_pixels(data, min_side=2 * THUMB)
        except (OSError, ValueError):
            return None
        return ImageOps.autocontrast(Image.fromarray(pixels).convert("L"), cutoff=1)


def candidates(X: np.ndarray, k: int = CANDIDATE_K, block: int = BLOCK,
               nearest: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows of normalised features: (sims, idx), as :func:`knn` gives them
    (the first ``k`` of ``nearest``, a search of ``X`` against itself already made), and the unique pairs
    ``i < j`` among them with their similarity (i, j, s), most similar first. A pair both ends list is
    kept from its first row's list; the pairs are made :data:`PAIR_ROWS` rows at a time, as int32 where
    the rows allow (ten million rows' 80 million pairs as int64 and their sorted copies held 5 GB)."""
    sims, idx = (a[:, :k] for a in (nearest_others(X, k, block)[:2] if nearest is None else nearest))
    at = np.int32 if len(idx) < 2 ** 31 else np.int64
    parts = []
    for start in range(0, len(idx), PAIR_ROWS):
        cols = idx[start:start + PAIR_ROWS]
        rows = np.arange(start, start + len(cols), dtype=at)[:, None]
        listed_back = (idx[np.maximum(cols, 0)] == rows[:, :, None]).any(axis=2)
        keep = (cols >= 0) & ((rows < cols) | ~listed_back)
        rows, cols = np.broadcast_to(rows, cols.shape)[keep], cols[keep].astype(at)
        parts.append((np.minimum(rows, cols), np.maximum(rows, cols), sims[start:start + PAIR_ROWS][keep]))
    i, j, s = (np.concatenate([p[n] for p in parts]) if parts else np.zeros(0, t)
               for n, t in enumerate((at, at, sims.dtype)))
    order = np.lexsort((j, i, -s))
    return sims, idx, np.stack([i[order], j[order]]), s[order]


def candidate_threshold(sims: np.ndarray) -> float:
    """The lower fence (Q1 - 1.5 IQR) of the neighbour similarities ``sims``: below it a neighbour is
    unusually far for this data, and is not looked at."""
    q1, q3 = np.nanpercentile(sims, [25, 75])
    return float(q1 - 1.5 * (q3 - q1))


def embedding_threshold(nearest: np.ndarray) -> float:
    """The embeddings-only rule's threshold: the upper fence (Q3 + 1.5 IQR) of each image's nearest
    similarity, so only pairs unusually close for this data are called copies, and at least
    :data:`EMBEDDING_FLOOR` (a fence always has a few points above it, copies or not); at most
    :data:`EXACT`, so an exact copy counts even where every image is alike (lego renders: the fence is
    above 1)."""
    q1, q3 = np.nanpercentile(nearest, [25, 75])
    return min(max(float(q3 + 1.5 * (q3 - q1)), EMBEDDING_FLOOR), EXACT)


def edges(img: Image.Image, side: int = THUMB) -> np.ndarray:
    """The gradient magnitude of ``img`` at ``side`` x ``side`` (lightly blurred first), as a zero-mean
    unit vector: a dot product of two is their correlation."""
    small = img.resize((side, side), Image.BOX).filter(ImageFilter.GaussianBlur(1))
    gy, gx = np.gradient(np.asarray(small, np.float32))
    v = np.hypot(gx, gy).ravel()
    v -= v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm else v


def _shrunk(img: Image.Image, short: int) -> Image.Image:
    """``img`` with its shorter side at most ``short``, its aspect kept (a rotation must see true angles)."""
    scale = short / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.BOX) if scale < 1 else img


def _aligned(img: Image.Image, how: str, amount: float) -> Image.Image:
    if how == "crop":
        w, h = round(img.width * amount), round(img.height * amount)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        return img.crop((left, top, left + w, top + h))
    a = np.asarray(img)
    fill = int(np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])))
    return img.rotate(amount, Image.BICUBIC, fillcolor=fill)


class EdgeMaps:
    """An image's edge maps (:func:`edges`), each size and alignment computed once: a picture is the
    candidate of several others, and rotating it is what a comparison costs."""

    def __init__(self, img: Image.Image):
        self.img, self._maps = img, {}

    @property
    def size(self) -> tuple[int, int]:
        return self.img.size

    def of(self, side: int, alignment: tuple[str, float] | None = None) -> np.ndarray:
        key = (side, alignment)
        if key not in self._maps:
            img = _shrunk(self.img, 2 * side)
            self._maps[key] = edges(img if alignment is None else _aligned(img, *alignment), side).astype(np.float16)
        return self._maps[key].astype(np.float32)


def pixel_similarity(a: "Image.Image | EdgeMaps", b: "Image.Image | EdgeMaps") -> float:
    """How alike two grey images are, from 1 (the same picture) down: the correlation of their edge maps,
    the best of as-is and each of :data:`ALIGNMENTS` applied to either image; at ``THUMB`` pixels a side,
    or the smaller image's side (an upscaled small copy has no edges as sharp as its original's). A pair
    below :data:`COARSE_GATE` at ``COARSE`` pixels (16 times cheaper) is not looked at closer: copies score
    0.93 and up there, distinct photos 0.68 at most (``benchmarks/copies_quality.py``)."""
    a, b = (x if isinstance(x, EdgeMaps) else EdgeMaps(x) for x in (a, b))
    side = min(THUMB, *a.size, *b.size)
    coarse = _best_alignment(a, b, min(COARSE, side))
    return coarse if coarse < COARSE_GATE or side <= COARSE else _best_alignment(a, b, side)


def _best_alignment(a: EdgeMaps, b: EdgeMaps, side: int) -> float:
    ea, eb = a.of(side), b.of(side)
    best = float(ea @ eb)
    for alignment in ALIGNMENTS:
        if best >= PIXEL_COPY:
            break
        best = max(best, float(a.of(side, alignment) @ eb), float(ea @ b.of(side, alignment)))
    return best


def find_copies(X: np.ndarray, ids: np.ndarray, images: Images | None, k: int = CANDIDATE_K,
                among: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                embedding_cosine: float | None = None, block: int = BLOCK,
                nearest: tuple[np.ndarray, np.ndarray] | None = None) -> Copies:
    """The copies among the rows of normalised features ``X`` (ids ``ids``): candidates from the
    embeddings, confirmed by the pixels of ``images``; by the embeddings alone where ``images`` is None
    or cannot read the candidates' images (from ``embedding_cosine``, default :func:`embedding_threshold`).
    ``among``: a function of (i, j) arrays that says which candidate pairs matter (the rest are dropped
    before any image is read). ``nearest``: as :func:`candidates`."""
    sims, idx, (i, j), s = candidates(X, k, block, nearest)
    if among is not None:
        keep = among(i, j)
        i, j, s = i[keep], j[keep], s[keep]
    pixel = np.full(len(i), np.nan)
    threshold = candidate_threshold(sims)
    strict = embedding_threshold(sims[:, 0]) if embedding_cosine is None else embedding_cosine
    if images is not None:
        look = s >= threshold
        for n in np.flatnonzero(look)[np.argsort(i[look], kind="stable")]:  # by first image: its maps are reused
            a, b = images.edge_maps(ids[i[n]]), images.edge_maps(ids[j[n]])
            if a is not None and b is not None:
                pixel[n] = pixel_similarity(a, b)
        if not look.any() or (~np.isnan(pixel[look])).any():
            return Copies(i, j, s, pixel, pixel >= PIXEL_COPY, threshold, strict, True)
    mutual = (idx[i, 0] == j) & (idx[j, 0] == i)
    return Copies(i, j, s, pixel, mutual & (s >= strict), threshold, strict, False)


def copy_groups(copies: Copies, n: int) -> np.ndarray:
    """A group number per row (``n`` rows): the connected components of the confirmed copies, so copies
    of copies share a group; a row without a copy has a group of its own. Numbered from 0 by first row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    c = copies.confirmed
    graph = coo_matrix((np.ones(int(c.sum())), (copies.i[c], copies.j[c])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    renumber = np.empty(len(first), np.int64)
    renumber[np.argsort(first)] = np.arange(len(first))
    return renumber[labels]


def leak_message(n: int, protocol: Protocol) -> str:
    """``12 val images have a near-copy in train`` (``in another fold`` under cross-validation)."""
    where = "in another fold" if protocol.cross_validated else "in train"
    scored = "" if protocol.cross_validated else f"{protocol.eval} "
    return f"{n} {scored}image{'s have' if n != 1 else ' has'} a near-copy {where}"


def leaked(X: np.ndarray, ids: np.ndarray, protocol: Protocol, images: Images | None,
           embedding_cosine: float | None = None, block: int = BLOCK,
           nearest: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, Copies]:
    """The scored samples of ``protocol`` (indices in its order; ``X`` and ``ids`` in the same order)
    with a confirmed copy among the images their model trains on (the train split, or another fold),
    and the copies looked at: only pairs across folds are. ``nearest``: as :func:`candidates`."""
    folds = np.asarray(protocol.folds)
    copies = find_copies(X, ids, images, among=lambda i, j: folds[i] != folds[j],
                         embedding_cosine=embedding_cosine, block=block, nearest=nearest)
    c = copies.confirmed
    ends = np.concatenate([copies.i[c], copies.j[c]])
    return np.unique(ends[folds[ends] >= 0]), copies
