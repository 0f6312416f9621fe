"""Parquet files in the Hugging Face datasets layout: a ``.parquet`` file or a folder of them, with an
``image`` column that is a struct with ``bytes`` (the datasets ``Image`` feature), or a binary column
named ``image``, ``jpg`` or ``png``; and optional ``label`` (a class name, or a class number named by
the file's datasets metadata), ``labels`` (a list of tags), ``target``, ``split`` and ``id`` columns.
A sample's id is its ``id``, else ``<file name without .parquet>/<row>``.

Files are read a row group at a time with ``pyarrow`` (the image bytes hashed as they pass); an image
is read again later from its row group, which each process keeps while consecutive rows need it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ..data import Member
from ..errors import PipelineError
from . import Columns, ImageSource, label_columns, register_source, source_name

IMAGE_COLUMNS = ("image", "jpg", "png")


def _claims(path: Path) -> bool:
    return path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet")))


@register_source("parquet", "Hugging Face datasets parquet files: a file or a folder of them", claims=_claims)
def list_parquet(path: Path, allow_outside_root: bool) -> ImageSource:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    listing, kinds, has_ids = Columns(locators=3), set(), False  # locators: file, row group, row in it
    for k, file in enumerate(files):
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow's errors for a file that is not parquet are of several kinds
            raise PipelineError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None
        image, label = _image_column(pf, file), next((c for c in label_columns() if c in pf.schema_arrow.names), None)
        kinds.add(label_columns().get(label))
        names = _class_names(pf)
        wanted = [c for c in (image, label, "split", "id") if c and c in pf.schema_arrow.names]
        has_ids = has_ids or "id" in wanted
        row = 0
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=wanted).to_pydict()
            for i, cell in enumerate(table[image]):
                sid = str(table["id"][i]) if "id" in table else f"{file.name[:-len('.parquet')]}/{row}"
                listing.add(sid, _cell(table[label][i], names) if label else "",
                            str(table["split"][i] or "") if "split" in table else "",
                            hashlib.sha256(_bytes(cell)).digest(), (k, group, i))
                row += 1
    if len(kinds - {None}) > 1:
        raise PipelineError(f"{path}: its files label their images in different ways ({', '.join(sorted(kinds - {None}))})")
    ids, labels, splits = listing.arrays()
    if has_ids and len(set(listing.ids)) != len(ids):  # made ones (<file>/<row>) are unique
        raise PipelineError(f"{path}: ids are not unique; give each row a unique id column")
    file, group, row = listing.locators()
    column = {k: _image_column(pq.ParquetFile(f), f) for k, f in enumerate(files)}
    return ImageSource(source_name(path), path if path.is_dir() else path.parent, ids, labels, splits,
                       lambda i: Member(files[file[i]], int(group[i]), int(row[i]), column[file[i]], reader=read),
                       label_kind=next(iter(kinds - {None}), "classification"), hashes=listing.hashes())


def _image_column(pf, file: Path) -> str:
    names = pf.schema_arrow.names
    found = next((c for c in IMAGE_COLUMNS if c in names), None)
    if found is None:
        raise PipelineError(f"{file}: no image column ({' or '.join(IMAGE_COLUMNS)}); its columns are {', '.join(names)}")
    return found


def _class_names(pf) -> list[str] | None:
    """The class names a datasets ``ClassLabel`` column stores as numbers, from the file's metadata."""
    meta = (pf.schema_arrow.metadata or {}).get(b"huggingface")
    try:
        return json.loads(meta)["info"]["features"]["label"]["names"] if meta else None
    except (KeyError, TypeError, ValueError):
        return None


def _cell(value, names: list[str] | None) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(map(str, value))
    if isinstance(value, int) and names and 0 <= value < len(names):
        return names[value]
    return str(value)


def _bytes(cell) -> bytes:
    """An image cell's bytes: the ``bytes`` of a datasets ``Image`` struct, or the binary value."""
    value = cell.get("bytes") if isinstance(cell, dict) else cell
    return bytes(value or b"")


@functools.lru_cache(maxsize=2)
def _row_group(container: Path, group: int, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.ParquetFile(container).read_row_group(group, columns=[column]).column(column).to_pylist()


def read(member: Member) -> bytes:
    return _bytes(_row_group(member.container, member.at, member.column)[member.size])
