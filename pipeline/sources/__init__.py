"""Data sources: which images there are, what they are called, their labels and splits, and where each
one's bytes are; picked by the path's form from a registry.

- ``folder``: ``root/[split/]class/image``;
- ``manifest``: a CSV with a ``path`` column and optional ``label`` (or ``labels``, ``target``),
  ``split`` and ``id`` columns;
- ``webdataset``: ``.tar`` shards (a file, a folder of them, or a brace pattern);
- ``parquet``: a ``.parquet`` file or a folder of them, in the Hugging Face datasets layout.

A source is listed column by column (:class:`ImageSource`): ids, label cells and splits as arrays,
and where the bytes are as a reader that opens one sample on demand, so listing a million images holds
no image and no object per image beyond its id (labels and splits are shared strings). ``content_hash``
is the sha256 of an image's bytes for every source, so a sample is recognised across formats. Adding a
source is one module with a lister and ``@register_source``.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISREG
from typing import Callable, Sequence

import numpy as np

from ..data import HASH_BYTES, Member, Sample, check_split, content_hash
from ..errors import PipelineError

Lister = Callable[[Path, bool], "ImageSource"]


@dataclass
class ImageSource:
    """A listed source, in a stable order: a short name (it names cache files), the ids, each sample's
    label cell (``""`` when none; ``label_kind`` says how to read them: ``classification``,
    ``multilabel``, ``regression``) and split, and ``locate(i)``, where sample ``i``'s bytes are (a path,
    or a :class:`~pipeline.data.Member` of a container). ``hashes`` are the content hashes when the
    listing read the bytes anyway (tar shards, parquet)."""

    name: str
    root: Path
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    locate: Callable[[int], "Path | Member"]
    label_kind: str = "classification"
    hashes: np.ndarray | None = None
    read_errors: dict[str, str] = field(default_factory=dict)
    rows: np.ndarray | None = None  # for a subset: the rows of the source it keeps

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Sample:
        row = int(i if self.rows is None else self.rows[i])
        return Sample(self.ids[i], self.locate(row), self.labels[i], self.splits[i])

    @property
    def samples(self) -> list[Sample]:
        """Every sample as an object (for the few hundred a fine-tune or a check reads, not a listing)."""
        return [self[i] for i in range(len(self))]

    def subset(self, keep: np.ndarray) -> "ImageSource":
        """The samples ``keep`` (a mask or indices) selects, in order."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=np.int64)
        rows = idx if self.rows is None else self.rows[idx]
        return replace(self, ids=self.ids[idx], labels=self.labels[idx], splits=self.splits[idx], rows=rows,
                       hashes=None if self.hashes is None else self.hashes[idx])

    def content_hashes(self, threads: int = 8, known: "Stamps | None" = None) -> tuple[np.ndarray, dict[str, str], np.ndarray]:
        """The sha256 of every sample's bytes (``UNREADABLE`` where they cannot be read, with the reason)
        and each file's stamp (see :class:`Stamps`; zeros for a container's member, an unreadable file,
        or a file changed in the last :data:`RACY_NS`), from the listing when it read them, else read
        now by ``threads`` threads; a file whose stamp ``known`` holds is not read again."""
        stamps = np.zeros((len(self), STAMP_WIDTH), np.int64)
        if self.hashes is not None:
            return self.hashes, {i: r for i, r in self.read_errors.items() if i in set(self.ids)}, stamps
        from concurrent.futures import ThreadPoolExecutor

        errors: dict[str, str] = {}
        settled_before = time.time_ns() - RACY_NS

        def one(i: int) -> bytes:
            path = self[i].path
            try:
                if isinstance(path, Member):
                    return content_hash(path)
                st = os.stat(path)  # before the bytes are read: a file changed meanwhile gets another stamp
                stamp = file_stamp(st)
                digest = known.digest(self.ids[i], stamp) if known is not None and S_ISREG(st.st_mode) else None
                digest = content_hash(path) if digest is None else digest
                if st.st_mtime_ns < settled_before:
                    stamps[i] = stamp
                return digest
            except OSError as e:
                errors[self.ids[i]] = f"{type(e).__name__}: {e.strerror or e}"
                return UNREADABLE

        hashes = np.empty(len(self), dtype=f"S{HASH_BYTES}")
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for start in range(0, len(self), 256):  # by chunks: a pending task holds ~1 kB, so a chunk ~0.25 MB
                part = range(start, min(start + 256, len(self)))
                hashes[start:start + len(part)] = list(pool.map(one, part))
        return hashes, errors, stamps


# A stamp is kept only for a file last changed this long before it was hashed: a file rewritten within
# its file system's time resolution of the stamp would otherwise keep it (git's "racy" files).
RACY_NS = 2_000_000_000
STAMP_WIDTH = 4


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells, without reading it, that a file still holds the bytes it held, as git's index tells:
    its size, modification and change times (ns) and inode (a file replaced by another, or one an id
    of a manifest now names, is another inode)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


@dataclass
class Stamps:
    """Files a cache hashed before: each id's stamp (:func:`file_stamp`) when its file was hashed, and
    that hash. A file whose stamp is unchanged is not read again, as git's index trusts
    a file's stat: a re-run on an unchanged folder or manifest costs a stat per file, not a read."""

    ids: np.ndarray
    stamps: np.ndarray  # (n, STAMP_WIDTH) int64
    hashes: np.ndarray

    @functools.cached_property
    def _row_of(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.ids)}

    def digest(self, sid: str, stamp: tuple[int, ...]) -> bytes | None:
        """The stored hash of ``sid`` when its file's stamp is still ``stamp``, else None."""
        row = self._row_of.get(sid)
        return None if row is None or tuple(self.stamps[row]) != stamp else self.hashes[row]


UNREADABLE = bytes(HASH_BYTES)  # the hash stored for a sample whose bytes could not be read


class Columns:
    """A listing's columns grown one sample at a time, compactly: ids, shared (interned) label and split
    strings, content hashes in one buffer, and ``locators`` integers per sample in typed arrays."""

    def __init__(self, locators: int = 0):
        self.ids: list[str] = []
        self.labels: list[str] = []
        self.splits: list[str] = []
        self.digests = bytearray()
        self.at = [array("q") for _ in range(locators)]

    def add(self, sid: str, label: str = "", split: str = "", digest: bytes | None = None, at: Sequence[int] = ()) -> None:
        self.ids.append(sid)
        self.labels.append(sys.intern(label))
        self.splits.append(sys.intern(check_split(split, f"sample {sid!r}")))
        if digest is not None:
            self.digests += digest
        for column, value in zip(self.at, at):
            column.append(value)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, other: "Columns") -> None:
        """Append ``other``'s samples (another part of the same listing, made elsewhere)."""
        self.ids += other.ids
        self.labels += map(sys.intern, other.labels)
        self.splits += map(sys.intern, other.splits)
        self.digests += other.digests
        for column, more in zip(self.at, other.at):
            column.extend(more)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, labels, splits as object arrays."""
        return tuple(np.array(v, dtype=object) for v in (self.ids, self.labels, self.splits))

    def hashes(self) -> np.ndarray:
        return np.frombuffer(bytes(self.digests), dtype=f"S{HASH_BYTES}").copy()

    def locators(self) -> list[np.ndarray]:
        return [np.frombuffer(column, dtype=np.int64) for column in self.at]


@dataclass(frozen=True)
class Source:
    name: str
    doc: str
    claims: Callable[[Path], bool]
    list: Lister  # (path, allow_outside_root) -> ImageSource


_REGISTRY: list[Source] = []


def register_source(name: str, doc: str, claims: Callable[[Path], bool]):
    """Register ``list(path, allow_outside_root) -> ImageSource`` (decorator); asked in registration order."""

    def wrap(fn: Lister) -> Lister:
        _REGISTRY.append(Source(name, doc, claims, fn))
        return fn

    return wrap


def _source(path: Path) -> Source:
    found = next((s for s in _REGISTRY if s.claims(path)), None)
    if found is None:
        raise PipelineError(f"data source {path} is not an image folder, a .csv manifest, .tar shards or .parquet "
                            "files")
    return found


def load_source(source: str | os.PathLike, allow_outside_root: bool = False) -> ImageSource:
    """List ``source`` (see the module docstring). A manifest's paths are relative to its folder; one that
    leaves it (absolute, or through ``..``) is an error unless ``allow_outside_root``."""
    path = Path(source)
    listing = _source(_existing(path)).list(path, allow_outside_root)
    if not len(listing):
        raise PipelineError(f"{path}: no images found")
    return listing


def source_name(source: str | os.PathLike) -> str:
    """A source's short name, which names its cache files: a folder's name; a file's without its extension
    (``my.data.csv``: ``my.data``); a brace pattern's up to the brace (``data-{000..009}.tar``: ``data``).
    Known without listing the source, so a cache can be locked before the slow work; every lister names
    its listing with it."""
    path = _existing(Path(source))
    _source(path)
    if path.is_dir():
        return path.resolve().name
    stem = path.name[:-len(path.suffix)] if path.suffix else path.name
    if "{" in stem:
        stem = stem.split("{")[0].rstrip("-_.")
    return stem or path.parent.resolve().name


def location_exists(location: str) -> bool:
    """Whether a :func:`source_location` still names something (a brace pattern: its folder)."""
    path = Path(location)
    return path.exists() or ("{" in path.name and path.parent.is_dir())


@functools.cache
def label_columns() -> dict[str, str]:
    """Each task kind's label column, mapped to the kind's name, in the registry's order: the kinds
    decide what a ``label``, ``labels`` or ``target`` column means for every source. (Imported here, not
    at the top: the kinds import scikit-learn, which `extract` does not otherwise need, and a second
    writer is refused before that import would be paid.)"""
    from ..kinds import list_kinds

    return {k.column: k.name for k in list_kinds().values()}


def source_location(source: str | os.PathLike) -> str:
    """Where a source is, as an absolute path (a brace pattern's folder made absolute): what a cache
    records to tell two sources of one name apart."""
    path = Path(source)
    return str(path.parent.resolve() / path.name) if "{" in path.name else str(path.resolve())


def _existing(path: Path) -> Path:
    """``path``, which must exist (a brace pattern is taken at its word: its shards are checked when listed)."""
    if not path.exists() and "{" not in path.name:
        raise PipelineError(f"data source not found: {path} (give an image folder, a CSV manifest, .tar shards or "
                            ".parquet files)")
    return path


# registers the built-in sources; the folder source last: it takes any folder
from . import manifest, parquet, webdataset, folder  # noqa: E402,F401,I001
