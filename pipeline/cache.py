"""The feature cache: one HDF5 file per (dataset, backbone, preprocessing, dtype), readable with plain h5py.

Layout (see DESIGN.md): ``ids``, ``content_hash``, ``labels``, ``splits``, ``valid``, ``features/<tap>``,
``failures`` (id, stage, reason), ``stamps`` (each file's :func:`~pipeline.sources.file_stamp` when it was
hashed, zeros for none), ``listed`` (whether the source listed the row's image at its last ``extract``: a
row of an image deleted or renamed since keeps its features, for ``predict`` to reuse, but is no image of the
source any more) and attributes (schema version, backbone, weights sha256, data config,
taps, dtype, library versions, creation time, ``complete``).

Crash safety: each batch's features are written and flushed before its ``valid`` flags are set and
flushed, and a row whose image changed is marked invalid (and flushed) before its new hash is written,
so a writer killed at any point never leaves a row marked valid that does not hold that image's features.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from glob import escape as glob_escape
from functools import cached_property
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from .data import HASH_BYTES, content_hash as file_hash
from .errors import PipelineError
from .files import atomic_path
from .locks import CacheLock, lock_cache, lock_holder, open_h5
from .sources import STAMP_WIDTH, UNREADABLE, ImageSource, Stamps, location_exists
from .spec import DECODE_BEFORE, FeatureSpec, spec_from_attrs
from .workers import private_fd, release_fd

SCHEMA_VERSION = 1
_STR = h5py.string_dtype("utf-8")
_HASH = f"S{HASH_BYTES}"
_FAILURE = np.dtype([("id", _STR), ("stage", _STR), ("reason", _STR)])
_CHUNK_ROWS = 256
DENSE_SPAN = 2  # rows asked for spanning at most this many times their number are read as one slab


def cache_path(cache_dir: str | os.PathLike, source_name: str, spec: FeatureSpec) -> Path:
    """``<source>__<backbone>__<spec key>.h5``: a change to anything that determines the features is a new file."""
    return Path(cache_dir) / f"{source_name}__{re.sub(r'[^A-Za-z0-9._=-]+', '_', spec.backbone)}__{spec.key}.h5"


def spec_to_write(cache_dir: str | os.PathLike, source_name: str, spec: FeatureSpec, decode: str | None) -> FeatureSpec:
    """The spec of the cache that extraction with ``decode`` (None: none asked for, so ``spec`` has the
    new default's) writes: ``spec``, unless no decode was asked for and ``cache_dir`` holds this source's
    cache of the same spec decoded as caches were before that default, and none decoded with it: then
    that cache's, so an upgrade recomputes no cache."""
    before = replace(spec, decode=DECODE_BEFORE)
    if decode is None and not cache_path(cache_dir, source_name, spec).is_file() \
            and cache_path(cache_dir, source_name, before).is_file():
        return before
    return spec


def refuse_folder(path: Path) -> None:
    """A folder where one cache file is wanted is refused, naming the caches in it."""
    if path.is_dir():
        names = ", ".join(p.name for p in sorted(path.glob("*.h5"))) or "none"
        raise PipelineError(f"{path} is a folder; give one cache file in it (*.h5 there: {names})")


def whole_digests(hashes: np.ndarray) -> np.ndarray:
    """sha256 digests as their 32 bytes each (an object array): numpy's fixed-width bytes drop trailing
    zero bytes, which would make one digest in 256 compare unequal to the same digest read elsewhere."""
    return np.array([bytes(h).ljust(HASH_BYTES, b"\0") for h in hashes], dtype=object)


def held_stamps(path: Path) -> Stamps | None:
    """The rows of the cache ``path`` whose file's stamp was kept when it was hashed (None: none were,
    or no cache is there), read by the run that holds its lock (a reader refuses a cache being written)."""
    try:
        with open_h5(path, "r") as f:
            if not _has_column(f, "stamps"):
                return None
            stamps = f["stamps"][()]
            kept = np.flatnonzero(stamps.any(axis=1))
            if not len(kept):
                return None
            return Stamps(f["ids"].asstr()[()][kept].astype(object), stamps[kept], whole_digests(f["content_hash"][()][kept]))
    except (OSError, KeyError):  # no file, not a cache: its files are read
        return None


def same_spec_caches(path: Path) -> list[Path]:
    """The other caches in ``path``'s folder made with the same backbone and feature spec (other sources'),
    whose rows may hold the features of the same images."""
    suffix = path.name.split("__", 1)[1] if "__" in path.name else path.name
    return sorted(p for p in path.parent.glob(f"*__{glob_escape(suffix)}") if p != path and p.is_file())


def shard_path(path: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of a ``world``-process run writes its part of the cache ``path``."""
    return path.with_name(f"{path.stem}.shards") / f"rank{rank}-of-{world}.h5"


def find_caches(paths: list[str | os.PathLike]) -> list[Path]:
    """Cache files named directly, or every ``*.h5`` in a named directory."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.h5"))
            if not found:
                raise PipelineError(f"no cache files (*.h5) in {p}; run `pipeline extract` first")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise PipelineError(f"no such cache file or directory: {p}")
    return out


_ROW_ARRAYS = ("ids", "labels", "splits", "content_hash", "valid")
# Per-row columns a cache may lack (made before they were kept, or rows edited with plain h5py): one of
# another length than the ids is none; the next extract makes them. Name -> (values a row, dtype).
_ROW_COLUMNS = {"stamps": ((STAMP_WIDTH,), np.int64), "listed": ((), bool)}
_ATTRS = ("schema_version", "backbone", "weights_sha256", "data_config", "dtype", "taps")


def schema_problems(f: h5py.File, scan_values: bool = False) -> list[str]:
    """What in ``f`` does not match the cache schema: datasets, shapes, dtypes, attributes, version.
    With ``scan_values``, also NaN/inf in valid rows (read by chunks), failures naming unknown ids, and
    a ``complete`` flag that is not true."""
    p: list[str] = []
    missing = [k for k in (*_ROW_ARRAYS, "features", "failures") if k not in f]
    missing += [f"attribute {a}" for a in _ATTRS if a not in f.attrs]
    if missing:
        return [f"missing: {', '.join(missing)}"]
    if int(f.attrs["schema_version"]) != SCHEMA_VERSION:
        p.append(f"schema version {f.attrs['schema_version']}, this version reads {SCHEMA_VERSION}")
    n = f["ids"].shape[0]
    for k in _ROW_ARRAYS:
        if f[k].shape != (n,):
            p.append(f"{k} has shape {f[k].shape}, expected ({n},)")
    if f["valid"].dtype != bool:
        p.append(f"valid has dtype {f['valid'].dtype}, expected bool")
    taps = list(f["features"])
    if json.loads(f.attrs["taps"]) != taps:
        p.append(f"attribute taps {f.attrs['taps']} does not match the feature datasets {taps}")
    for tap in taps:
        ds = f["features"][tap]
        if ds.ndim != 2 or ds.shape[0] != n:
            p.append(f"features/{tap} has shape {ds.shape}, expected ({n}, D)")
        elif str(ds.dtype) != str(f.attrs["dtype"]):
            p.append(f"features/{tap} is {ds.dtype}, the cache says {f.attrs['dtype']}")
    if p or not scan_values:
        return p
    valid = f["valid"][()]
    for tap in taps:
        ds = f["features"][tap]
        for start in range(0, n, 65536):  # by chunks: a cache may be larger than memory
            if not np.isfinite(ds[start:start + 65536][valid[start:start + 65536]]).all():
                p.append(f"features/{tap}: a valid row holds NaN or inf (near row {start})")
                break
    ids = set(f["ids"].asstr()[()])
    failed = {sid for sid, _, _ in _read_failures(f["failures"])}
    if failed - ids:
        p.append(f"failures name ids the cache does not have, e.g. {sorted(failed - ids)[0]!r}")
    if f.attrs.get("complete") and int(valid.sum()) + len(failed & ids) < n:
        p.append("marked complete, but some rows are neither valid nor recorded failures")
    return p


class FeatureCache:
    """Read access to a cache file: ids, labels, splits, valid mask, features per tap, failures.

    The per-row arrays are read once and kept: the file is open read-only.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_folder(self.path)
        try:
            # Checked first: where HDF5's locking is off (no file locks), only the lock file tells.
            self._refuse_while_written()
            self._file = open_h5(self.path, "r")
        except OSError as e:
            self._refuse_while_written()
            raise PipelineError(f"cannot open cache {self.path}: {e}") from e
        self._fd = private_fd(self._file.id.get_vfd_handle())
        problems = schema_problems(self._file)  # files from elsewhere are checked before anything is read
        if problems:
            self.close()
            raise PipelineError(f"{self.path} is not a feature cache of this version: {problems[0]}")
        # A missing shard would read as the virtual dataset's fill value, silently: refuse instead.
        lost = [s for s in json.loads(self._file.attrs.get("shards", "[]")) if not (self.path.parent / s).is_file()]
        if lost:
            self.close()
            raise PipelineError(f"{self.path} presents shard files that are missing: {', '.join(lost)}")

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        release_fd(self._fd)
        self._file.close()

    def _refuse_while_written(self) -> None:
        holder = lock_holder(self.path)
        if holder:
            raise PipelineError(f"cache {self.path} is being written by another process ({holder}); read it when that run ends")

    @property
    def attrs(self) -> dict:
        a = dict(self._file.attrs)
        for k in ("data_config", "taps", "versions", "shards"):
            if k in a:
                a[k] = json.loads(a[k])
        return a

    @property
    def backbone(self) -> str:
        return str(self._file.attrs["backbone"])

    @cached_property
    def spec(self) -> FeatureSpec:
        """What determines this cache's features (see :mod:`pipeline.spec`)."""
        return spec_from_attrs(dict(self._file.attrs))

    @property
    def taps(self) -> list[str]:
        return list(self._file["features"].keys())

    @cached_property
    def ids(self) -> np.ndarray:
        return self._file["ids"].asstr()[()].astype(object)

    @cached_property
    def labels(self) -> np.ndarray:
        return self._file["labels"].asstr()[()].astype(object)

    @cached_property
    def splits(self) -> np.ndarray:
        return self._file["splits"].asstr()[()].astype(object)

    @cached_property
    def valid(self) -> np.ndarray:
        return self._file["valid"][()]

    @cached_property
    def listed(self) -> np.ndarray:
        """Whether each row's image is one the source listed at the last ``extract`` (every row where the
        cache does not say: made before this was kept)."""
        return self._file["listed"][()] if _has_column(self._file, "listed") else np.ones(len(self.ids), bool)

    @cached_property
    def current(self) -> np.ndarray:
        """The rows with features of an image the source still lists: the images ``audit`` and
        ``neighbors`` look at (a deleted or renamed image's row is kept only for ``predict`` to reuse)."""
        return self.valid & self.listed

    @cached_property
    def content_hash(self) -> np.ndarray:
        """Each row's sha256 as the 32 bytes ``data.content_hash`` returns (see :func:`whole_digests`)."""
        return whole_digests(self._file["content_hash"][()])

    @cached_property
    def _row_of_id(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.ids)}

    def find_rows(self, ids: Sequence[str]) -> np.ndarray:
        """The row of each sample id, in ``ids`` order, -1 for an id the cache does not hold."""
        return np.fromiter((self._row_of_id.get(sid, -1) for sid in ids), np.int64, len(ids))

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """The row of each sample id, in ``ids`` order (``features(tap, rows_of(ids))`` reads them); an
        error names an id the cache does not hold."""
        rows = self.find_rows(ids)
        if (rows < 0).any():
            missing = np.asarray(ids, dtype=object)[rows < 0]
            raise PipelineError(f"{len(missing)} id(s) not in cache {self.path.name}, e.g. {missing[0]!r}; ids are "
                                "paths relative to the data root, a manifest's ids or an imported file's id column")
        return rows

    def rows_of_files(self, paths: list[Path]) -> dict[int, int]:
        """For each file (by position in ``paths``) whose bytes a valid row holds, that row: the file's own
        (its id, where the file is in the source folder the cache was made from and unchanged), else one
        the source still lists, else any: an image is found by content, whatever its name, and a file is
        its own row, not its copy's. Unreadable files are left out."""
        rows = np.r_[np.flatnonzero(self.valid & ~self.listed), np.flatnonzero(self.current)]  # the last one wins
        stored = dict(zip(self.content_hash[rows].tolist(), rows.tolist()))
        root = str(self._file.attrs.get("source_location", ""))
        root = root if root and Path(root).is_dir() else ""
        found = {}
        for i, path in enumerate(paths):
            try:
                digest = file_hash(path)
            except OSError:
                continue
            own = self._row_of_id.get(_id_under(root, Path(path)))
            if own is not None and self.valid[own] and self.content_hash[own] == digest:
                found[i] = own
            elif digest in stored:
                found[i] = stored[digest]
        return found

    def features(self, tap: str = "pooled", rows: np.ndarray | None = None) -> np.ndarray:
        """Features of ``tap`` as float32 (scikit-learn would copy float16 to float64), all rows or ``rows``
        (in any order, a row more than once too)."""
        if tap not in self._file["features"]:
            raise PipelineError(f"{self.path.name} has no tap {tap!r}; it has {', '.join(self.taps)}")
        ds = self._file["features"][tap]
        if rows is None:
            return ds[()].astype(np.float32)
        rows = np.asarray(rows)
        out = np.empty((len(rows), ds.shape[1]), np.float32)
        if len(rows):
            order = np.argsort(rows, kind="stable")  # h5py reads rows in strictly increasing order only
            ordered = rows[order]
            lo, hi = int(ordered[0]), int(ordered[-1]) + 1
            if hi - lo <= DENSE_SPAN * len(rows):  # one slab and a take: h5py selects listed rows one by one
                out[order] = ds[lo:hi][ordered - lo]
            else:
                first = np.r_[True, ordered[1:] != ordered[:-1]]
                out[order] = ds[ordered] if first.all() else ds[ordered[first]][np.cumsum(first) - 1]
        return out

    @property
    def failures(self) -> list[tuple[str, str, str]]:
        return _read_failures(self._file["failures"])

    def info(self) -> dict:
        """A summary a person can read: backbone, rows valid/failed, taps and dims, size on disk."""
        a = self.attrs
        valid = self.valid
        return {
            "path": str(self.path),
            "backbone": a["backbone"],
            "weights_sha256": a["weights_sha256"],
            "weights_source": a.get("weights_source", ""),
            "source": a.get("source", ""),
            "source_location": str(a.get("source_location", "")),
            "rows": int(len(valid)),
            "valid": int(valid.sum()),
            "no_longer_listed": int((~self.listed).sum()),
            "failed": len(self.failures),
            "taps": {t: int(self._file["features"][t].shape[1]) for t in self.taps},
            "dtype": a["dtype"],
            "data_config": a["data_config"],
            "complete": bool(a.get("complete", False)),
            "amp": a.get("amp", "off"),
            "tta": a.get("tta", ""),
            "spec": self.spec.to_dict(),
            "shards": len(a.get("shards", [])),
            "schema_version": int(a["schema_version"]),
            "created": a.get("created", ""),
            "size_bytes": self.path.stat().st_size,
        }


@dataclass
class SyncResult:
    """What a writer must do for a source: rows to compute, and how many were reused or changed."""

    todo: np.ndarray  # row indices to (re)compute, ascending
    indices: np.ndarray  # the source's index of the sample of each todo row
    reused: int
    changed: int
    new: int
    copied: int = 0  # of the reused rows, copied from other caches of the same spec
    gone: int = 0  # valid rows of images the source no longer lists (deleted or renamed), kept for predict


class CacheWriter:
    """Exclusive write access to one cache file (created if absent), held by its lock (``pipeline.locks``).

    ``spec`` determines the features (a file made with another spec is refused); ``weights_source`` is
    where the weights were read from and ``source`` the data source's name, ``location`` where it is
    (see :func:`pipeline.sources.source_location`); ``tap_dims`` maps each requested tap to its width.
    ``lock``: the file's lock, taken by the caller (who releases it), else taken here.
    """

    def __init__(self, path: str | os.PathLike, spec: FeatureSpec, weights_source: str, source: str,
                 tap_dims: dict[str, int], lock: CacheLock | None = None, location: str = ""):
        self.path = Path(path)
        self.spec, self.dtype = spec, spec.dtype
        self._own_lock = lock_cache(self.path) if lock is None else None  # released by close()
        try:
            if not self.path.exists():
                _create(self.path, spec, weights_source, source, tap_dims)
            elif not h5py.is_hdf5(self.path):  # HDF5 would open an empty file for writing, and write into it
                raise OSError(f"{self.path.stat().st_size} bytes that are not an HDF5 file")
            # No chunk cache: each batch's chunks reach the disk inside the write call, so a full disk is
            # an OSError there, before any row is marked valid. (With a cache, HDF5 reports it at a later
            # flush or garbage collection, and the process can crash at exit.)
            self._file = open_h5(self.path, "r+", rdcc_nbytes=0)
        except OSError as e:
            self._release_lock()
            raise PipelineError(f"cannot open cache {self.path} for writing: {e}; move it away or use another "
                                "--cache") from e
        self._fd = private_fd(self._file.id.get_vfd_handle())
        try:
            problems = schema_problems(self._file)
            if problems:
                raise PipelineError(f"{self.path} is not a feature cache of this version: {problems[0]}; move it "
                                    "away or use another --cache")
            _refuse_distributed(self._file, self.path)
            _check_spec(self._file, self.path, spec)
            _check_location(self._file, self.path, location)
        except PipelineError:
            self.close()
            raise
        _add_taps(self._file, tap_dims, self.dtype)
        self.taps = list(self._file["features"].keys())
        self._feature_sets = {tap: self._file["features"][tap] for tap in self.taps}
        self._valid = self._file["valid"]
        self._failures = _FailureLog(self._file["failures"])
        self._ids: list[str] = list(self._file["ids"].asstr()[()])  # every row's id, looked up per batch

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file:
            release_fd(self._fd)
            try:
                self._file.close()
            except (OSError, RuntimeError):
                pass  # after a failed write (disk full): the rows flushed before it are what the file holds
            self._file = None
            self._release_lock()

    def _release_lock(self) -> None:
        if self._own_lock is not None:
            self._own_lock.release()

    def sync(self, source: "ImageSource", hashes: np.ndarray, read_errors: dict[str, str] | None = None,
             retry_failed: bool = False, stamps: np.ndarray | None = None) -> SyncResult:
        """Match a source's samples against the stored rows; append new ones; invalidate changed ones.

        ``hashes[i]`` is the content hash of sample ``i`` (``UNREADABLE`` when its bytes could not be
        read, with the reason in ``read_errors[id]``); ``stamps[i]`` its file's stamp (none: zeros). Labels (and their kind) and splits are rewritten to
        the source's; rows no longer in the source keep their features (for reuse by ``predict``) and lose
        their label. A row that failed before is retried only when its bytes changed, or with
        ``retry_failed``.
        """
        f, ids = self._file, source.ids
        hashes = np.asarray(hashes, dtype=_HASH)
        stored_hashes = f["content_hash"][()]
        stored_valid = f["valid"][()]
        match = _RowMatch.of(self._ids, ids, hashes, stored_hashes, stored_valid)
        changed_rows = np.sort(match.rows[match.changed])
        if len(changed_rows):
            f["valid"][changed_rows] = False
            _flush(f)  # invalid before the new hash goes in
            self._failures.forget(self._ids[r] for r in changed_rows)
        _append_rows(f, ids[match.is_new])
        self._ids.extend(ids[match.is_new])
        _rewrite_row_facts(f, source, match.rows, hashes, stored_hashes)
        listed = _rewrite_listed(f, match.rows)
        _rewrite_stamps(f, match.rows, np.zeros((len(ids), STAMP_WIDTH), np.int64) if stamps is None else stamps)

        unreadable = hashes == UNREADABLE
        reasons = read_errors or {}
        self._failures.record((sid, "read", reasons.get(sid, "file could not be read")) for sid in ids[unreadable])
        skip = unreadable if retry_failed else np.fromiter((sid in self._failures for sid in ids), bool, len(ids))
        self._failures.save()
        f.attrs["complete"] = False
        _flush(f)
        gone = stored_valid & ~listed[:len(stored_valid)]  # the rows appended above are all listed
        return replace(match.plan(skip), gone=int(gone.sum()))

    def copy_from(self, others: Iterable[Path], plan: SyncResult, hashes: np.ndarray) -> SyncResult:
        """Copy the features of ``plan``'s images that this cache's other rows or other caches of this
        spec hold valid (matched by content hash, with every tap of this one), and return what is left to
        compute: a renamed image, or the same bytes listed by another source (a parquet file of a folder's
        images), cost no forward pass. ``copied`` counts those from other caches. A cache being written,
        or of another version, is passed over."""
        if not len(plan.todo):  # an unchanged re-run: no hash column read
            return plan
        wanted = whole_digests(np.asarray(hashes, _HASH)[plan.indices])
        left = ~self._copy_rows(self._valid[()], whole_digests(self._file["content_hash"][()]),
                                lambda tap, donors: self._feature_sets[tap][donors], plan.todo, wanted,
                                np.ones(len(plan.todo), bool))  # the rows to compute are not valid: never donors
        own = int((~left).sum())
        for path in others:
            if not left.any():
                break
            try:
                with FeatureCache(path) as other:
                    if other.spec == self.spec and set(self.taps) <= set(other.taps):
                        left &= ~self._copy_rows(other.valid, other.content_hash, other.features, plan.todo, wanted, left)
            except PipelineError:
                continue
        return replace(plan, todo=plan.todo[left], indices=plan.indices[left], reused=plan.reused + int((~left).sum()),
                       copied=int((~left).sum()) - own)

    def _copy_rows(self, valid: np.ndarray, hashes: np.ndarray, read: Callable[[str, np.ndarray], np.ndarray],
                   rows: np.ndarray, wanted: np.ndarray, open_: np.ndarray) -> np.ndarray:
        """Write into ``rows`` (where ``open_``) the features (``read(tap, sorted rows)``) of a donor's valid
        rows (``valid``, ``hashes``) of the same hash; the mask of the rows written."""
        keys = set(wanted[open_].tolist())
        if not keys:
            return np.zeros(len(rows), bool)
        donor_rows = np.flatnonzero(valid)
        row_of = {h: r for h, r in zip(hashes[donor_rows].tolist(), donor_rows.tolist()) if h in keys}
        found = np.fromiter((o and h in row_of for h, o in zip(wanted.tolist(), open_)), bool, len(rows))
        hits = np.flatnonzero(found)
        for start in range(0, len(hits), _CHUNK_ROWS * 16):
            part = hits[start:start + _CHUNK_ROWS * 16]
            donors, back = np.unique([row_of[h] for h in wanted[part].tolist()], return_inverse=True)
            self.write(rows[part], {tap: read(tap, donors)[back] for tap in self.taps})
        return found

    def write(self, rows: np.ndarray, features: dict[str, np.ndarray]) -> None:
        """Store one batch: features first, flushed, then the rows' ``valid`` flags, flushed."""
        if not len(rows):
            return
        order, sel = _selection(rows)
        for tap in self.taps:
            self._feature_sets[tap][sel] = features[tap][order].astype(self.dtype)
        _flush(self._file)
        self._valid[sel] = True
        if self._failures.forget(self._ids[r] for r in rows):
            self._failures.save()
        _flush(self._file)

    def record_failures(self, failures: list[tuple[str, str, str]]) -> None:
        """Record (id, stage, reason) for samples that could not be decoded or processed."""
        if failures:
            self._failures.record(failures)
            self._failures.save()
        _flush(self._file)

    def failed_ids(self) -> set[str]:
        return self._failures.ids()

    def finish(self) -> None:
        """Mark the cache complete when every row is valid or a recorded failure."""
        valid = self._file["valid"][()]
        self._file.attrs["complete"] = bool(all(v or sid in self._failures for v, sid in zip(valid, self._ids)))
        _flush(self._file)


def _create(path: Path, spec: FeatureSpec, weights_source: str, source: str, tap_dims: dict[str, int]) -> None:
    """An empty cache at ``path``: its datasets and attributes (the spec whole, and its facts one by one
    for readers with plain h5py). Made whole under a temporary name, so a run killed while creating it
    leaves no file."""
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        for name, dtype in (("ids", _STR), ("labels", _STR), ("splits", _STR), ("content_hash", _HASH),
                            ("valid", bool)):
            f.create_dataset(name, (0,), dtype=dtype, maxshape=(None,), chunks=(4096,))
        f.create_dataset("failures", (0,), dtype=_FAILURE, maxshape=(None,), chunks=(256,))
        for name, (width, dtype) in _ROW_COLUMNS.items():
            f.create_dataset(name, (0, *width), dtype=dtype, maxshape=(None, *width), chunks=(4096, *width))
        f.create_group("features")
        _add_taps(f, tap_dims, spec.dtype)
        f.attrs.update(
            schema_version=SCHEMA_VERSION,
            feature_spec=spec.to_json(),
            backbone=spec.backbone,
            weights_sha256=spec.weights_sha256,
            weights_source=weights_source,
            data_config=json.dumps(spec.data_config, sort_keys=True),
            dtype=spec.dtype,
            source=source,
            amp=spec.amp,
            tta=spec.tta,
            versions=json.dumps(library_versions()),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            complete=False,
        )
        f.flush()


def _add_taps(f: h5py.File, tap_dims: dict[str, int], dtype: str) -> None:
    """A chunked ``features/<tap>`` dataset for each tap ``f`` lacks. Stored rows lack the new taps, so
    every row is then computed again (all taps together)."""
    group = f["features"]
    new = [t for t in tap_dims if t not in group]
    n = f["ids"].shape[0]
    for tap in new:
        dim = tap_dims[tap]
        group.create_dataset(tap, (n, dim), dtype=dtype, maxshape=(None, dim), chunks=(_CHUNK_ROWS, dim))
    if new and n:
        f["valid"][:] = False
        f.attrs["complete"] = False
    f.attrs["taps"] = json.dumps(list(group.keys()))
    _flush(f)


def _refuse_distributed(f: h5py.File, path: Path) -> None:
    """A cache over a distributed run's shards is updated by a run of as many processes, never by one."""
    if "shards" in f.attrs:
        n = len(json.loads(f.attrs["shards"]))
        raise PipelineError(
            f"{path} was written by a distributed run of {n} processes; run the same command with "
            f"`torchrun --nproc-per-node {n}` to update it, or use another --cache"
        )


def _check_spec(f: h5py.File, path: Path, spec: FeatureSpec) -> None:
    """A file made with another feature spec holds other features: refused."""
    have = spec_from_attrs(dict(f.attrs))
    if have != spec:
        raise PipelineError(f"{path} was made with another feature spec ({have.describe()}), not "
                            f"({spec.describe()}); use another --cache")


def _id_under(root: str, path: Path) -> str | None:
    """The id a folder source at ``root`` gives the file ``path`` (None: not under it, or no folder: "")."""
    try:
        return path.resolve().relative_to(root).as_posix() if root else None
    except (OSError, ValueError):
        return None


def check_source(path: Path, location: str) -> None:
    """Refuse a source at ``location`` that the cache ``path`` (if there is one) does not hold the images
    of (:func:`_check_location`), read only: ``extract`` asks before it lists and hashes any file."""
    try:
        f = open_h5(path, "r")
    except OSError:  # no cache yet, or not one: the writer decides
        return
    with f:
        _refuse_other_source(f, path, location)


def _check_location(f: h5py.File, path: Path, location: str) -> None:
    """One cache file, one data source: the file names only the source's name, so another source of
    that name (two folders called ``data``, shards and a parquet file called ``data``) is refused while
    the one the file holds still exists; where it no longer does, the source was moved and the file
    follows it (``location`` is recorded)."""
    _refuse_other_source(f, path, location)
    if location and str(f.attrs.get("source_location", "")) != location:
        f.attrs["source_location"] = location


def _refuse_other_source(f: h5py.File, path: Path, location: str) -> None:
    had = str(f.attrs.get("source_location", ""))
    if location and had and had != location and location_exists(had):
        raise PipelineError(f"{path} holds the images of {had}, not of {location}: two data sources named "
                            f"{f.attrs.get('source', '')!r} cannot share a cache folder; give this one another --name, or use another --cache")


@dataclass
class _RowMatch:
    """A source's samples matched by id to the stored rows, before anything is written."""

    rows: np.ndarray  # each sample's row: its stored one, or a new one after the stored rows
    is_new: np.ndarray  # the sample has no stored row
    changed: np.ndarray  # its stored row holds other bytes (another hash)
    need: np.ndarray  # its row is to be computed: new, changed, or not valid

    @classmethod
    def of(cls, stored_ids: list[str], ids: np.ndarray, hashes: np.ndarray, stored_hashes: np.ndarray,
           stored_valid: np.ndarray) -> "_RowMatch":
        index = {sid: i for i, sid in enumerate(stored_ids)}
        is_new = np.fromiter((sid not in index for sid in ids), bool, len(ids))
        rows = np.empty(len(ids), np.int64)
        rows[~is_new] = [index[sid] for sid in ids[~is_new]]
        rows[is_new] = len(stored_ids) + np.arange(int(is_new.sum()))
        changed = np.zeros(len(ids), bool)
        changed[~is_new] = stored_hashes[rows[~is_new]] != hashes[~is_new]
        need = np.ones(len(ids), bool)
        need[~is_new] = ~stored_valid[rows[~is_new]]
        return cls(rows, is_new, changed, need | changed)

    def plan(self, skip: np.ndarray) -> SyncResult:
        """The rows needed and not skipped, in row order, with their samples and the counts."""
        todo = self.need & ~skip
        order = np.argsort(self.rows[todo])
        return SyncResult(
            todo=self.rows[todo][order], indices=np.flatnonzero(todo)[order],
            reused=int((~self.need).sum()), changed=int(self.changed.sum()), new=int(self.is_new.sum()),
        )


def _append_rows(f: h5py.File, ids: np.ndarray) -> None:
    """Rows for ``ids`` after the stored ones, in every per-row dataset and every tap, not valid."""
    if not len(ids):
        return
    n_old = f["ids"].shape[0]
    n = n_old + len(ids)
    for name in _ROW_ARRAYS:
        f[name].resize((n,))
    for ds in f["features"].values():
        ds.resize((n, ds.shape[1]))
    for name in _ROW_COLUMNS:
        if _has_column(f, name, n_old):
            f[name].resize((n, *f[name].shape[1:]))
    f["ids"][n_old:] = list(ids)
    f["valid"][n_old:] = False


def _rewrite_row_facts(f: h5py.File, source: "ImageSource", rows: np.ndarray, hashes: np.ndarray,
                       stored_hashes: np.ndarray) -> None:
    """Every row's hash, label and split as the source says (sample ``i`` is row ``rows[i]``); a row the
    source no longer has keeps its hash and loses its label and split."""
    n = f["ids"].shape[0]
    column = np.concatenate([stored_hashes, np.zeros(n - len(stored_hashes), _HASH)])
    column[rows] = hashes
    labels = np.full(n, "", dtype=object)
    splits = np.full(n, "", dtype=object)
    labels[rows] = source.labels
    splits[rows] = source.splits
    f["content_hash"][:] = column
    f["labels"][:] = labels
    f["splits"][:] = splits
    f.attrs["label_kind"] = source.label_kind


def _has_column(f: h5py.File, name: str, n: int | None = None) -> bool:
    """Whether ``f`` has the column ``name`` with a value per row (``n`` rows; by default its ids')."""
    width, _ = _ROW_COLUMNS[name]
    return name in f and f[name].shape == (f["ids"].shape[0] if n is None else n, *width)


def _row_column(f: h5py.File, name: str) -> h5py.Dataset:
    """The column ``name``, made (zeros) where ``f`` lacks it or has one of another length."""
    if not _has_column(f, name):
        if name in f:
            del f[name]
        width, dtype = _ROW_COLUMNS[name]
        n = f["ids"].shape[0]
        f.create_dataset(name, (n, *width), dtype=dtype, maxshape=(None, *width), chunks=(4096, *width))
    return f[name]


def _rewrite_stamps(f: h5py.File, rows: np.ndarray, stamps: np.ndarray) -> None:
    """Each listed row's stamp (a row the source no longer has keeps its own); written once the hashes
    are on disk, so a run killed between the two leaves a stamp older than its hash, which only costs a
    read."""
    _flush(f)
    ds = _row_column(f, "stamps")
    column = ds[()]
    column[rows] = stamps
    ds[:] = column


def _rewrite_listed(f: h5py.File, rows: np.ndarray) -> np.ndarray:
    """``listed``: the rows ``rows`` (the source's samples) and no other; the column written."""
    ds = _row_column(f, "listed")
    column = np.zeros(len(ds), bool)
    column[rows] = True
    ds[:] = column
    return column


class _FailureLog:
    """The ``failures`` table, kept in memory (id -> (stage, reason)) and written whole, sorted by id."""

    def __init__(self, ds: h5py.Dataset):
        self._ds = ds
        self._entries = {sid: (stage, reason) for sid, stage, reason in _read_failures(ds)}

    def __contains__(self, sid: str) -> bool:
        return sid in self._entries

    def ids(self) -> set[str]:
        return set(self._entries)

    def record(self, failures: Iterable[tuple[str, str, str]]) -> None:
        for sid, stage, reason in failures:
            self._entries[sid] = (stage, reason)

    def forget(self, ids: Iterable[str]) -> bool:
        """Drop the entries of ``ids`` (their rows were computed again); whether any was there."""
        dropped = False
        for sid in ids:
            dropped |= self._entries.pop(sid, None) is not None
        return dropped

    def save(self) -> None:
        """Rewrite the table from memory (not flushed: the caller flushes)."""
        table = np.array([(k, *v) for k, v in sorted(self._entries.items())], dtype=_FAILURE)
        self._ds.resize((len(table),))
        if len(table):
            self._ds[:] = table


def _read_failures(ds: h5py.Dataset) -> list[tuple[str, str, str]]:
    """The rows of a ``failures`` table as (id, stage, reason) strings (h5py reads them as bytes)."""
    return [tuple(x.decode() if isinstance(x, bytes) else x for x in r) for r in ds[()]]


def _selection(rows: np.ndarray) -> tuple[np.ndarray, slice | np.ndarray]:
    """The order that sorts a batch's rows, and the sorted rows as h5py selects them: a slice where they
    are contiguous (one write), else the rows themselves (h5py takes them in increasing order only)."""
    order = np.argsort(rows)
    rows = np.asarray(rows)[order]
    if rows[-1] - rows[0] + 1 == len(rows):
        return order, slice(int(rows[0]), int(rows[-1]) + 1)
    return order, rows


def _flush(f: h5py.File) -> None:
    """Flush to disk; a write the file system refuses is an OSError (h5py reports some as RuntimeError)."""
    try:
        f.flush()
    except RuntimeError as e:
        found = re.search(r"errno = (\d+), error message = '([^']*)'", str(e))
        raise OSError(*(int(found[1]), found[2]) if found else (errno.EIO, str(e).splitlines()[0])) from e


def check_master(path: Path, world: int) -> None:
    """Refuse to let a ``world``-process run replace ``path`` when it is not a cache over that many shards."""
    if not path.exists():
        return
    try:
        with open_h5(path, "r") as f:
            shards = json.loads(f.attrs.get("shards", "null"))
    except OSError as e:
        raise PipelineError(f"cannot read cache {path}: {e}") from e
    if shards is None:
        raise PipelineError(f"{path} was written by a single process; run without torchrun to update it, or use another --cache")
    if len(shards) != world:
        raise PipelineError(
            f"{path} was written by {len(shards)} processes, not {world}; use `torchrun --nproc-per-node "
            f"{len(shards)}` to update it, or use another --cache"
        )


def write_master(path: Path, shards: list[Path]) -> None:
    """Write ``path`` as one cache over the shard files: per-row arrays and failures copied, features as
    HDF5 virtual datasets that map onto the shards' rows (shard paths stored relative to ``path``)."""
    parts = {k: [] for k in ("ids", "labels", "splits", "content_hash", "valid", "failures")}
    sizes, dims, attrs, dtypes = [], {}, {}, {}
    for shard in shards:
        with open_h5(shard, "r") as f:
            for k in parts:
                parts[k].append(f[k][()])
                dtypes[k] = f[k].dtype
            sizes.append(f["ids"].shape[0])
            dims = {t: (ds.shape[1], ds.dtype) for t, ds in f["features"].items()}
            attrs = {**dict(f.attrs), "complete": bool(attrs.get("complete", True) and f.attrs.get("complete", False))}
    rel = [os.path.relpath(s, path.parent) for s in shards]
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        for k, arrays in parts.items():
            f.create_dataset(k, data=np.concatenate(arrays), dtype=dtypes[k], maxshape=(None,))
        group = f.create_group("features")
        for tap, (dim, dtype) in dims.items():
            layout = h5py.VirtualLayout((sum(sizes), dim), dtype)
            start = 0
            for name, n in zip(rel, sizes):
                if n:
                    layout[start:start + n] = h5py.VirtualSource(name, f"features/{tap}", shape=(n, dim))
                    start += n
            group.create_virtual_dataset(tap, layout, fillvalue=np.nan)
        f.attrs.update(attrs)
        f.attrs["shards"] = json.dumps(rel)


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("pipeline", "torch", "timm", "h5py", "numpy", "pillow", "scikit-learn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out
