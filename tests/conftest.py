"""Fixtures: a tiny random-weight timm model saved as a weights file (so tests go through the same
weights-file path as real backbones), and small generated image folders."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIPELINE_SHARED", REPO.parent / "shared"))
PATCHED_CLI = Path(__file__).with_name("patched_cli.py")  # the CLI with faults and probes (see that file)
TINY = "test_efficientnet.r160_in1k"
TINY_VIT = "test_vit.r160_in1k"
TINY_GN = "test_efficientnet_gn.r160_in1k"  # same preprocessing as TINY_VIT
CLASSES = {"red": (200, 40, 40), "blue": (40, 60, 210)}

# Never wait on a model hub: without this, an offline hub lookup retries for about 45 s.
os.environ["HF_HUB_OFFLINE"] = "1"


def make_image(path: Path, color: tuple[int, int, int], seed: int, size: tuple[int, int] = (72, 56)) -> Path:
    """A noisy image of one dominant colour: different bytes for every seed, same class look."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.normal(0, 35, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)
    return path


def make_many(root: Path, n: int = 240) -> Path:
    """``n`` small images in two class folders, enough for a run that can be killed half-way."""
    for i in range(n):
        make_image(root / ("a" if i % 2 else "b") / f"{i:04d}.jpg", (200, 40, 40) if i % 2 else (40, 60, 210), i)
    return root


def valid_rows(files: list[Path]) -> int:
    """Rows marked valid in cache files another process is writing (read without HDF5's file lock)."""
    n = 0
    for path in files:
        try:
            with h5py.File(path, "r", locking=False) as f:
                n += int(f["valid"][()].sum())
        except (OSError, KeyError):
            pass
    return n


def kill_when_rows(proc: subprocess.Popen, files: Callable[[], list[Path]], at_least: int,
                   pids: Callable[[], list[int]], timeout: float = 180) -> int | None:
    """SIGKILL ``pids()`` once the caches in ``files()`` hold ``at_least`` valid rows; the rows then,
    or None if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (n := valid_rows(files())) >= at_least:
            for pid in pids():
                os.kill(pid, signal.SIGKILL)
            return n
        time.sleep(0.02)
    return None


def held_at(tmp_path: Path, name: str) -> dict[str, str]:
    """Environment in which :data:`PATCHED_CLI` holds a run at the image ``name`` until ``tmp_path / "gate"``
    exists, so the run is still writing however fast the machine is."""
    return {"PIPELINE_TEST_FAULTS": f"{name}:gate", "PIPELINE_TEST_GATE": str(tmp_path / "gate")}


def make_folder(root: Path, n_train: int = 12, n_val: int = 6, splits: bool = True, seed: int = 0) -> Path:
    k = seed * 1000
    for split, n in (("train", n_train), ("val", n_val)) if splits else (("", n_train + n_val),):
        for name, color in CLASSES.items():
            for i in range(n):
                k += 1
                make_image(root / split / name / f"{name}_{i:03d}.jpg", color, k)
    return root


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory) -> Path:
    """`$PIPELINE_WEIGHTS_DIR` holding random weights for timm's `test_efficientnet`, `test_vit` and
    `test_efficientnet_gn`."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("weights")
    for name in (TINY, TINY_VIT, TINY_GN):
        model = timm.create_model(name, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / f"{name}.safetensors"))
    return d


@pytest.fixture(autouse=True)
def _weights_env(tiny_weights_dir, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tiny_weights_dir))


@pytest.fixture(scope="session")
def _folder_template(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("template") / "shapes")


@pytest.fixture
def folder(tmp_path, _folder_template) -> Path:
    """A fresh copy of `shapes/{train,val}/{red,blue}/*.jpg` (12 train and 6 val images per class)."""
    return Path(shutil.copytree(_folder_template, tmp_path / "shapes"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_weights_dir, _folder_template):
    """A cache and a fit run over the template folder, shared by tests that only read them."""
    os.environ["PIPELINE_WEIGHTS_DIR"] = str(tiny_weights_dir)
    from pipeline import extract, fit

    base = tmp_path_factory.mktemp("tinyrun")
    data = Path(shutil.copytree(_folder_template, base / "shapes"))
    [res] = extract(data, TINY, base / "cache", workers=0, progress=False)
    result = fit(res.cache, base / "run", n_jobs=1, progress=False)
    return {"data": data, "cache": res.cache, "run": base / "run", "fit": result}


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed CLI as a user runs it, in a subprocess (exit code, stdout, stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout,
    )


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the real-backbone tests need ../shared beside the checkout")
    return path
