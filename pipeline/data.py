"""Data sources: which images there are, what they are called, their labels and splits; and how to
open one image safely.

A source is a folder laid out ``root/[split/]class/image`` or a CSV manifest with a ``path`` column
and optional ``label``, ``split`` and ``id`` columns. A sample's id is its path relative to the
folder (or the manifest's ``id``, else its ``path`` as written): the key that joins features, labels
and predictions.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PipelineError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
SPLITS = ("train", "val", "test")
# Decompression-bomb guard, set deliberately rather than inherited from Pillow's global default:
# 100 megapixels is larger than any photo a backbone needs and small enough to decode safely.
MAX_IMAGE_PIXELS = 100_000_000
_HASH = "sha256"
HASH_BYTES = 32


@dataclass(frozen=True)
class Sample:
    """One image of a source: its id, where its bytes are, and its label and split ("" when none)."""

    id: str
    path: Path
    label: str = ""
    split: str = ""


@dataclass(frozen=True)
class ImageSource:
    """A listed data source: a short name (used in cache file names) and its samples, in a stable order."""

    name: str
    root: Path
    samples: tuple[Sample, ...]


def load_source(source: str | os.PathLike, allow_outside_root: bool = False) -> ImageSource:
    """List a folder (``root/[split/]class/image``) or a CSV manifest as an :class:`ImageSource`.

    A manifest's paths are relative to its folder; one that leaves it (absolute, or through ``..``) is
    an error unless ``allow_outside_root``, so a manifest from elsewhere cannot point at any file."""
    path = Path(source)
    name = source_name(path)
    if path.is_dir():
        return ImageSource(name, path, tuple(_list_folder(path)))
    return ImageSource(name, path.parent, tuple(_read_manifest(path, allow_outside_root)))


def source_name(source: str | os.PathLike) -> str:
    """A source's short name (its folder's, or its manifest's without ``.csv``), known without listing it."""
    path = Path(source)
    if not path.exists():
        raise PipelineError(f"data source not found: {path} (give an image folder or a CSV manifest)")
    if path.is_dir():
        return path.resolve().name
    if path.suffix.lower() == ".csv":
        return path.stem
    raise PipelineError(f"data source {path} is neither a folder nor a .csv manifest")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into image files, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f)))
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise PipelineError(f"no such image or folder: {p}")
    return out


def _list_folder(root: Path) -> list[Sample]:
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    has_splits = bool(subdirs) and all(d in SPLITS for d in subdirs)
    samples = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).parts
        split = rel_dir[0] if has_splits and rel_dir else ""
        class_parts = rel_dir[1:] if has_splits else rel_dir
        label = class_parts[0] if class_parts else ""
        for name in sorted(filenames):
            f = Path(dirpath) / name
            if is_image_file(f):
                samples.append(Sample(f.relative_to(root).as_posix(), f, label, split))
    if not samples:
        raise PipelineError(
            f"no images found under {root} (expected {root}/[split/]class/image with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return samples


def _read_manifest(path: Path, allow_outside_root: bool) -> list[Sample]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if "path" not in columns:
        raise PipelineError(f"{path}: a manifest needs a 'path' column (optional: label, split, id); found {list(columns)}")
    samples, seen = [], {}
    for line, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise PipelineError(f"{path}:{line}: empty 'path'")
        if not allow_outside_root and (Path(rel).is_absolute() or ".." in Path(rel).parts):
            raise PipelineError(
                f"{path}:{line}: path {rel!r} leaves the manifest's folder; paths are relative to it "
                "(pass --allow-outside-root to read it anyway)"
            )
        sid = (row.get("id") or "").strip() or rel
        if sid in seen:
            raise PipelineError(f"{path}:{line}: duplicate id {sid!r} (first on line {seen[sid]}); ids must be unique")
        seen[sid] = line
        samples.append(Sample(sid, path.parent / rel, (row.get("label") or "").strip(), (row.get("split") or "").strip()))
    if not samples:
        raise PipelineError(f"{path}: the manifest lists no images")
    return samples


def content_hash(path: Path) -> bytes:
    """Digest of a file's bytes: what decides whether a cached row is still that image's. Anything but a
    regular file (a FIFO, a device such as /dev/zero behind a symlink) is an OSError: reading it could
    block, or never end."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return hashlib.file_digest(fh, _HASH).digest()


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int | None = None) -> Image.Image:
    """Open an image as upright 8-bit RGB, or raise with a reason a person can read.

    Opening, EXIF orientation, pixel decoding and mode conversion happen together because Pillow defers
    decoding: a truncated file opens fine and fails only when its pixels are read. With ``min_side``, a
    JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that keeps both sides at least
    ``min_side`` (libjpeg's DCT scaling, ``Image.draft``): pixels the resize would discard are never made.
    """
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except UnidentifiedImageError:
            raise ValueError("not an image Pillow can read (unknown format or corrupt header)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"refused by the decompression-bomb guard: {e}") from None
        with img:
            if img.width * img.height > max_pixels:
                raise ValueError(f"image is {img.width}x{img.height}, over the {max_pixels:,}-pixel limit")
            if min_side:
                img.draft(None, (min_side, min_side))
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High-bit-depth greyscale: rescale to 8 bits; convert("RGB") would clip at 255.
        arr = np.asarray(img, dtype=np.float32)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite on white so transparent pixels do not show whatever colour they hide.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
