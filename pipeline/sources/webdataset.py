"""webdataset tar shards: a ``.tar`` file, a folder of them, or a brace pattern such as
``shards/data-{000000..000099}.tar``. A sample is the run of members that share a key (a member's name
up to the first dot of its base name, webdataset's convention); its image is the member with an image
extension, its label the ``cls`` member (a class name or number), else ``txt``, else the ``label``,
``labels`` or ``target`` field of the ``json`` member, which may also give its ``split``. Its id is
``<shard name without .tar>/<key>``.

Shards are read with ``tarfile`` one member at a time (the image's bytes are hashed as they pass), so
listing holds one sample in memory; an image is read again later by its offset in the shard. A shard
whose structure is damaged is listed up to the damage, which is recorded as a failure. Several shards
are listed in parallel, one process per core (parsing tar headers is Python's work, not the disk's).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from braceexpand import braceexpand

from ..data import IMAGE_EXTENSIONS, Member
from ..errors import PipelineError
from . import UNREADABLE, Columns, ImageSource, label_columns, register_source, source_name

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # (key, extension): webdataset's base_plus_ext


def _claims(path: Path) -> bool:
    return path.suffix == ".tar" or ("{" in path.name and ".tar" in path.name) or (
        path.is_dir() and any(path.glob("*.tar")))


@register_source("webdataset", "webdataset .tar shards: a file, a folder of them, or a brace pattern", claims=_claims)
def list_shards(path: Path, allow_outside_root: bool) -> ImageSource:
    shards = _shards(path)
    listing = _Listing()
    for part in _listed(shards):
        listing.join(part)
    ids, labels, splits = listing.columns.arrays()
    shard, at, size = listing.columns.locators()
    return ImageSource(source_name(path), path if path.is_dir() else path.parent, ids, labels, splits,
                       lambda i: Member(shards[shard[i]], int(at[i]), int(size[i]), reader=read),
                       label_kind=listing.kind or "classification", hashes=listing.columns.hashes(),
                       read_errors=listing.errors)


def _list_shard(k: int, shard: Path) -> "_Listing":
    listing = _Listing()
    listing.shard(k, shard)
    return listing


def _listed(shards: list[Path]) -> Iterator["_Listing"]:
    """Each shard's listing, in shard order; in a process per core when there are several."""
    processes = min(len(shards), os.cpu_count() or 1)
    if processes < 2:
        yield from (_list_shard(k, s) for k, s in enumerate(shards))
        return
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_list_shard, range(len(shards)), shards)


def _shards(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
    else:
        found = [Path(p) for p in braceexpand(str(path))]
    missing = [p for p in found if not p.is_file()]
    if missing:
        raise PipelineError(f"{len(missing)} shard(s) of {path} not found, e.g. {missing[0]}")
    return found


class _Listing:
    """The columns of the samples of every shard, grown one sample at a time."""

    def __init__(self):
        self.columns = Columns(locators=3)  # shard, data offset, size
        self.errors: dict[str, str] = {}
        self.kind: str | None = None

    def join(self, part: "_Listing") -> None:
        """Append the listing of the next shard(s)."""
        if part.kind is not None and self.kind not in (None, part.kind):
            raise PipelineError(f"{part.columns.ids[0]}: its label is a {part.kind} one, the shards' earlier labels "
                                f"{self.kind} ones")
        self.kind = self.kind or part.kind
        self.columns.extend(part.columns)
        self.errors.update(part.errors)

    def shard(self, k: int, shard: Path) -> None:
        stem = shard.name[:-len(".tar")] if shard.name.endswith(".tar") else shard.stem
        key, members = None, {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in _files(tar):
                    name = _KEY.match(member.name)
                    if not name:
                        continue
                    if name[1] != key:
                        if members:
                            self.sample(k, f"{stem}/{key}", tar, members)
                        key, members = name[1], {}
                    members[name[2].lower()] = member
                if members:
                    self.sample(k, f"{stem}/{key}", tar, members)
        except (tarfile.TarError, OSError, EOFError) as e:
            reason = ("compressed shards cannot be read by offset; decompress them"
                      if isinstance(e, tarfile.CompressionError) else f"{type(e).__name__}: {e}")
            self.failure(k, f"{stem}/(damaged)", f"shard {shard.name} is damaged and was listed up to it: {reason}")

    def sample(self, k: int, sid: str, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> None:
        image = next((m for ext, m in members.items() if f".{ext.split('.')[-1]}" in IMAGE_EXTENSIONS), None)
        label, split, kind = _label(tar, members)
        if kind is not None and self.kind not in (None, kind):
            raise PipelineError(f"{sid}: its label is a {kind} one, the shards' earlier labels {self.kind} ones")
        self.kind = self.kind or kind
        if image is None:
            return self.failure(k, sid, f"no image member (members: {', '.join(sorted(members))})", label, split)
        digest = hashlib.sha256(tar.extractfile(image).read()).digest()
        self.columns.add(sid, label, split, digest, (k, image.offset_data, image.size))

    def failure(self, k: int, sid: str, reason: str, label: str = "", split: str = "") -> None:
        self.errors[sid] = reason
        self.columns.add(sid, label, split, UNREADABLE, (k, 0, 0))


def _files(tar: tarfile.TarFile):
    """The file members of ``tar`` in order, holding none of the headers read (tarfile keeps them all)."""
    while (member := tar.next()) is not None:
        tar.members = []
        if member.isfile():
            yield member


def _label(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> tuple[str, str, str | None]:
    """(label cell, split, kind) from the sample's cls, txt and json members."""
    read = lambda ext: tar.extractfile(members[ext]).read().decode("utf-8").strip()  # noqa: E731
    try:
        meta = json.loads(read("json")) if "json" in members else {}
    except (ValueError, UnicodeDecodeError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    split = str(meta.get("split", "") or "")
    for ext in ("cls", "txt"):
        if ext in members:
            return read(ext), split, "classification"
    field = next((f for f in label_columns() if f in meta), None)
    value = meta.get(field, "")
    cell = "|".join(map(str, value)) if isinstance(value, list) else str(value)
    return cell, split, label_columns().get(field)


def read(member: Member) -> bytes:
    with open(member.container, "rb") as fh:
        fh.seek(member.at)
        data = fh.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{member.container} ends {member.size - len(data)} bytes into this image")
    return data
