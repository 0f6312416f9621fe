"""One image: a sample (id, where its bytes are, label cell, split), the hash of its bytes, and how to
open it safely as RGB. Which images a source has is :mod:`pipeline.sources`' business.

A sample's id is the key that joins features, labels and predictions: a folder image's path relative
to the folder, a manifest's ``id`` (else its ``path``), a shard's ``<shard>/<key>``, a parquet row's
``id`` (else ``<file>/<row>``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PipelineError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
SPLITS = ("train", "val", "test")
# Decompression-bomb guard, set deliberately rather than inherited from Pillow's global default:
# 100 megapixels is larger than any photo a backbone needs and small enough to decode safely.
MAX_IMAGE_PIXELS = 100_000_000
_ORIENTATION = 0x0112  # the EXIF tag
_HASH = "sha256"
HASH_BYTES = 32


def check_split(value: str, where: str) -> str:
    """``value`` if it is a split name (``train``, ``val``, ``test``) or empty; else an error naming ``where``:
    an image under an unknown split would silently be neither trained on nor scored."""
    if value not in ("", *SPLITS):
        raise PipelineError(f"{where}: split must be one of train, val, test or empty, got {value!r}")
    return value


@dataclass(frozen=True)
class Member:
    """Bytes inside a container file: a tar member's (``at`` its data's byte offset, ``size`` bytes) or
    a parquet cell's (``at`` the row group, ``size`` the row in it, ``column`` the image column).
    ``reader`` is the function of the source that made it which reads those bytes (a module's function,
    so a member pickles to a decoding process): the sources know their containers, this module does not."""

    container: Path
    at: int
    size: int
    column: str = ""
    reader: Callable[["Member"], bytes] = field(kw_only=True, compare=False, repr=False)

    def read(self) -> bytes:
        return self.reader(self)

    def __str__(self) -> str:
        return f"{self.container}[{self.at}:{self.size}{':' + self.column if self.column else ''}]"


@dataclass(frozen=True)
class Sample:
    """One image of a source: its id, where its bytes are (a file, or a member of a container), and its
    label cell and split ("" when none)."""

    id: str
    path: Path | Member
    label: str = ""
    split: str = ""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into image files, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # a dangling link is listed too: it gets its row with the reason, as in extract
            out.extend(sorted(f for f in p.rglob("*") if (f.is_file() or f.is_symlink()) and is_image_file(f)))
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise PipelineError(f"no such image or folder: {p}")
    return out


def content_hash(path: Path | Member) -> bytes:
    """Digest of an image's bytes: what decides whether a cached row is still that image's. Anything but a
    regular file (a FIFO, a device such as /dev/zero behind a symlink) is an OSError: reading it could
    block, or never end."""
    if isinstance(path, Member):
        return hashlib.sha256(path.read()).digest()
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return hashlib.file_digest(fh, _HASH).digest()


def load_image(path: str | os.PathLike | Member, max_pixels: int = MAX_IMAGE_PIXELS,
               min_side: int | None = None) -> Image.Image:
    """Open an image as upright 8-bit RGB, or raise with a reason a person can read.

    Opening, EXIF orientation, pixel decoding and mode conversion happen together because Pillow defers
    decoding: a truncated file opens fine and fails only when its pixels are read. With ``min_side``, a
    JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that keeps both sides at least
    ``min_side`` (libjpeg's DCT scaling, ``Image.draft``): pixels the resize would discard are never made.
    """
    with _opened(io.BytesIO(read_bytes(path)), max_pixels) as img:
        return _pillow_rgb(img, min_side)


def load_pixels(path: str | os.PathLike | Member, max_pixels: int = MAX_IMAGE_PIXELS,
                min_side: int | None = None) -> np.ndarray:
    """An image as upright 8-bit RGB pixels (height, width, 3), as :func:`load_image` makes them, but a
    plain JPEG (see :func:`is_plain_jpeg`) decoded by libjpeg-turbo through simplejpeg, which releases
    the GIL and skips Pillow's image objects, at the DCT scale ``Image.draft`` would pick. Anything else,
    and a JPEG simplejpeg refuses, goes through Pillow exactly as ``load_image``: the same pixels for
    EXIF rotation, CMYK, 16 bits, palettes and alpha, the same reasons for broken files."""
    return decode_pixels(read_bytes(path), max_pixels, min_side)


def decode_pixels(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int | None = None) -> np.ndarray:
    """:func:`load_pixels` of an image's bytes already read."""
    with _opened(io.BytesIO(data), max_pixels) as img:
        if _plain(img):
            scale = draft_scale(img.size, min_side)
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=scale,
                                              min_width=-(-img.width // scale), min_height=-(-img.height // scale))
            except ValueError:
                pass  # damaged: Pillow decides, and says why, as for every other image
        return np.array(_pillow_rgb(img, min_side))  # a writable copy, as simplejpeg's


def is_plain_jpeg(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> bool:
    """Whether ``data`` is a JPEG that libjpeg-turbo (or nvJPEG) decodes straight to the pixels
    ``load_image`` makes: 8-bit colour or greyscale, no EXIF rotation. Raises as ``load_image`` does for
    what Pillow cannot open."""
    with _opened(io.BytesIO(data), max_pixels) as img:
        return _plain(img)


def _plain(img: Image.Image) -> bool:
    return img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(_ORIENTATION, 1) == 1


def read_bytes(path: str | os.PathLike | Member) -> bytes:
    """An image's bytes, refusing an empty file with the reason ``load_image`` gives."""
    if isinstance(path, Member):
        data = path.read()
        if not data:
            raise ValueError("empty image (0 bytes)")
        return data
    with open(path, "rb") as fh:
        data = fh.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    return data


def draft_scale(size: tuple[int, int], min_side: int | None) -> int:
    """The JPEG DCT scale ``Image.draft`` picks: the largest of 8, 4, 2, 1 that keeps both sides at least
    ``min_side`` (1 without one)."""
    if not min_side:
        return 1
    fits = min(size[0] // min_side, size[1] // min_side)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


@contextmanager
def _opened(source: io.BytesIO, max_pixels: int) -> Iterator[Image.Image]:
    """An image opened by Pillow (its header read, its pixels not), within the decompression-bomb guards."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(source)
        except UnidentifiedImageError:
            raise ValueError("not an image Pillow can read (unknown format or corrupt header)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"refused by the decompression-bomb guard: {e}") from None
        with img:
            if img.width * img.height > max_pixels:
                raise ValueError(f"image is {img.width}x{img.height}, over the {max_pixels:,}-pixel limit")
            yield img


def _pillow_rgb(img: Image.Image, min_side: int | None) -> Image.Image:
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
