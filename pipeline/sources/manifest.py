"""A CSV manifest: a ``path`` column (relative to the manifest's folder) and optional ``id``, ``split``
and label columns: ``label`` (one class), ``labels`` (tags separated by ``|``) or ``target`` (a
number), as label files have. A sample's id is its ``id``, else its ``path`` as written."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from . import Columns, ImageSource, label_columns, register_source, source_name


@register_source("manifest", "a CSV with a path column (optional: id, split, label or labels or target)",
                 claims=lambda path: path.suffix.lower() == ".csv")
def list_manifest(path: Path, allow_outside_root: bool) -> ImageSource:
    listing, paths = Columns(), []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            if "path" not in header:
                raise PipelineError(f"{path}: a manifest needs a 'path' column (optional: id, split, label, labels or "
                                    f"target); found {header}")
            column = next((c for c in label_columns() if c in header), None)
            kind = label_columns().get(column, "classification")
            at = {c: header.index(c) for c in ("path", "id", "split", column) if c in header}
            cell = lambda row, c: row[at[c]].strip() if c in at and at[c] < len(row) else ""  # noqa: E731
            for line, row in enumerate(reader, start=2):
                rel = cell(row, "path")
                if not rel:
                    raise PipelineError(f"{path}:{line}: empty 'path'")
                if not allow_outside_root and (Path(rel).is_absolute() or ".." in Path(rel).parts):
                    raise PipelineError(f"{path}:{line}: path {rel!r} leaves the manifest's folder; paths are "
                                        "relative to it (pass --allow-outside-root to read it anyway)")
                sid = cell(row, "id") or rel
                paths.append(rel)
                listing.add(sid, cell(row, column) if column else "", cell(row, "split"))
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if not len(listing):
        raise PipelineError(f"{path}: the manifest lists no images")
    ids, labels, splits = listing.arrays()
    _refuse_duplicates(ids, path)
    where = ids if paths == listing.ids else np.array(paths, dtype=object)
    folder = path.parent
    return ImageSource(source_name(path), folder, ids, labels, splits, lambda i: folder / where[i], label_kind=kind)


def _refuse_duplicates(ids: np.ndarray, path: Path) -> None:
    """An id listed twice is an error naming the line that repeats it (the first such line): found by
    sorting the ids once, not with a set beside the listing, which would cost tens of bytes per sample."""
    order = np.argsort(ids, kind="stable")
    repeats = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeats):
        i = int(order[repeats + 1].min())
        raise PipelineError(f"{path}:{i + 2}: duplicate id {ids[i]!r}; ids must be unique")
