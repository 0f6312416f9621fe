"""Cosine similarity over cached features: nearest neighbours, near-duplicate pairs, and the near-copies
that leak between the images a protocol trains on and those it scores.

Features are L2-normalised once, so cosine similarity is a dot product. Searches run in blocks of rows
(``block`` x ``block`` similarities at a time), so memory stays bounded whatever the cache's size; with
`faiss <https://github.com/facebookresearch/faiss>`_ installed (``pip install -e '.[faiss]'`` in the repository) an
exact inner-product index finds nearest neighbours faster on large caches, with the same answers.

The near-duplicate threshold is decided here, once: :data:`DUPLICATE_COSINE` (see the README for the
measurements it comes from).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .evaluation import Protocol

# Calibrated on hymenoptera with tf_efficientnet_lite0 pooled features (benchmarks/audit_quality.py, README
# "audit"): training images re-encoded into val (JPEG quality 50-90, resized to 50 % or 75 %, PNG) score
# 0.862 to 1.0 against their originals, and the most similar pair of distinct images scores 0.809.
DUPLICATE_COSINE = 0.85
BLOCK = 2048


def normalized(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as float32 (an all-zero row stays zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def knn(queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
        block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``base`` most cosine-similar to each query, most similar first: (similarities,
    indices), both ``(len(queries), k)``; ``-1`` indices where ``base`` has fewer rows. Inputs are
    normalised rows. ``exclude[i]`` is a row of ``base`` that query ``i`` may not get (itself), or -1."""
    k_eff = min(k + (exclude is not None), len(base))
    if faiss_available():
        sims, idx = _faiss_index(base).search(np.ascontiguousarray(queries, np.float32), k_eff)
    else:
        sims, idx = _numpy_knn(queries, base, k_eff, block)
    if exclude is not None:
        drop = idx == np.asarray(exclude)[:, None]
        drop[:, -1] |= ~drop.any(axis=1)  # keep k per row: the last one goes when nothing was excluded
        sims, idx = sims[~drop].reshape(len(idx), -1), idx[~drop].reshape(len(idx), -1)
    pad = k - idx.shape[1]
    if pad > 0:
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=np.nan)
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    return sims, idx


def pairs_above(X: np.ndarray, threshold: float, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of normalised rows with cosine similarity at least ``threshold``: (i, j,
    similarity), most similar first. Always by numpy blocks: on 50,000 x 1,280 features they took 29 s
    where faiss's ``range_search`` took 48 s (``benchmarks/similarity.py``)."""
    found = list(_numpy_pairs(X, threshold, block))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = (np.concatenate(parts) for parts in zip(*found))
    order = np.lexsort((j, i, -s))
    return i[order], j[order], s[order]


def near_copies(X: np.ndarray, protocol: Protocol, threshold: float = DUPLICATE_COSINE,
                block: int = BLOCK) -> np.ndarray:
    """The scored samples of ``protocol`` (indices in its order; ``X`` holds their normalised features in
    the same order) that have a near-copy among the images their fold trains on: possible leakage, an
    evaluation image the model has in effect already seen."""
    leaked = []
    for train, scored in protocol.splits():
        if len(train) and len(scored):
            sims, _ = knn(X[scored], X[train], 1, block=block)
            leaked.append(scored[sims[:, 0] >= threshold])
    return np.sort(np.concatenate(leaked)) if leaked else np.zeros(0, np.int64)


def leak_message(n: int, protocol: Protocol) -> str:
    """``12 val images have a near-copy in train`` (``in another fold`` under cross-validation)."""
    where = "in another fold" if protocol.cross_validated else "in train"
    scored = "" if protocol.cross_validated else f"{protocol.eval} "
    return f"{n} {scored}image{'s have' if n != 1 else ' has'} a near-copy {where}"


def _blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    return ((s, min(s + block, n)) for s in range(0, n, block))


def _numpy_knn(queries: np.ndarray, base: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by blocks: a running best ``k`` per query, merged with each block of ``base``."""
    sims = np.full((len(queries), k), -np.inf, np.float32)
    idx = np.full((len(queries), k), -1, np.int64)
    for qs, qe in _blocks(len(queries), block):
        best_s, best_i = sims[qs:qe], idx[qs:qe]
        for bs, be in _blocks(len(base), block):
            s = queries[qs:qe] @ base[bs:be].T
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(bs, be), s.shape)], axis=1)
            top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        sims[qs:qe], idx[qs:qe] = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return sims, idx


def _numpy_pairs(X: np.ndarray, threshold: float, block: int):
    for rs, re_ in _blocks(len(X), block):
        for cs, ce in _blocks(len(X), block):
            if ce <= rs:
                continue  # below the diagonal: found from the other side
            s = X[rs:re_] @ X[cs:ce].T
            i, j = np.nonzero(s >= threshold)
            i, j = i + rs, j + cs
            upper = i < j
            yield i[upper], j[upper], s[i[upper] - rs, j[upper] - cs]


def _faiss_index(base: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, np.float32))
    return index
