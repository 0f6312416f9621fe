"""The decode path of a feature spec (``FeatureSpec.decode``): an image's bytes to the uint8 pixels its
backbone's eval transform makes, and a batch of them to the backbone's input on its device.

Every path hands over the transform's output as uint8 pixels, height x width x 3, batched as
(N, H, W, 3): a quarter of float32's bytes to pass between processes and copy to the device, and
channels-last for free. :class:`Normalize` converts and normalises a batch on the device as the first
step of the forward pass, as timm's prefetch loader does.

- ``pil``: Pillow decodes (at JPEG draft scale when the spec says so) and timm's eval transform resizes
  the whole image, then crops its centre: the features the pipeline made before decode paths existed
  (to float rounding).
- ``turbo``: :func:`pipeline.data.decode_pixels` decodes (libjpeg-turbo through simplejpeg for plain
  JPEGs, the same pixels as Pillow; Pillow for everything else), then only the region the eval
  transform keeps is cut out and resized, by torch's antialiased uint8 interpolation when the model's
  filter is bicubic or bilinear (Pillow's resize of the same region otherwise). About 3x cheaper than
  ``pil``; how close its features are to timm's transform is measured in ``benchmarks/decode_fidelity.py``.
- ``nvjpeg``: for a CUDA device. Plain JPEGs go to the device undecoded and nvJPEG decodes each batch
  of them in one call (``torchvision.io.decode_jpeg``); they are cut out and resized there. The other
  images are decoded and resized in the workers as ``turbo`` does. A batch nvJPEG refuses is decoded
  again one image at a time, so only an image it cannot decode alone is lost (recorded, with nvJPEG's
  reason).

A new decoder is a new spec value, so caches made through different paths never share a key.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import str_to_pil_interp

from .data import Member, decode_pixels, is_plain_jpeg, load_image, read_bytes
from .errors import PipelineError
from .validation import unknown

DEFAULT_CROP_PCT = 0.875  # timm's, when a data config has none
_TORCH_FILTERS = ("bilinear", "bicubic")  # filters torch resizes antialiased


class DecodePath(ABC):
    """How an image becomes the uint8 pixels of its backbone's input: ``load`` runs in a decode worker,
    ``collate`` makes the batch a worker hands back, ``to_device`` puts a batch on the device."""

    name: str = ""
    doc: str = ""

    def __init__(self, data_config: dict, jpeg_draft: bool = True):
        self.data_config = data_config
        self.min_side = draft_side(data_config) if jpeg_draft else None

    @abstractmethod
    def load(self, where: Path | Member) -> Any:
        """One image's pixels, (H, W, 3) uint8, as the eval transform makes them (or what ``collate`` takes)."""

    def collate(self, items: list) -> Any:
        return torch.from_numpy(np.stack(items))

    def to_device(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """The batch as (N, 3, H, W) uint8 on ``device`` (channels-last), and (position, reason) for each
        image lost on the way (none but for ``nvjpeg``). A pinned batch is copied without blocking."""
        return batch.to(device, non_blocking=True).permute(0, 3, 1, 2), []

    def check_device(self, device: torch.device) -> None:
        """Refuse a device this path cannot run on."""


_DECODERS: dict[str, type[DecodePath]] = {}


def register_decoder(cls: type[DecodePath]) -> type[DecodePath]:
    """Class decorator: a decode path under its ``name`` (a ``FeatureSpec.decode`` value)."""
    _DECODERS[cls.name] = cls
    return cls


def list_decoders() -> dict[str, str]:
    return {name: cls.doc for name, cls in _DECODERS.items()}


def decode_path(name: str, data_config: dict, jpeg_draft: bool = True) -> DecodePath:
    if name not in _DECODERS:
        raise unknown("decode path", name, _DECODERS)
    return _DECODERS[name](data_config, jpeg_draft)


def draft_side(data_config: dict) -> int:
    """Smallest side, in pixels, an image needs before the eval transform's resize: JPEGs can be decoded
    at a reduced DCT scale down to this without changing what the model sees."""
    size = max(data_config["input_size"][1:])
    return math.floor(size / (data_config.get("crop_pct") or DEFAULT_CROP_PCT))


@register_decoder
class PilPath(DecodePath):
    name = "pil"
    doc = "Pillow decodes, timm's eval transform resizes the whole image then crops (the features of old caches)"

    def __init__(self, data_config: dict, jpeg_draft: bool = True):
        super().__init__(data_config, jpeg_draft)
        self.transform = create_transform(**data_config, is_training=False, use_prefetcher=True)

    def load(self, where: Path | Member) -> np.ndarray:
        return self.transform(load_image(where, min_side=self.min_side)).permute(1, 2, 0).numpy()


@register_decoder
class TurboPath(DecodePath):
    name = "turbo"
    doc = ("libjpeg-turbo (simplejpeg) decodes plain JPEGs, Pillow the rest; the kept region alone is "
           "resized, on uint8 (torch's antialiased filter)")

    def load(self, where: Path | Member) -> np.ndarray:
        return self.pixels(read_bytes(where))

    def pixels(self, data: bytes) -> np.ndarray:
        """:meth:`load` of an image's bytes already read."""
        return crop_resize(torch.from_numpy(decode_pixels(data, min_side=self.min_side)), self.data_config).numpy()


@register_decoder
class NvjpegPath(DecodePath):
    name = "nvjpeg"
    doc = "CUDA only: nvJPEG decodes plain JPEGs on the GPU a batch at a time, resized there; the rest as turbo"

    def __init__(self, data_config: dict, jpeg_draft: bool = True,
                 decode: Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]] | None = None):
        super().__init__(data_config, jpeg_draft)
        self.cpu = TurboPath(data_config, jpeg_draft)
        self.decode = decode or _nvjpeg

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            gpu = "--device cuda, or " if torch.cuda.is_available() else ""
            raise PipelineError(f"decode path nvjpeg decodes on a CUDA GPU, and the device is {device.type}"
                                f"{'' if gpu else ' (torch sees no CUDA GPU here)'}; use {gpu}--decode turbo")

    def load(self, where: Path | Member) -> torch.Tensor:
        data = read_bytes(where)
        if is_plain_jpeg(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # 1-D: decoded on the device
        return torch.from_numpy(self.cpu.pixels(data))  # the bytes are read once

    def collate(self, items: list) -> list[torch.Tensor]:
        return items

    def to_device(self, batch: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        jpegs = [k for k, t in enumerate(batch) if t.ndim == 1]
        decoded = dict(zip(jpegs, self._decode([batch[k] for k in jpegs], device)))
        images, lost = [], []
        for k, item in enumerate(batch):
            got = decoded.get(k, item)
            if isinstance(got, str):
                lost.append((k, got))
            elif k in decoded:
                images.append(crop_resize(got.permute(1, 2, 0), self.data_config))
            else:
                images.append(got.to(device, non_blocking=True))
        if not images:
            return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=device), lost
        return torch.stack(images).permute(0, 3, 1, 2), lost

    def _decode(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
        """Each JPEG decoded on the device, (3, H, W); the reason where it cannot be. One call for the
        batch, and one per image when the batch's call fails."""
        if not data:
            return []
        try:
            return list(self.decode(data, device))
        except Exception:  # which image nvJPEG refused is not said: ask it one at a time
            pass
        out: list[torch.Tensor | str] = []
        for d in data:
            try:
                out.append(self.decode([d], device)[0])
            except Exception as e:  # noqa: PERF203 (each image's failure is its own)
                out.append(f"nvJPEG could not decode it ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        return out


def _nvjpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def crop_box(width: int, height: int, data_config: dict) -> tuple[tuple[float, float, float, float], tuple[int, int]] | None:
    """The region (left, top, right, bottom) of a ``width`` x ``height`` image that timm's eval transform
    keeps, and the (height, width) it becomes; None where that transform is not a resize followed by a
    centre crop inside it (timm's ``border`` mode, a non-square resize that keeps the ratio, a crop
    larger than the resize)."""
    _, h, w = data_config["input_size"]
    pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    mode = data_config.get("crop_mode") or "center"
    if mode == "squash":
        rh, rw = math.floor(h / pct), math.floor(w / pct)
    elif mode == "center" and math.floor(h / pct) == math.floor(w / pct):
        short = math.floor(h / pct)  # torchvision's Resize(int): the short side to this, the long one in ratio
        long = int(short * max(width, height) / min(width, height))
        rw, rh = (short, long) if width <= height else (long, short)
    else:
        return None
    if rh < h or rw < w:
        return None
    top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + w) * sx, (top + h) * sy), (h, w)


def crop_resize(pixels: torch.Tensor, data_config: dict) -> torch.Tensor:
    """What the eval transform makes of an image, (H, W, 3) uint8, from the region it keeps alone: cut
    out to whole pixels and resized antialiased by torch (on uint8 on a CPU, on float on a GPU), or by
    Pillow from the exact region for filters torch does not have."""
    plan = crop_box(pixels.shape[1], pixels.shape[0], data_config)
    interpolation = data_config.get("interpolation") or "bilinear"
    if plan is None or interpolation not in _TORCH_FILTERS:
        return torch.from_numpy(_pillow_crop_resize(pixels.cpu().numpy(), data_config, plan)).to(pixels.device)
    (left, top, right, bottom), size = plan
    x0, y0 = min(round(left), pixels.shape[1] - 1), min(round(top), pixels.shape[0] - 1)
    x1, y1 = max(round(right), x0 + 1), max(round(bottom), y0 + 1)
    region = pixels[y0:y1, x0:x1].permute(2, 0, 1)[None]
    if pixels.is_cuda:
        out = torch.nn.functional.interpolate(region.float(), size=size, mode=interpolation, antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    else:
        out = torch.nn.functional.interpolate(region, size=size, mode=interpolation, antialias=True)
    return out[0].permute(1, 2, 0)


def _pillow_crop_resize(pixels: np.ndarray, data_config: dict, plan) -> np.ndarray:
    img = Image.fromarray(pixels)
    if plan is None:
        return create_transform(**data_config, is_training=False, use_prefetcher=True)(img).permute(1, 2, 0).numpy()
    box, (h, w) = plan
    return np.asarray(img.resize((w, h), str_to_pil_interp(data_config["interpolation"]), box=box))


class Normalize:
    """uint8 pixels (N, 3, H, W) to the backbone's float32 input on their device, in one pass:
    ``x * 1 / (255 std) - mean / std``; channels-last, or contiguous for a backbone that is not."""

    def __init__(self, data_config: dict, device: torch.device, channels_last: bool = True):
        mean = torch.tensor(data_config["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=self.memory_format)
