import csv
import errno
import hashlib
import importlib
import shutil
import json
import os
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY, TINY_GN, TINY_VIT, make_folder, make_image, run_cli
from pipeline import FeatureCache, PipelineError, extract, fit, load_backbone
from pipeline.data import load_image
from pipeline.preprocess import draft_side
from timm.data import create_transform
from pipeline.cache import CacheWriter
from pipeline.sources import ImageSource


def _extract(folder, cache_dir, **kw):
    kw.setdefault("workers", 0)
    [res] = extract(folder, TINY, cache_dir, progress=False, **kw)
    return res


def test_schema_readable_with_plain_h5py(folder, tmp_path, tiny_weights_dir):
    res = _extract(folder, tmp_path / "cache")
    assert res.cache.name.startswith(f"shapes__{TINY}__") and res.cache.suffix == ".h5"
    with h5py.File(res.cache, "r") as f:
        n = 36
        ids = f["ids"].asstr()[()]
        assert len(ids) == n and ids[0] == "train/blue/blue_000.jpg"
        assert f["content_hash"].dtype == np.dtype("S32") and f["content_hash"].shape == (n,)
        assert f["features/pooled"].shape == (n, 256)  # test_efficientnet's pre-logits width
        assert f["features/pooled"].dtype == np.float16
        assert f["features/pooled"].chunks[1] == f["features/pooled"].shape[1]
        assert f["valid"].dtype == bool and f["valid"][()].all()
        assert f["failures"].shape == (0,)
        assert f["failures"].dtype.names == ("id", "stage", "reason")
        assert set(f["labels"].asstr()[()]) == {"red", "blue"}
        assert set(f["splits"].asstr()[()]) == {"train", "val"}
        a = f.attrs
        assert a["schema_version"] == 1 and a["backbone"] == TINY and a["dtype"] == "float16"
        assert a["weights_sha256"] == hashlib.sha256((tiny_weights_dir / f"{TINY}.safetensors").read_bytes()).hexdigest()
        assert json.loads(a["data_config"])["input_size"] == [3, 160, 160]
        assert json.loads(a["taps"]) == ["pooled"]
        assert {"torch", "timm", "h5py"} <= set(json.loads(a["versions"]))
        assert bool(a["complete"]) and a["created"]
        assert not np.isnan(f["features/pooled"][()]).any()


def test_rerun_reuses_everything(folder, tmp_path):
    first = _extract(folder, tmp_path / "cache")
    before = FeatureCache(first.cache).features()
    again = _extract(folder, tmp_path / "cache")
    assert (first.extracted, again.extracted, again.reused, again.new, again.changed) == (36, 0, 36, 0, 0)
    assert again.cache == first.cache
    np.testing.assert_array_equal(FeatureCache(again.cache).features(), before)


def test_adding_ten_images_extracts_only_those(folder, tmp_path):
    _extract(folder, tmp_path / "cache")
    for i in range(10):
        make_image(folder / "train" / "red" / f"extra_{i}.jpg", (200, 40, 40), 5000 + i)
    res = _extract(folder, tmp_path / "cache")
    assert (res.extracted, res.new, res.reused, res.changed) == (10, 10, 36, 0)
    with FeatureCache(res.cache) as c:
        assert len(c.ids) == 46 and c.valid.all() and c.attrs["complete"]


def test_a_renamed_or_copied_image_takes_the_features_its_bytes_have(folder, tmp_path):
    """The cache keys features by content: an image renamed (or copied under another name) is not run
    through the backbone again; its new row holds the features of its old one."""
    first = _extract(folder, tmp_path / "cache")
    with FeatureCache(first.cache) as c:
        old = c.features(rows=np.array([list(c.ids).index("val/red/red_002.jpg")]))
    (folder / "val" / "red" / "red_002.jpg").rename(folder / "val" / "red" / "renamed.jpg")
    shutil.copy(folder / "val" / "red" / "red_001.jpg", folder / "train" / "red" / "copy.jpg")
    res = _extract(folder, tmp_path / "cache")
    assert (res.extracted, res.new, res.reused, res.copied) == (0, 2, 37, 0)
    with FeatureCache(res.cache) as c:
        ids = list(c.ids)
        np.testing.assert_array_equal(c.features(rows=np.array([ids.index("val/red/renamed.jpg")])), old)
        np.testing.assert_array_equal(*(c.features(rows=np.array([ids.index(i)]))
                                        for i in ("val/red/red_001.jpg", "train/red/copy.jpg")))


def test_changing_one_image_recomputes_only_it(folder, tmp_path):
    first = _extract(folder, tmp_path / "cache")
    with FeatureCache(first.cache) as c:
        row = list(c.ids).index("val/red/red_002.jpg")
        old = c.features(rows=np.array([row]))
    make_image(folder / "val" / "red" / "red_002.jpg", (40, 210, 40), 999)
    res = _extract(folder, tmp_path / "cache")
    assert (res.extracted, res.changed, res.reused, res.new) == (1, 1, 35, 0)
    with FeatureCache(res.cache) as c:
        assert not np.allclose(c.features(rows=np.array([row])), old)


def _age(files, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    for f in files:
        os.utime(f, (when, when))


def _reads(monkeypatch) -> list:
    """The files whose bytes are read for their hash from now on."""
    import pipeline.sources

    reads, real = [], pipeline.sources.content_hash
    monkeypatch.setattr(pipeline.sources, "content_hash", lambda path: reads.append(path) or real(path))
    return reads


def test_a_rerun_reads_only_the_files_whose_size_or_time_changed(folder, tmp_path, monkeypatch):
    files = sorted(folder.rglob("*.jpg"))
    _age(files, 3600)
    _extract(folder, tmp_path / "cache")
    reads = _reads(monkeypatch)
    again = _extract(folder, tmp_path / "cache")
    assert reads == [] and (again.extracted, again.reused) == (0, 36)

    touched, changed, just_written = files[:3]
    _age([touched], 1800)  # the same bytes at another time: read, and its features kept
    make_image(changed, (40, 210, 40), 999)
    _age([changed], 1800)
    _age([just_written], -300)  # changed "now" (its clock ahead): no stamp is kept until it is two seconds old
    res = _extract(folder, tmp_path / "cache")
    assert sorted(reads) == [touched, changed, just_written]
    assert (res.extracted, res.changed, res.reused) == (1, 1, 35)
    reads.clear()
    _extract(folder, tmp_path / "cache")
    assert reads == [just_written]


@pytest.mark.parametrize("edit", ["made before stamps were kept", "rows added with plain h5py"])
def test_a_cache_without_a_stamp_per_row_is_read_and_gets_them_on_its_next_run(folder, tmp_path, monkeypatch, edit):
    _age(folder.rglob("*.jpg"), 3600)
    first = _extract(folder, tmp_path / "cache")
    with h5py.File(first.cache, "a") as f:
        if edit == "made before stamps were kept":
            del f["stamps"]
        else:
            f["stamps"].resize((5, f["stamps"].shape[1]))
    with FeatureCache(first.cache) as cache:
        assert cache.valid.all()
    reads = _reads(monkeypatch)
    assert _extract(folder, tmp_path / "cache").reused == 36 and len(reads) == 36
    reads.clear()
    assert _extract(folder, tmp_path / "cache").reused == 36 and reads == []
    with h5py.File(first.cache, "r") as f:
        assert f["stamps"].shape == (36, 4) and f["stamps"][()].all()


def test_features_do_not_depend_on_batch_composition(folder, tmp_path):
    """Eval mode: BatchNorm uses its running statistics, so an image's features ignore its batch-mates."""
    a = FeatureCache(_extract(folder, tmp_path / "a", batch_size=1).cache).features()
    b = FeatureCache(_extract(folder, tmp_path / "b", batch_size=16).cache).features()
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_unreadable_images_are_recorded_and_skipped(folder, tmp_path):
    good = (folder / "train/red/red_000.jpg").read_bytes()
    (folder / "train/red/truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "train/red/empty.jpg").write_bytes(b"")
    (folder / "train/blue/text.jpg").write_text("this is not a picture")
    res = _extract(folder, tmp_path / "cache", workers=2)
    assert (res.extracted, res.failed) == (36, 3)
    with FeatureCache(res.cache) as c:
        failures = {sid: (stage, reason) for sid, stage, reason in c.failures}
        assert set(failures) == {"train/red/truncated.jpg", "train/red/empty.jpg", "train/blue/text.jpg"}
        assert "truncated" in failures["train/red/truncated.jpg"][1]
        assert "not an image Pillow can read" in failures["train/blue/text.jpg"][1]
        assert all(stage == "decode" for stage, _ in failures.values())
        assert c.valid.sum() == 36 and c.attrs["complete"]
    # unchanged broken files are not retried; fixing one makes it extract
    again = _extract(folder, tmp_path / "cache")
    assert (again.extracted, again.failed) == (0, 3)
    make_image(folder / "train/red/empty.jpg", (200, 40, 40), 77)
    fixed = _extract(folder, tmp_path / "cache")
    assert (fixed.extracted, fixed.changed, fixed.failed) == (1, 1, 2)


def test_removed_image_keeps_features_but_loses_its_label(folder, tmp_path):
    _extract(folder, tmp_path / "cache")
    (folder / "val/blue/blue_001.jpg").unlink()
    res = _extract(folder, tmp_path / "cache")
    with FeatureCache(res.cache) as c:
        row = list(c.ids).index("val/blue/blue_001.jpg")
        assert c.valid[row] and c.labels[row] == ""


def test_dtype_and_taps(folder, tmp_path):
    res = _extract(folder, tmp_path / "cache", dtype="float32", taps=("pooled", "logits"))
    with FeatureCache(res.cache) as c:
        assert c.attrs["dtype"] == "float32" and sorted(c.taps) == ["logits", "pooled"]
        assert c.info()["taps"]["logits"] == 1000
    other = _extract(folder, tmp_path / "cache")
    assert other.cache != res.cache  # float16 is another cache
    # asking an existing cache for a new tap recomputes its rows with every tap
    more = _extract(folder, tmp_path / "cache", taps=("pooled", "logits"))
    assert more.cache == other.cache and more.extracted == 36
    with FeatureCache(more.cache) as c:
        assert sorted(c.taps) == ["logits", "pooled"] and c.valid.all()


def test_second_writer_is_refused(folder, tmp_path):
    first = _extract(folder, tmp_path / "cache")
    with FeatureCache(first.cache) as c:
        spec, attrs = c.spec, c.attrs
    with CacheWriter(first.cache, spec, attrs["weights_source"], attrs["source"], {"pooled": 1}):
        with pytest.raises(PipelineError, match=r"being written by another process \(pid \d+\)"):
            _extract(folder, tmp_path / "cache")
    assert _extract(folder, tmp_path / "cache").reused == 36


def test_a_fifo_or_a_device_is_a_read_failure_not_a_hang(folder, tmp_path):
    """Reading a FIFO blocks until someone writes to it, and /dev/zero never ends: neither is hashed."""
    os.mkfifo(folder / "train" / "red" / "pipe.jpg")
    os.symlink("/dev/zero", folder / "train" / "red" / "zero.jpg")
    res = _extract(folder, tmp_path / "cache")
    assert res.extracted == 36 and res.failed == 2
    with FeatureCache(res.cache) as c:
        assert sorted(c.failures) == [("train/red/pipe.jpg", "read", "OSError: not a regular file"),
                                      ("train/red/zero.jpg", "read", "OSError: not a regular file")]


@pytest.mark.parametrize("kw, message", [
    (dict(dtype="int8"), "--dtype must be one of float16, float32, got 'int8'"),
    (dict(taps=("block9",)), "unknown tap 'block9'"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
])
def test_bad_arguments(folder, tmp_path, kw, message):
    with pytest.raises(PipelineError, match=message):
        _extract(folder, tmp_path / "cache", **kw)


@pytest.mark.slow
def test_cli_extract_and_cache_info(folder, tmp_path):
    r = run_cli("extract", folder, "--backbone", TINY, "--cache", tmp_path / "cache", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "extracted 36, reused from cache 0, failed 0" in r.stdout and "images/s" in r.stdout
    [cache] = (tmp_path / "cache").glob("*.h5")
    r = run_cli("cache", "info", cache)
    assert r.returncode == 0 and "36 valid, 0 failed" in r.stdout and "pooled (" in r.stdout
    (folder / "train" / "red" / "broken.jpg").write_text("not an image")
    r = run_cli("extract", folder, "--backbone", TINY, "--cache", tmp_path / "cache", "--workers", "1")
    assert r.returncode == 0 and "failed 1 (new 1" in r.stdout, r.stderr
    assert f"note: 1 image of the source could not be read or decoded; `pipeline cache info {cache}`" in r.stderr
    assert "train/red/broken.jpg [decode]" in run_cli("cache", "info", cache).stdout


@pytest.mark.parametrize("args, message", [
    (["extract", "no/such/folder", "--backbone", TINY], "error: data source not found: no/such/folder"),
    (["extract", "{folder}", "--backbone", "not_a_model"], "error: unknown backbone 'not_a_model'"),
    (["extract", "{folder}", "--backbone", TINY, "--dtype", "float8"], "error: --dtype must be one of float16, float32, got 'float8'"),
])
@pytest.mark.slow
def test_cli_fatal_errors_are_one_line(folder, tmp_path, args, message):
    r = run_cli(*[a.format(folder=folder) for a in args], "--cache", tmp_path / "c")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(message)
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_usage_error_exit_code(folder):
    r = run_cli("extract", folder, "--backbone", TINY, "--batch-size", "zero")
    assert r.returncode == 2 and "batch-size" in r.stderr


@pytest.mark.slow
def test_cli_several_backbones_each_get_a_cache(folder, tmp_path):
    r = run_cli("extract", folder, "-b", TINY, "-b", TINY_VIT, "--cache", tmp_path / "cache", "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("extracted 36,") == 2
    caches = sorted((tmp_path / "cache").glob("*.h5"))
    assert [FeatureCache(c).backbone for c in caches] == [TINY, TINY_VIT]
    r = run_cli("fit", tmp_path / "cache", "--out", tmp_path / "run", "--n-jobs", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "run" / "leaderboard.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((row["backbone"], row["head"]) for row in rows) == sorted(
        (b, h) for b in (TINY, TINY_VIT) for h in ("logreg", "mlp", "knn"))


def test_weights_with_several_backbones_is_refused(folder, tmp_path, tiny_weights_dir):
    with pytest.raises(PipelineError, match="give exactly one --backbone"):
        extract(folder, [TINY, TINY_VIT], tmp_path, weights=tiny_weights_dir / f"{TINY}.safetensors")


def test_manifest_with_a_missing_file(folder, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\nnot_here.jpg,a\n{folder}/train/red/red_000.jpg,b\n")
    [res] = extract(manifest, TINY, tmp_path / "cache", workers=0, allow_outside_root=True, progress=False)
    assert (res.extracted, res.failed) == (1, 1)
    with FeatureCache(res.cache) as c:
        assert c.failures == [("not_here.jpg", "read", "FileNotFoundError: No such file or directory")]


def test_layer_taps(folder, tmp_path):
    # float32 forward (amp off) and timm's own transform (decode pil), so the reference below computes the same numbers
    res = _extract(folder, tmp_path / "cache", taps=("pooled", "layer0", "layer-1"), amp="off", decode="pil")
    bb = load_backbone(TINY)
    with FeatureCache(res.cache) as c:
        assert sorted(c.taps) == ["layer0", "layer4", "pooled"]  # layer-1 is the last of 5 stages
        assert c.info()["taps"] == {"layer0": 16, "layer4": 64, "pooled": 256}
        x = create_transform(**bb.data_config)(load_image(folder / c.ids[0])).unsqueeze(0)
        with torch.inference_mode():
            maps = bb.model.forward_intermediates(x, indices=[0, 4], intermediates_only=True)
        np.testing.assert_allclose(c.features("layer0")[0], maps[0].mean((2, 3))[0], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(c.features("layer4")[0], maps[1].mean((2, 3))[0], rtol=2e-3, atol=2e-3)
    # a ViT's layer tap is the class token of that block's output
    [vit] = extract(folder, TINY_VIT, tmp_path / "cache", taps=("layer2",), workers=0, amp="off", decode="pil",
                    progress=False)
    vbb = load_backbone(TINY_VIT)
    with FeatureCache(vit.cache) as c, torch.inference_mode():
        x = create_transform(**vbb.data_config)(load_image(folder / c.ids[0])).unsqueeze(0)
        _, [(_, prefix)] = vbb.model.forward_intermediates(x, indices=[2], return_prefix_tokens=True)
        np.testing.assert_allclose(c.features("layer2")[0], prefix[0, 0], rtol=2e-3, atol=2e-3)
    fit_rows = fit(res.cache, tmp_path / "run", heads=["knn"], n_jobs=1, progress=False).rows
    assert sorted(r.tap for r in fit_rows) == ["layer0", "layer4", "pooled"]  # one leaderboard row per tap
    with pytest.raises(PipelineError, match=r"has layers 0\.\.4; 'layer5' is out of range"):
        _extract(folder, tmp_path / "cache", taps=("layer5",))


def test_flip_tta_is_mirror_invariant(tmp_path):
    from PIL import Image, ImageOps

    data = tmp_path / "mirror"
    img = make_image(data / "a" / "img.jpg", (200, 40, 40), 1, size=(160, 160))
    ImageOps.mirror(Image.open(img)).save(data / "a" / "mirrored.png")  # lossless, so exactly the mirror
    Image.open(img).save(data / "a" / "img.png")
    (data / "a" / "img.jpg").unlink()
    plain = _extract(data, tmp_path / "cache", amp="off", dtype="float32")
    tta = _extract(data, tmp_path / "cache", amp="off", dtype="float32", tta="flip")
    assert tta.cache != plain.cache  # flip TTA is another cache
    with FeatureCache(tta.cache) as t, FeatureCache(plain.cache) as p:
        assert t.attrs["tta"] == "flip"
        f, g = dict(zip(t.ids, t.features())), dict(zip(p.ids, p.features()))
    with_tta = np.abs(f["a/img.png"] - f["a/mirrored.png"]).max()
    without = np.abs(g["a/img.png"] - g["a/mirrored.png"]).max()
    assert with_tta < 1e-5 < without / 10  # the same up to float32 rounding; without TTA they differ


def test_jpeg_draft_stays_within_resampling_tolerance(tmp_path):
    from PIL import Image

    bb = load_backbone(TINY)
    rng = np.random.default_rng(0)  # a photo-like picture: smooth colour fields with some grain
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC))
    path = tmp_path / "big.jpg"
    Image.fromarray(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)).save(path, quality=90)
    draft = load_image(path, min_side=draft_side(bb.data_config))
    assert draft.size == (400, 300) and min(draft.size) >= draft_side(bb.data_config)  # decoded at 1/4 scale
    tf = create_transform(**bb.data_config)
    full, reduced = tf(load_image(path)), tf(draft)
    grey_level = 1 / 255 / min(bb.data_config["std"])  # one 8-bit step after normalisation
    assert (full - reduced).abs().mean() < grey_level and (full - reduced).abs().max() < 10 * grey_level
    with torch.inference_mode():
        a, b = (bb.forward(t.unsqueeze(0), ("pooled",))["pooled"][0] for t in (full, reduced))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_backbones_with_one_preprocessing_share_one_decode(folder, tmp_path, monkeypatch):
    module = importlib.import_module("pipeline.preprocess")
    calls = []
    real = module.decode_pixels
    monkeypatch.setattr(module, "decode_pixels", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    results = extract(folder, [TINY, TINY_VIT, TINY_GN], tmp_path / "cache", workers=0, progress=False)
    assert [r.extracted for r in results] == [36, 36, 36]
    assert len(calls) == 72  # TINY alone, then TINY_VIT and TINY_GN over one decode pass
    for r in results:
        with FeatureCache(r.cache) as c:
            assert c.valid.all() and c.backbone == r.backbone
    again = extract(folder, [TINY, TINY_VIT, TINY_GN], tmp_path / "cache", workers=0, progress=False)
    assert [r.reused for r in again] == [36, 36, 36] and len(calls) == 72


def test_decode_path_is_part_of_the_cache(folder, tmp_path):
    """A cache made through another decode path has another key, and turbo's features are those of
    timm's own transform (pil) to resize rounding."""
    pil = _extract(folder, tmp_path / "cache", amp="off", decode="pil")
    turbo = _extract(folder, tmp_path / "cache", amp="off", decode="turbo")
    assert pil.cache != turbo.cache and turbo.extracted == 36
    with FeatureCache(pil.cache) as a, FeatureCache(turbo.cache) as b:
        assert (a.spec.decode, b.spec.decode) == ("pil", "turbo")
        x, y = a.features(), b.features()
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.95
    with pytest.raises(PipelineError, match="--decode must be one of pil, turbo, nvjpeg, got 'jpeg'"):
        _extract(folder, tmp_path / "cache", decode="jpeg")


def test_a_new_cache_decodes_with_turbo_and_one_made_with_pil_before_keeps_it(folder, tmp_path):
    """The default decode path of new caches changed from pil to turbo: a folder that already holds a
    source's pil cache (made before, when pil was the default) goes on with it, nothing recomputed; a
    new folder, or --decode, gets what it asks for."""
    from pipeline.stages.study import _planned

    new = _extract(folder, tmp_path / "new", amp="off")
    with FeatureCache(new.cache) as c:
        assert c.spec.decode == "turbo"
    before = _extract(folder, tmp_path / "cache", amp="off", decode="pil")
    again = _extract(folder, tmp_path / "cache", amp="off")
    assert again.cache == before.cache and (again.extracted, again.reused) == (0, 36)
    assert "is this source's cache decoded with pil, the default before turbo, and goes on with pil" in again.note
    settings = dict(amp="off", device="cpu")
    source = before.cache.name.split("__")[0]
    assert _planned(tmp_path / "cache", source, TINY, settings, ("pooled",), True)[0] == before.cache
    asked = _extract(folder, tmp_path / "cache", amp="off", decode="turbo")
    assert asked.cache.name == new.cache.name and asked.extracted == 36
    last = _extract(folder, tmp_path / "cache", amp="off")
    assert last.cache == asked.cache and not last.note  # both there: the new default's


def test_rows_of_images_gone_from_the_source_count_only_where_they_hold_features(folder, tmp_path):
    """A file that never decoded and is then deleted leaves a row without features: it is not counted
    among the rows kept for predict."""
    broken = folder / "train" / "red" / "broken.jpg"
    broken.write_text("not an image")
    assert _extract(folder, tmp_path / "cache").failed == 1
    broken.unlink()
    (folder / "train" / "red" / "red_000.jpg").unlink()
    assert _extract(folder, tmp_path / "cache").gone == 1


def test_a_file_at_the_caches_path_that_is_no_cache_is_refused_and_left_as_it_was(folder, tmp_path):
    """An empty file, or an HDF5 file without the cache's datasets, where extract would write its cache:
    one clear error, and the file is not written over (a re-run says the same)."""
    name = _extract(folder, tmp_path / "first").cache.name
    bad = tmp_path / "cache" / name
    bad.parent.mkdir()
    bad.write_bytes(b"")
    for _ in range(2):
        with pytest.raises(PipelineError, match="cannot open cache .*: 0 bytes that are not an HDF5 file; move it away or use another --cache"):
            _extract(folder, tmp_path / "cache")
        assert bad.read_bytes() == b""
    h5py.File(bad, "w").close()
    before = bad.read_bytes()
    with pytest.raises(PipelineError, match="is not a feature cache of this version: missing: ids.*move it away"):
        _extract(folder, tmp_path / "cache")
    assert bad.read_bytes() == before


@pytest.mark.slow
def test_compiled_forward_gives_the_features_of_the_plain_one(folder, tmp_path):
    """--compile: one torch.compile'd step for a fixed batch shape, the short last batch padded. In
    subprocesses: inductor's compile threads would otherwise stay in the test process."""
    if shutil.which("cc") is None:
        pytest.skip("torch.compile on a CPU needs a C compiler (cc)")
    for cache, flags in (("a", []), ("b", ["--compile"])):  # 36 images in batches of 8: the last is 4
        r = run_cli("extract", folder, "-b", TINY, "--cache", tmp_path / cache, "--amp", "off", "--batch-size", "8",
                    "--workers", "0", "--no-progress", *flags)
        assert r.returncode == 0, r.stderr
    [plain], [compiled] = (tmp_path / "a").glob("*.h5"), (tmp_path / "b").glob("*.h5")
    assert plain.name == compiled.name  # compiling is not part of the spec
    with FeatureCache(plain) as a, FeatureCache(compiled) as b:
        assert b.valid.all()
        np.testing.assert_allclose(a.features(), b.features(), rtol=1e-2, atol=1e-2)


def test_autocast_dtype_is_part_of_the_cache(folder, tmp_path):
    off = _extract(folder, tmp_path / "cache", amp="off")
    bf16 = _extract(folder, tmp_path / "cache", amp="bf16")
    assert off.cache != bf16.cache
    with FeatureCache(off.cache) as a, FeatureCache(bf16.cache) as b:
        assert (a.attrs["amp"], b.attrs["amp"]) == ("off", "bf16")
        x, y = a.features(), b.features()
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.99
    with pytest.raises(PipelineError, match="--amp must be one of auto, off, bf16, fp16, got 'fp8'"):
        _extract(folder, tmp_path / "cache", amp="fp8")


def test_a_failed_write_stops_the_run_and_keeps_earlier_batches(folder, tmp_path, monkeypatch):
    real = CacheWriter.write
    written = []

    def write(self, rows, feats):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(rows))
        real(self, rows, feats)

    monkeypatch.setattr(CacheWriter, "write", write)
    with pytest.raises(PipelineError, match="failed: No space left on device; the rows written before are kept"):
        _extract(folder, tmp_path / "cache", batch_size=8)
    [path] = (tmp_path / "cache").glob("*.h5")
    with h5py.File(path, "r") as f:
        assert f["valid"][()].sum() == 8
    monkeypatch.setattr(CacheWriter, "write", real)
    assert _extract(folder, tmp_path / "cache").extracted == 28


def test_two_sources_of_one_name_never_share_a_cache(folder, tmp_path, monkeypatch):
    """The cache file names the source by its name only: another source of that name is refused while the
    first is still there, before any of its files is read, and a source moved elsewhere keeps its cache
    (nothing recomputed)."""
    first = _extract(folder, tmp_path / "cache")
    other = make_folder(tmp_path / "elsewhere" / folder.name, n_train=2, n_val=1, seed=3)
    with monkeypatch.context() as m:
        m.setattr(ImageSource, "content_hashes", lambda *a, **k: pytest.fail("hashed a refused source's files"))
        with pytest.raises(PipelineError, match="two data sources named 'shapes' cannot share a cache folder"):
            _extract(other, tmp_path / "cache")
    with pytest.raises(PipelineError, match=f"holds the images of {folder.resolve()}, not of {other.resolve()}: "
                                            "two data sources named 'shapes' cannot share a cache folder"):
        _extract(other, tmp_path / "cache")
    [named] = extract(other, TINY, tmp_path / "cache", name="shapes-2", workers=0, progress=False)
    assert named.cache.name.startswith("shapes-2__") and named.extracted == 6  # 2 + 1 per class
    with pytest.raises(PipelineError, match="--name must be letters, digits, '.', '_', '=' or '-', got 'a/b'"):
        extract(other, TINY, tmp_path / "cache", name="a/b", workers=0, progress=False)
    moved = tmp_path / "moved" / folder.name
    moved.parent.mkdir()
    folder.rename(moved)
    again = _extract(moved, tmp_path / "cache")
    assert again.cache == first.cache and again.extracted == 0 and again.reused == 36
    r = run_cli("cache", "info", tmp_path / "cache")  # a folder of caches
    assert r.returncode == 0 and f"source     shapes  ({moved.resolve()})" in r.stdout, r.stderr


def test_a_label_file_with_an_unknown_split_is_refused(tmp_path):
    from pipeline import read_labels

    (tmp_path / "t.csv").write_text("id,label,split\na,x,train\nb,y,Val\n")
    with pytest.raises(PipelineError, match="t.csv:3: split must be one of train, val, test or empty, got 'Val'"):
        read_labels(tmp_path / "t.csv")


def test_a_name_without_its_tag_is_the_same_backbone(folder, tmp_path):
    """timm resolves `test_efficientnet` to its default tag: the same weights, the same cache, nothing recomputed."""
    first = _extract(folder, tmp_path / "cache")
    [again] = extract(folder, TINY.split(".")[0], tmp_path / "cache", workers=0, progress=False)
    assert again.cache == first.cache and again.backbone == TINY and again.extracted == 0


def test_an_interrupted_extract_says_what_it_kept_and_the_rerun_extracts_the_rest(folder, tmp_path, monkeypatch):
    from pipeline.errors import Interrupted
    from pipeline.featurizer import Featurizer

    real, calls = Featurizer.features, []

    def stop_at_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(Featurizer, "features", stop_at_second)
    with pytest.raises(Interrupted, match=r"8 image\(s\) written to .*\.h5 and kept, 28 still to extract; "
                                          "the same command extracts the rest"):
        _extract(folder, tmp_path / "cache", batch_size=8)
    [path] = (tmp_path / "cache").glob("*.h5")
    with h5py.File(path, "r") as f:
        assert f["valid"][()].sum() == 8  # the batch handed to the writer before the stop is written whole
    monkeypatch.setattr(Featurizer, "features", real)
    assert _extract(folder, tmp_path / "cache").extracted == 28


def test_merge_refuses_caches_of_other_specs_sources_or_bytes(folder, tmp_path):
    from pipeline import merge_caches

    [a] = extract(folder, TINY, tmp_path / "a", workers=0, progress=False)
    [b] = extract(folder, TINY, tmp_path / "b", workers=0, progress=False, dtype="float32")
    with pytest.raises(PipelineError, match="holds features of another feature spec"):
        merge_caches([a.cache, b.cache], tmp_path / "m")
    other = tmp_path / "other" / "shapes"
    shutil.copytree(folder, other)
    make_image(other / "train" / "red" / "red_000.jpg", (10, 200, 10), 4242)  # same id, other bytes
    [c] = extract(other, TINY, tmp_path / "c", workers=0, progress=False)
    with pytest.raises(PipelineError, match="train/red/red_000.jpg holds other bytes in"):
        merge_caches([a.cache, c.cache], tmp_path / "m")
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").glob("*.h5"))
    half = tmp_path / "half" / "shapes"
    shutil.copytree(folder / "train", half / "train")
    [h] = extract(half, TINY, tmp_path / "h", workers=0, progress=False)
    result = merge_caches([h.cache, a.cache], tmp_path / "m")
    assert (result.rows, result.copied, result.kept) == (36, 36, 0)
    again = merge_caches([a.cache, a.cache], tmp_path / "m")  # another part first (its images elsewhere), named twice
    assert (again.parts, again.rows, again.copied, again.kept) == (1, 36, 0, 36)
