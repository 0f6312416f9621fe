"""Checking a cache: its schema and valid mask, read with plain h5py, and whether a random sample of
its rows still comes out the same when extracted again (drift in weights, preprocessing, libraries).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backbones import load_backbone
from ..cache import FeatureCache, refuse_folder, schema_problems
from ..data import content_hash
from ..sources import load_source
from ..errors import PipelineError
from ..featurizer import Featurizer
from ..locks import open_h5
from ..spec import SAME_SPEC_MIN_COSINE as MIN_COSINE


@dataclass
class VerifyReport:
    """What ``verify`` found: problems (empty means the cache is sound) and the sample it re-extracted."""

    path: Path
    problems: list[str] = field(default_factory=list)
    checked_rows: int = 0
    min_cosine: dict[str, float] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | os.PathLike, data: str | os.PathLike | None = None, sample: int = 16, seed: int = 0,
           weights: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 16) -> VerifyReport:
    """Check ``path``'s schema and valid mask, then re-extract ``sample`` random valid rows from the
    images in ``data`` (the cache's source folder or manifest) through the cache's own feature spec and
    compare them with the stored ones. ``weights`` replaces the weights the spec names (a mismatch is
    a problem); without it they are found as ``predict`` finds them."""
    report = VerifyReport(Path(path))
    refuse_folder(report.path)
    _check_schema(report)
    if report.problems or sample <= 0:
        return report
    if data is None:
        report.notes.append("no --data given: rows were not re-extracted")
        return report
    with FeatureCache(path) as cache:
        attrs, spec = cache.attrs, cache.spec
        valid_rows = np.flatnonzero(cache.current)  # of the images the source still lists
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(valid_rows, min(sample, len(valid_rows)), replace=False))
        ids, hashes = cache.ids[rows], cache.content_hash[rows]
        stored = {tap: cache.features(tap, rows) for tap in cache.taps}
    by_id = {s.id: s for s in load_source(data, allow_outside_root=True).samples}
    samples, keep = [], []
    for k, (sid, h) in enumerate(zip(ids, hashes)):
        s = by_id.get(sid)
        if s is None or not s.path.is_file():
            report.notes.append(f"{sid}: not in {data}; skipped")
        elif content_hash(s.path) != h:
            report.notes.append(f"{sid}: the image changed since it was extracted; skipped")
        else:
            samples.append(s)
            keep.append(k)
    if not samples:
        report.problems.append(f"none of the {len(ids)} sampled rows is in {data} with the bytes it was extracted from: "
                               "nothing could be compared (is --data the source this cache was made from?)")
        return report
    if weights is None:
        fz = Featurizer.load(spec, recorded=str(attrs.get("weights_source", "")), device=device)
    else:
        fz = Featurizer(spec, load_backbone(spec.backbone, weights, device, spec.amp, channels_last=True))
        report.problems += _spec_problems(spec, fz)
    got: dict[str, list[np.ndarray]] = {t: [] for t in stored}
    order: list[int] = []
    for idx, feats, failed in fz.batches(samples, tuple(stored), batch_size, workers=0):
        for i, err in failed:
            report.problems.append(f"{samples[i].id}: valid in the cache but does not decode now: {err}")
        order.extend(keep[i] for i in idx)
        for t in got:
            got[t].append(feats[t])
    report.checked_rows = len(order)
    for tap, arrays in got.items():
        if not arrays:
            continue
        new, old = np.concatenate(arrays), stored[tap][order]
        cos = (new * old).sum(1) / (np.linalg.norm(new, axis=1) * np.linalg.norm(old, axis=1) + 1e-12)
        report.min_cosine[tap] = float(cos.min())
        report.max_abs_diff[tap] = float(np.abs(new - old).max())
        bad = np.flatnonzero(cos < MIN_COSINE)
        if len(bad):
            report.problems.append(
                f"tap {tap}: {len(bad)} of {len(cos)} re-extracted rows drifted (cosine {cos.min():.4f} < {MIN_COSINE}), "
                f"e.g. {ids[order[bad[0]]]}"
            )
    return report


def _spec_problems(spec, fz: Featurizer) -> list[str]:
    bb, problems = fz.backbone, []
    if bb.weights_sha256 != spec.weights_sha256:
        problems.append(f"weights differ: the cache was made with sha256 {spec.weights_sha256[:16]}…, "
                        f"{bb.weights_source} has {bb.weights_sha256[:16]}…")
    if bb.data_config != spec.data_config:
        problems.append(f"preprocessing differs: cache {spec.data_config}, backbone now {bb.data_config}")
    return problems


def _check_schema(report: VerifyReport) -> None:
    try:
        f = open_h5(report.path, "r")
    except OSError as e:
        raise PipelineError(f"cannot open {report.path} as HDF5: {e}") from e
    with f:
        report.problems.extend(schema_problems(f, scan_values=True))
        if "valid" in f and "failures" in f:
            report.notes.append(f"{int(f['valid'][()].sum())} of {f['valid'].shape[0]} rows valid, "
                                f"{f['failures'].shape[0]} recorded failures")
