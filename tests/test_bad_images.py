"""A corpus of broken and unusual image files, generated here: each one either yields the features of
the picture it holds or is recorded in `failures` with a reason a person can read, the run exits 0,
and the good images' features equal those of a run without the bad ones."""

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import pytest

from conftest import TINY, run_cli
from pipeline import FeatureCache
from pipeline.data import load_image, load_pixels


def _smooth(seed: int, size=(96, 64)) -> np.ndarray:
    """A photo-like picture (smooth colour fields), so lossy formats stay close to the original."""
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_corpus(root: Path) -> dict[str, str]:
    """Writes the corpus under ``root/bad``; returns what each file must give: ``ok`` or the failure
    stage and a phrase of its reason."""
    d = root / "bad"
    d.mkdir(parents=True)
    rgb = _smooth(1)
    Image.fromarray(rgb).save(d / "reference.png")
    Image.fromarray(rgb).save(d / "photo.jpg", quality=95)
    jpeg = (d / "photo.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("a text file named like a picture\n")
    png = bytearray((d / "reference.png").read_bytes())
    ihdr_crc = 8 + 8 + 13  # signature, IHDR length+type, IHDR data
    png[ihdr_crc] ^= 0xFF
    (d / "bad_crc.png").write_bytes(bytes(png))
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "gray16.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(d / "palette_transparent.png", transparency=0)
    Image.fromarray(rgb).convert("L").save(d / "gray.jpg", quality=95)
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # stored sideways ...
    exif = rotated.getexif()
    exif[0x0112] = 6  # ... with "rotate 90° clockwise to display"
    rotated.save(d / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(d / "one_pixel.png")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10 gigapixels declared, 100 bytes of data
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                 + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b""))
    os.symlink(d / "gone.jpg", d / "dangling.jpg")
    shutil.copy(d / "photo.jpg", d / "unreadable.jpg")
    os.chmod(d / "unreadable.jpg", 0)
    root_can_read = os.geteuid() == 0  # root reads files whatever their mode
    return {
        "reference.png": "ok", "photo.jpg": "ok", "cmyk.jpg": "ok", "gray16.png": "ok", "gray.jpg": "ok",
        "palette_transparent.png": "ok", "exif_rotated.jpg": "ok", "one_pixel.png": "ok",
        "truncated.jpg": "decode: truncated", "empty.jpg": "decode: empty file (0 bytes)",
        "text.jpg": "decode: not an image Pillow can read", "bad_crc.png": "decode: corrupt header",  # Pillow checks the IHDR chunk's CRC on open
        "bomb.png": "decode: decompression-bomb guard", "dangling.jpg": "read: No such file or directory",
        "unreadable.jpg": "ok" if root_can_read else "read: Permission denied",
    }


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["pil", "turbo"])
def test_every_kind_of_bad_file_is_recorded_or_read_right(tmp_path, decode):
    expected = _write_corpus(tmp_path / "data")
    good = tmp_path / "clean" / "bad"
    good.mkdir(parents=True)
    for name in ("reference.png", "photo.jpg"):
        shutil.copy(tmp_path / "data" / "bad" / name, good / name)

    r = run_cli("extract", tmp_path / "data", "-b", TINY, "--cache", tmp_path / "cache", "--workers", "2",
                "--amp", "off", "--no-progress", "--decode", decode)
    assert r.returncode == 0, r.stderr
    [path] = (tmp_path / "cache").glob("*.h5")
    with FeatureCache(path) as c:
        failures = {sid.split("/")[-1]: f"{stage}: {reason}" for sid, stage, reason in c.failures}
        valid = {sid.split("/")[-1]: bool(v) for sid, v in zip(c.ids, c.valid)}
        feats = {sid.split("/")[-1]: f for sid, f in zip(c.ids, c.features())}
    for name, want in expected.items():
        if want == "ok":
            assert valid[name] and name not in failures, (name, failures.get(name))
        else:
            stage, phrase = want.split(": ", 1)
            assert not valid[name] and failures[name].startswith(stage + ":"), (name, failures.get(name))
            assert phrase.lower() in failures[name].lower(), (name, failures[name])
    assert set(failures) == {n for n, w in expected.items() if w != "ok"}

    # the good images' features are those of a run without the bad files
    r = run_cli("extract", tmp_path / "clean", "-b", TINY, "--cache", tmp_path / "cache2", "--amp", "off", "--no-progress",
                "--decode", decode)
    assert r.returncode == 0, r.stderr
    with FeatureCache(next((tmp_path / "cache2").glob("*.h5"))) as c:
        for sid, f in zip(c.ids, c.features()):
            np.testing.assert_allclose(feats[sid.split("/")[-1]], f, rtol=2e-3, atol=2e-3)

    # unusual but valid files hold the right picture
    d = tmp_path / "data" / "bad"
    ref = np.asarray(load_image(d / "reference.png"), dtype=float)
    assert np.abs(np.asarray(load_image(d / "exif_rotated.jpg"), dtype=float) - ref).mean() < 3  # upright
    assert np.abs(np.asarray(load_image(d / "cmyk.jpg"), dtype=float) - ref).mean() < 3
    gray = np.asarray(load_image(d / "gray16.png"), dtype=float)
    assert np.abs(gray[..., 0] - ref[..., 0]).max() <= 1 and (gray[..., 0] == gray[..., 2]).all()
    assert load_image(d / "one_pixel.png").getpixel((0, 0)) == (10, 200, 30)
    pal = load_image(d / "palette_transparent.png")
    index0 = np.asarray(Image.open(d / "palette_transparent.png")) == 0
    assert (np.asarray(pal)[index0] == 255).all()  # the transparent colour is composited on white


def test_turbo_decodes_the_pixels_pillow_does(tmp_path):
    """The turbo path's decoder (libjpeg-turbo for plain JPEGs, Pillow for the rest) gives the pixels
    load_image gives, at full and at JPEG draft scale, and fails on a broken file with the same reason."""
    expected = _write_corpus(tmp_path)
    d = tmp_path / "bad"
    Image.fromarray(_smooth(2, (800, 600))).save(d / "large.jpg", quality=90)
    expected["large.jpg"] = "ok"
    for name, want in expected.items():
        if want == "ok" and os.access(d / name, os.R_OK):
            for side in (None, 224, 40):
                a = np.asarray(load_image(d / name, min_side=side), dtype=int)
                b = load_pixels(d / name, min_side=side)
                assert b.dtype == np.uint8 and a.shape == b.shape, (name, side, a.shape, b.shape)
                assert np.abs(a - b).max() <= 1, (name, side)
        elif want != "ok":
            with pytest.raises(Exception) as pillow:
                load_image(d / name)
            with pytest.raises(Exception) as turbo:
                load_pixels(d / name)
            assert (type(turbo.value), str(turbo.value)) == (type(pillow.value), str(pillow.value)), name
