"""`pipeline cache verify`: schema and valid-mask checks with plain h5py, and re-extraction of sampled
rows that finds features which no longer match their images."""

import h5py
import numpy as np
import torch
from safetensors.torch import load_file, save_file

import pytest

from conftest import TINY, make_image, run_cli
from pipeline import extract
from pipeline.stages.verify import verify


def _cache(folder, tmp_path):
    [res] = extract(folder, TINY, tmp_path / "cache", workers=0, progress=False)
    return res.cache


@pytest.mark.slow
def test_a_sound_cache_verifies(folder, tmp_path):
    report = verify(_cache(folder, tmp_path), folder, sample=8)
    assert report.ok and report.checked_rows == 8 and report.min_cosine["pooled"] > 0.999
    r = run_cli("cache", "verify", _cache(folder, tmp_path), "--data", folder, "--sample", "4")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.slow
def test_tampered_rows_are_found(folder, tmp_path):
    path = _cache(folder, tmp_path)
    with h5py.File(path, "r+") as f:
        f["features/pooled"][3] = np.random.default_rng(0).normal(size=f["features/pooled"].shape[1])
        tampered = f["ids"].asstr()[3]
    report = verify(path, folder, sample=36)
    assert not report.ok and "1 of 36 re-extracted rows drifted" in report.problems[0] and tampered in report.problems[0]
    r = run_cli("cache", "verify", path, "--data", folder, "--sample", "36")
    assert r.returncode == 1 and "PROBLEM" in r.stdout


def test_schema_problems_are_reported_without_re_extracting(folder, tmp_path):
    path = _cache(folder, tmp_path)
    with h5py.File(path, "r+") as f:
        f["features/pooled"][5] = np.nan
    assert any("NaN or inf" in p for p in verify(path, folder).problems)
    with h5py.File(path, "r+") as f:
        del f["valid"]
    report = verify(path, folder)
    assert report.problems == ["missing: valid"] and report.checked_rows == 0


def test_other_weights_are_drift(folder, tmp_path, tiny_weights_dir):
    path = _cache(folder, tmp_path)
    state = load_file(str(tiny_weights_dir / f"{TINY}.safetensors"))
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(tmp_path / "other.safetensors"))
    report = verify(path, folder, sample=8, weights=tmp_path / "other.safetensors")
    assert any(p.startswith("weights differ") for p in report.problems)


@pytest.mark.slow
def test_foreign_hdf5_files_are_checked_before_use(folder, tmp_path):
    path = _cache(folder, tmp_path)
    with h5py.File(path, "r+") as f:
        f["features"].create_dataset("extra", data=np.zeros((3, 4), np.float16))  # 3 rows in a 36-row cache
    r = run_cli("fit", path, "--out", tmp_path / "run")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "is not a feature cache of this version: attribute taps" in r.stderr, r.stderr
    assert any("features/extra has shape (3, 4), expected (36, D)" in p for p in verify(path).problems)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.arange(3)
    r = run_cli("cache", "info", other)
    assert r.returncode == 1 and "is not a feature cache of this version: missing: ids" in r.stderr


@pytest.mark.slow
def test_data_that_holds_none_of_the_rows_is_a_problem(folder, tmp_path):
    """--data that is not the cache's source compares nothing: that is not `ok`."""
    path = _cache(folder, tmp_path)
    other = tmp_path / "other" / "x"
    other.mkdir(parents=True)
    make_image(other / "y.jpg", (1, 2, 3), 0)
    r = run_cli("cache", "verify", path, "--data", tmp_path / "other", "--sample", "4")
    assert r.returncode == 1 and "none of the 4 sampled rows is in" in r.stdout, r.stdout + r.stderr
