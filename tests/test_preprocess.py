"""Decode paths without a GPU: nvjpeg's batching and per-image retry, with torchvision's CPU JPEG
decoder standing in for nvJPEG."""

import pytest
import torch
from PIL import Image

from conftest import make_image
from pipeline.errors import PipelineError
from pipeline.preprocess import NvjpegPath, TurboPath

CONFIG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "crop_pct": 0.875, "crop_mode": "center"}


def test_nvjpeg_decodes_a_batch_in_one_call_and_a_refused_batch_image_by_image(tmp_path):
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [make_image(tmp_path / f"{i}.jpg", (200, 40, 40), i, size=(300, 200)) for i in range(3)]
    refused = make_image(tmp_path / "refused.jpg", (40, 60, 210), 9, size=(300, 200))
    png = tmp_path / "other.png"
    Image.open(jpegs[0]).save(png)
    refused_size = len(refused.read_bytes())
    calls = []

    def decode(data, device):
        calls.append(len(data))
        if any(len(d) == refused_size for d in data):
            raise RuntimeError("nvJPEG refuses this one")
        return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]

    path = NvjpegPath(CONFIG, decode=decode)
    items = [path.load(p) for p in [*jpegs, refused, png]]
    assert [t.ndim for t in items] == [1, 1, 1, 1, 3]  # JPEGs go undecoded, the PNG decoded as turbo does
    x, lost = path.to_device(path.collate(items), torch.device("cpu"))
    assert calls == [4, 1, 1, 1, 1]  # one call for the batch; after it failed, one per image
    assert [k for k, _ in lost] == [3] and "nvJPEG could not decode it" in lost[0][1]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.uint8
    turbo = TurboPath(CONFIG, jpeg_draft=False)  # nvJPEG decodes at full scale
    for got, p in zip(x, [*jpegs, png]):
        want = torch.from_numpy(turbo.load(p)).permute(2, 0, 1)
        assert (got.int() - want.int()).abs().float().mean() < 1.0


def test_nvjpeg_on_a_cpu_names_what_this_machine_can_do(monkeypatch):
    """Where torch sees no CUDA GPU, the advice is --decode turbo alone (--device cuda would fail too)."""
    for gpu, advice in ((False, r"\(torch sees no CUDA GPU here\); use --decode turbo$"),
                        (True, r"the device is cpu; use --device cuda, or --decode turbo$")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        with pytest.raises(PipelineError, match=advice):
            NvjpegPath(CONFIG).check_device(torch.device("cpu"))
