"""Fuzzing beyond the hand-made corpus: real JPEG, PNG, GIF, WebP and TIFF files (made with Pillow, plus
real hymenoptera photos when ../shared is there), damaged at random by hypothesis: bytes flipped, the
file cut short, a chunk of another file spliced in, an absurd size declared in the header, or random
bytes behind a valid magic number. Whatever the damage, every file ends with features or a recorded
failure, the run exits 0, and it does not hang.

Each example is one `pipeline extract` of a dozen damaged files in a subprocess (a crash there would
fail the example, not the test session). ``PIPELINE_FUZZ_EXAMPLES`` sets how many (default 4, for CI);
run more locally, e.g. ``PIPELINE_FUZZ_EXAMPLES=200 pytest tests/test_fuzz.py``."""

import io
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import SHARED, TINY, run_cli
from pipeline import FeatureCache

pytestmark = pytest.mark.slow  # a subprocess per example

FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "tif": "TIFF"}


def _picture(seed: int, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noise = rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(smooth) + noise, 0, 255).astype(np.uint8))


def _bases() -> list[tuple[str, bytes]]:
    """(extension, bytes) of valid files: each format, plus two real photos when ../shared is there."""
    out = []
    for k, (ext, fmt) in enumerate(FORMATS.items()):
        buf = io.BytesIO()
        _picture(k).save(buf, fmt, **({"compression": "tiff_lzw"} if fmt == "TIFF" else {}))
        out.append((ext, buf.getvalue()))
    photos = sorted((SHARED / "data" / "hymenoptera" / "val" / "ants").glob("*.jpg"))[:2]
    return out + [("jpg", p.read_bytes()) for p in photos]


BASES = _bases()


def _declare_size(data: bytes, ext: str, width: int, height: int) -> bytes:
    """``data`` with the picture's size in its header replaced (the rest as it was)."""
    b = bytearray(data)
    if ext == "png":  # IHDR, its CRC made right again so the reader gets past it
        b[16:24] = struct.pack(">II", width, height)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif ext == "jpg":  # the first start-of-frame marker (baseline or progressive)
        at = next((i for i in range(2, len(b) - 9) if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC1, 0xC2)), None)
        if at is not None:
            b[at + 5:at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif ext == "gif":  # the logical screen
        b[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif ext == "webp":  # a lossy VP8 frame header: 14-bit sizes after the start code
        at = bytes(b).find(b"\x9d\x01\x2a")
        if at >= 0:
            b[at + 3:at + 7] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    elif ext == "tif":  # ImageWidth (256) and ImageLength (257) in the first directory
        ifd = struct.unpack("<I", b[4:8])[0]
        for k in range(struct.unpack("<H", b[ifd:ifd + 2])[0]):
            entry = ifd + 2 + 12 * k
            tag, kind = struct.unpack("<HH", b[entry:entry + 4])
            if tag in (256, 257):
                value = width if tag == 256 else height
                b[entry + 8:entry + 12] = struct.pack("<HH", value & 0xFFFF, 0) if kind == 3 else struct.pack("<I", value)
    return bytes(b)


@st.composite
def damaged(draw) -> tuple[str, bytes]:
    ext, data = BASES[draw(st.integers(0, len(BASES) - 1))]
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "size", "magic"]))
    if kind == "flip":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 16))):
            b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
        return ext, bytes(b)
    if kind == "truncate":
        return ext, data[:draw(st.integers(0, len(data) - 1))]
    if kind == "splice":
        _, other = BASES[draw(st.integers(0, len(BASES) - 1))]
        start = draw(st.integers(0, len(other) - 1))
        chunk = other[start:start + draw(st.integers(1, 4096))]
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, len(chunk)))  # overwrite this much, insert the rest
        return ext, data[:at] + chunk + data[at + cut:]
    if kind == "size":
        side = st.sampled_from([0, 1, 7, 4096, 16383, 65535, 100_000, 2**31 - 1, 2**32 - 1])
        return ext, _declare_size(data, ext, draw(side), draw(side))
    keep = {"jpg": 3, "png": 8, "gif": 6, "webp": 12, "tif": 4}[ext]
    return ext, data[:keep] + draw(st.binary(min_size=0, max_size=4096))


@settings(max_examples=int(os.environ.get("PIPELINE_FUZZ_EXAMPLES", "4")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=st.lists(damaged(), min_size=6, max_size=12))
def test_every_damaged_file_ends_with_features_or_a_recorded_failure(files):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data" / "x"
        folder.mkdir(parents=True)
        for k, (ext, data) in enumerate(files):
            (folder / f"{k:02d}.{ext}").write_bytes(data)
        Image.fromarray(np.asarray(_picture(99))).save(folder / "good.png")  # and one that must work
        r = run_cli("extract", Path(tmp) / "data", "--backbone", TINY, "--cache", Path(tmp) / "cache", "--workers",
                    "2", "--batch-size", "4", "--decode-timeout", "30", "--no-progress", timeout=240)
        assert r.returncode == 0, r.stderr
        with FeatureCache(next((Path(tmp) / "cache").glob("*.h5"))) as c:
            failed = {sid for sid, _, _ in c.failures}
            assert all(reason for _, _, reason in c.failures)
            assert {sid for sid, ok in zip(c.ids, c.valid) if ok} == set(c.ids) - failed
            assert set(c.ids) == {f"x/{k:02d}.{ext}" for k, (ext, _) in enumerate(files)} | {"x/good.png"}
            assert "x/good.png" not in failed and c.attrs["complete"]
        print(f"{len(files)} damaged files: {len(files) - len(failed)} read, {len(failed)} recorded failures",
              file=sys.stderr)
