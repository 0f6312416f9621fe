"""The import stage: a feature cache from embeddings computed elsewhere, so ``fit``, ``audit`` and the
Python API work on them as on extracted features.

Inputs:

- parquet (a ``.parquet`` file or a folder of them), as clip-retrieval writes: an ``id`` column, an
  ``embedding`` column (a list of numbers per row, the same length in every row) and optional ``label``
  (a class), ``labels`` (a list of tags), ``target`` (a number) and ``split`` columns;
- a ``.npy`` array of shape (rows, dims) with ``ids``: a ``.csv`` file with an ``id`` column (and
  optional label and ``split`` columns, as above; row ``i`` is array row ``i``), or any other file as
  plain text, one id per line.

The first label column present of ``label``, ``labels``, ``target`` (the task kinds' order, as the image
sources choose) is the cache's own task, which ``pipeline fit CACHE`` reads with no flag; each other one
is written beside the cache as a label file ``<cache stem>.<column>.csv`` for ``--labels``.

The input is read twice, each time in chunks: the ids and labels (small columns) first, so bad ids are
refused before anything is written; then the embeddings, ``chunk_rows`` at a time (parquet by
``iter_batches``, ``.npy`` memory-mapped), each chunk checked and written. Memory is bounded by a chunk
(and pyarrow's row group), never the file. The cache is written under a temporary name and renamed into
place when whole, so a refused or failed import leaves no file behind.

The feature spec records where the features came from: source ``imported``, backbone
``imported:NAME`` (the model source that refuses to build a network, see
:mod:`pipeline.model_sources.imported`), the sha256 of the input files' bytes as the weights hash, no
preprocessing, the storage dtype. Two different inputs never share a key, nor an import and an
extraction. There are no image bytes: a row's content hash is the sha256 of its id (UTF-8).
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cache import CacheWriter, FeatureCache, cache_path
from ..errors import PipelineError
from ..files import atomic_path
from ..locks import lock_cache
from ..sources import Columns, ImageSource, label_columns
from ..spec import SPEC_INPUTS, FeatureSpec, spec_rules
from ..validation import at_least, validate_params

SOURCE = "imported"  # the feature spec's source; its model source (pipeline.model_sources.imported) has no network
PREFIX = f"{SOURCE}:"  # an imported cache's backbone is imported:NAME, the names that model source claims
TAP = "pooled"  # the tap every stage reads by default
ID, EMBEDDING = "id", "embedding"
CHUNK_ROWS = 8192


@dataclass
class ImportResult:
    """What an import wrote: the cache, its rows and width, how many rows carry the cache's own label,
    the time it took, and the label files written beside it (the other label columns)."""

    cache: Path
    rows: int
    dims: int
    labelled: int
    seconds: float
    label_files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        lines = [f"imported {self.rows} rows x {self.dims} dims, {self.labelled} labelled, in {self.seconds:.1f} s "
                 f"({rate:.0f} rows/s); cache {self.cache}"]
        lines += [f"label file (pipeline fit --labels): {p}" for p in self.label_files]
        return "\n".join(lines)


@dataclass
class _Listing:
    """An input's ids and label columns, read before any embedding: ``labels`` holds the cache's own task
    (of kind ``kind``), ``extra`` the other label columns (column -> cells)."""

    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    kind: str
    extra: dict[str, np.ndarray]


@validate_params(dict(chunk_rows=at_least(1), **spec_rules("dtype")))
def import_embeddings(source: str | os.PathLike, out: str | os.PathLike, ids: str | os.PathLike | None = None,
                      name: str | None = None, dtype: str = SPEC_INPUTS["dtype"].default, overwrite: bool = False,
                      chunk_rows: int = CHUNK_ROWS) -> ImportResult:
    """Make a feature cache in the folder ``out`` from the embeddings in ``source`` (see the module
    docstring for the inputs; ``ids`` is required for a ``.npy`` array). ``name`` names the embeddings
    (default: the file's stem) in the cache's backbone, ``imported:NAME``; ``dtype`` is the storage dtype.
    An existing cache of the same input is refused unless ``overwrite``."""
    started = time.perf_counter()
    reader = _reader(Path(source), None if ids is None else Path(ids))
    listing = reader.listing()
    _refuse_duplicates(listing.ids, reader.where)
    stem = _stem(reader.path)
    spec = FeatureSpec(backbone=PREFIX + (name or stem), weights_sha256=_sha256(reader.files), data_config={},
                       dtype=dtype, source=SOURCE)
    path = cache_path(out, stem, spec)
    _refuse_taken_name(path, spec)
    label_paths = {c: path.with_name(f"{path.stem}.{c}.csv") for c in listing.extra}
    existing = [p for p in (path, *label_paths.values()) if p.exists()]
    if existing and not overwrite:
        raise PipelineError(f"{existing[0]} exists (an import of the same input); pass --overwrite to replace it")
    chunks = reader.chunks(chunk_rows, listing.ids)
    first = next(chunks)
    with lock_cache(path) as lock, atomic_path(path) as tmp:  # a refused import leaves no lock and no folder
        where = str(reader.path.resolve())
        with CacheWriter(tmp, spec, where, stem, {TAP: first.shape[1]}, lock=lock, location=where) as writer:
            writer.sync(_source(stem, reader.path, listing), _id_hashes(listing.ids))
            for start, X in _checked(chain([first], chunks), listing.ids, first.shape[1], dtype, reader.where):
                writer.write(np.arange(start, start + len(X)), {TAP: X})
            writer.finish()
    for column, label_path in label_paths.items():
        _write_label_file(label_path, column, listing)
    return ImportResult(path, len(listing.ids), first.shape[1], int((listing.labels != "").sum()),
                        time.perf_counter() - started, list(label_paths.values()))


class _Parquet:
    """A ``.parquet`` file or a folder of them, with ``id`` and ``embedding`` columns."""

    def __init__(self, path: Path):
        self.path, self.where = path, str(path)
        self.files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not self.files:
            raise PipelineError(f"{path}: no .parquet files in it")
        self._present = self._columns()

    def _columns(self) -> list[str]:
        """The columns an import reads, the same in every file (id, then label and split columns)."""
        wanted = [ID, *label_columns(), "split"]
        present = None
        for file in self.files:
            names = _parquet_file(file).schema_arrow.names
            missing = [c for c in (ID, EMBEDDING) if c not in names]
            if missing:
                raise PipelineError(f"{file}: missing column(s) {', '.join(missing)}; an import needs id and embedding "
                                    f"(optional: {', '.join(wanted[1:])}); its columns are {', '.join(names)}")
            found = [c for c in wanted if c in names]
            if present is not None and found != present:
                raise PipelineError(f"{file}: columns {', '.join(found)}, but {self.files[0]} has {', '.join(present)}; "
                                    "every file of an import needs the same id, label and split columns")
            present = found
        return present

    def listing(self) -> _Listing:
        batches = (b.to_pydict() for f in self.files for b in _parquet_file(f).iter_batches(columns=self._present))
        return _list_rows(batches, self._present, self.where)

    def chunks(self, rows: int, ids: np.ndarray) -> Iterator[np.ndarray]:
        start = 0
        for file in self.files:
            for batch in _parquet_file(file).iter_batches(batch_size=rows, columns=[EMBEDDING]):
                yield _matrix(batch.column(0), ids[start:start + batch.num_rows], file)
                start += batch.num_rows


class _Npy:
    """A ``.npy`` array of shape (rows, dims), memory-mapped, and its ids file."""

    def __init__(self, path: Path, ids: Path):
        self.path, self.ids_path, self.where = path, ids, str(path)
        self.files = [path, ids]
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise PipelineError(f"{path}: not a readable .npy array ({e})") from None
        if array.ndim != 2 or not array.shape[1] or array.dtype.kind not in "fiu":
            raise PipelineError(f"{path}: an array of {array.dtype} with shape {array.shape}; an import "
                                "needs numbers of shape (rows, dims)")
        self._rows = len(array)

    def listing(self) -> _Listing:
        listing = _list_rows(*_read_ids(self.ids_path))
        if len(listing.ids) != self._rows:
            raise PipelineError(f"{self.ids_path}: {len(listing.ids)} ids for the {self._rows} rows of {self.path}")
        return listing

    def chunks(self, rows: int, ids: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, self._rows, rows):
            # Mapped anew for each chunk and unmapped once copied: the file's pages a mapping has read stay in
            # this process's memory while it lives.
            yield np.array(np.load(self.path, mmap_mode="r")[start:start + rows])


def _reader(path: Path, ids: Path | None) -> _Parquet | _Npy:
    """The reader of ``path`` by its form."""
    if not path.exists():
        raise PipelineError(f"embeddings not found: {path}")
    if path.suffix == ".npy":
        if ids is None:
            raise PipelineError(f"{path} is a .npy array: give its ids with --ids FILE (one id per line, or a CSV "
                                "with an id column)")
        if not ids.is_file():
            raise PipelineError(f"ids file not found: {ids}")
        return _Npy(path, ids)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        if ids is not None:
            raise PipelineError(f"--ids is for a .npy array; {path} is parquet, whose id column names its rows")
        return _Parquet(path)
    raise PipelineError(f"{path}: import a .parquet file, a folder of them, or a .npy array with --ids")


def _parquet_file(file: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file, pre_buffer=False)  # pre-buffering would read ahead every row group, holding them
    except Exception as e:  # pyarrow's errors for a file that is not parquet are of several kinds
        raise PipelineError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _read_ids(path: Path) -> tuple[list[dict[str, list]], list[str], str]:
    """An ids file as one batch of columns: a ``.csv`` with an ``id`` column (and optional label and
    split columns), else plain text with one id per line."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            if path.suffix.lower() != ".csv":
                return [{ID: fh.read().splitlines()}], [ID], str(path)
            reader = csv.DictReader(fh)
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    columns = reader.fieldnames or []
    if ID not in columns:
        raise PipelineError(f"{path}: missing column id; an ids CSV is id[,label|labels|target][,split]")
    present = [c for c in (ID, *label_columns(), "split") if c in columns]
    return [{c: [r[c] for r in rows] for c in present}], present, str(path)


def _list_rows(batches, present: Sequence[str], where: str) -> _Listing:
    """Ids, label cells and splits from batches of columns (dicts of lists); every cell is checked here,
    before any embedding is read."""
    from ..kinds import get_kind
    from ..sources.parquet import _cell

    kinds = [c for c in label_columns() if c in present]
    listing, extra = Columns(), {c: [] for c in kinds[1:]}
    for batch in batches:
        for i, raw in enumerate(batch[ID]):
            sid = "" if raw is None else str(raw).strip()
            if not sid:
                raise PipelineError(f"{where}: row {len(listing)} has an empty id")
            listing.add(sid, _cell(batch[kinds[0]][i], None) if kinds else "",
                        _cell(batch["split"][i], None) if "split" in batch else "")
            for c in extra:
                extra[c].append(_cell(batch[c][i], None))
    if not len(listing):
        raise PipelineError(f"{where}: no rows to import")
    ids, labels, splits = listing.arrays()
    columns = {c: np.array(v, dtype=object) for c, v in zip(kinds, [labels, *extra.values()])}
    for c, cells in columns.items():  # read as fit will read them: a bad cell is refused now
        has = cells != ""
        get_kind(label_columns()[c]).parse(list(cells[has]), [f"{where}: id {sid!r}, column {c}" for sid in ids[has]])
    return _Listing(ids, labels, splits, label_columns()[kinds[0]] if kinds else "classification",
                    {c: columns[c] for c in kinds[1:]})


def _matrix(column, ids: np.ndarray, file: Path) -> np.ndarray:
    """A chunk of the ``embedding`` column (a list of numbers per row) as a 2-D array; rows of different
    lengths or without an embedding are refused, naming the id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
            pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise PipelineError(f"{file}: column embedding is {t}, not a list of numbers")
    if column.null_count:
        i = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise PipelineError(f"{file}: id {ids[i]!r} has no embedding (null)")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != lengths[0])
    if len(bad):
        raise PipelineError(f"{file}: rows differ in length: id {ids[bad[0]]!r} has {lengths[bad[0]]} values, "
                            f"id {ids[0]!r} has {lengths[0]}")
    if not lengths[0]:
        raise PipelineError(f"{file}: the embedding of id {ids[0]!r} is empty")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), int(lengths[0]))


def _checked(chunks: Iterator[np.ndarray], ids: np.ndarray, dims: int, dtype: str, where: str
             ) -> Iterator[tuple[int, np.ndarray]]:
    """Each chunk's first row and its values in the storage dtype, after checking its width against the
    first row's and that every value is finite once stored (float16 overflows beyond 65504)."""
    start = 0
    for X in chunks:
        if X.shape[1] != dims:
            raise PipelineError(f"{where}: rows differ in length: id {ids[start]!r} has {X.shape[1]} values, "
                                f"id {ids[0]!r} has {dims}")
        with np.errstate(over="ignore", invalid="ignore"):
            stored = X.astype(dtype)
        bad = np.flatnonzero(~np.isfinite(stored).all(axis=1))
        if len(bad):
            i = int(bad[0])
            why = ("NaN or infinite values" if not np.isfinite(X[i]).all()
                   else f"values beyond the range of {dtype} (import with --dtype float32)")
            raise PipelineError(f"{where}: the embedding of id {ids[start + i]!r} has {why}")
        yield start, stored
        start += len(X)
    if start != len(ids):
        raise PipelineError(f"{where}: {start} embeddings for {len(ids)} ids (did it change while it was read?)")


def _refuse_duplicates(ids: np.ndarray, where: str) -> None:
    """An id given twice is refused, naming it and both rows (found by sorting, not with a set per id)."""
    order = np.argsort(ids, kind="stable")
    repeats = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeats):
        first, again = int(order[repeats[0]]), int(order[repeats[0] + 1])
        raise PipelineError(f"{where}: duplicate id {ids[first]!r} (rows {first} and {again}); ids must be unique")


def _refuse_taken_name(path: Path, spec: FeatureSpec) -> None:
    """Other embeddings under the same name in the cache's folder are refused: fitted together, their
    rows would carry one backbone name and nobody could tell them apart."""
    for other in sorted(path.parent.glob("*.h5")) if path.parent.is_dir() else []:
        if other == path:
            continue
        with FeatureCache(other) as c:
            if c.spec.backbone == spec.backbone and c.spec.weights_sha256 != spec.weights_sha256:
                raise PipelineError(f"{other} holds other embeddings named {spec.backbone[len(PREFIX):]!r} (from "
                                    f"{c.attrs.get('source_location', '?')}); give these their own --name, or remove "
                                    "that cache if these replace them")


def _stem(path: Path) -> str:
    """The input's short name: a folder's name, a file's without its extension. It names the cache file
    and the cache's own task."""
    return path.resolve().name if path.is_dir() else path.stem


def _sha256(files: Sequence[Path]) -> str:
    """One sha256 over the bytes of ``files`` in order, read by blocks."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _id_hashes(ids: np.ndarray) -> np.ndarray:
    """Each row's content hash: there are no image bytes, so the sha256 of its id."""
    return np.frombuffer(b"".join(hashlib.sha256(sid.encode()).digest() for sid in ids), dtype="S32").copy()


def _source(name: str, root: Path, listing: _Listing) -> ImageSource:
    """The listing as the source a cache writer takes its ids, labels and splits from."""
    return ImageSource(name, root, listing.ids, listing.labels, listing.splits, _no_image, label_kind=listing.kind)


def _no_image(i: int):
    raise PipelineError("imported embeddings have no images")


def _write_label_file(path: Path, column: str, listing: _Listing) -> None:
    """A label file ``id,<column>[,split]`` of the rows with a cell in ``column``."""
    cells = listing.extra[column]
    has = cells != ""
    split = (listing.splits != "").any()
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([ID, column, *(["split"] if split else [])])
        for sid, cell, s in zip(listing.ids[has], cells[has], listing.splits[has]):
            writer.writerow([sid, cell, *([s] if split else [])])
