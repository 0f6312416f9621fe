import csv
import hashlib
import json

import h5py
import numpy as np
import pytest

from conftest import TINY, TINY_VIT, make_image, run_cli
from pipeline import FeatureCache, PipelineError, extract
from pipeline.cache import CacheWriter


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
        assert "cannot identify image file" in failures["train/blue/text.jpg"][1]
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
        meta = {k: c.attrs[k] for k in ("backbone", "weights_sha256", "weights_source", "data_config", "dtype", "source", "amp")}
    with CacheWriter(first.cache, meta, {"pooled": 1}):
        with pytest.raises(PipelineError, match=r"being written by another process \(pid \d+\)"):
            _extract(folder, tmp_path / "cache")
    assert _extract(folder, tmp_path / "cache").reused == 36


@pytest.mark.parametrize("kw, message", [
    (dict(dtype="int8"), "unknown dtype 'int8'"),
    (dict(taps=("block9",)), "unknown tap 'block9'"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
])
def test_bad_arguments(folder, tmp_path, kw, message):
    with pytest.raises(PipelineError, match=message):
        _extract(folder, tmp_path / "cache", **kw)


def test_cli_extract_and_cache_info(folder, tmp_path):
    r = run_cli("extract", folder, "--backbone", TINY, "--cache", tmp_path / "cache", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "extracted 36, reused from cache 0, failed 0" in r.stdout and "images/s" in r.stdout
    [cache] = (tmp_path / "cache").glob("*.h5")
    r = run_cli("cache", "info", cache)
    assert r.returncode == 0 and "36 valid, 0 failed" in r.stdout and "pooled (" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["extract", "no/such/folder", "--backbone", TINY], "error: data source not found: no/such/folder"),
    (["extract", "{folder}", "--backbone", "not_a_model"], "error: unknown backbone 'not_a_model'"),
    (["extract", "{folder}", "--backbone", TINY, "--dtype", "float8"], "error: unknown dtype 'float8'"),
])
def test_cli_fatal_errors_are_one_line(folder, tmp_path, args, message):
    r = run_cli(*[a.format(folder=folder) for a in args], "--cache", tmp_path / "c")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(message)
    assert "Traceback" not in r.stderr


def test_cli_usage_error_exit_code(folder):
    r = run_cli("extract", folder, "--backbone", TINY, "--batch-size", "zero")
    assert r.returncode == 2 and "batch-size" in r.stderr


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
    [res] = extract(manifest, TINY, tmp_path / "cache", workers=0, progress=False)
    assert (res.extracted, res.failed) == (1, 1)
    with FeatureCache(res.cache) as c:
        assert c.failures == [("not_here.jpg", "read", "FileNotFoundError: No such file or directory")]
