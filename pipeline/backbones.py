"""Backbones: a name resolved by its model source (timm, Hugging Face transformers, a user's module),
with weights, frozen and in eval mode, and how its forward pass runs (device, autocast, memory format).
A backbone that cannot get its pretrained weights is an error, never a silent random initialisation."""

from __future__ import annotations

import os

import torch

from .devices import resolve_amp, resolve_device
from .model_sources import model_source
from .model_sources.base import LAYER, TAPS, Backbone, file_sha256  # noqa: F401  (the backbone protocol's names)
from .validation import unknown

def load_backbone(name: str, weights: str | os.PathLike | None = None, device: str = "cpu", amp: str = "off",
                  channels_last: bool = False) -> Backbone:
    """``name`` from its model source with pretrained weights (``weights``: a file or folder that replaces
    the source's own resolution), frozen and in eval mode, on ``device``; ``amp`` (see ``resolve_amp``)
    and ``channels_last`` set how its forward pass runs."""
    bb = model_source(name).load(name, None if weights is None else weights)
    dev = resolve_device(device)
    bb.model.eval().requires_grad_(False).to(dev)
    if channels_last:
        bb.model.to(memory_format=torch.channels_last)
    bb.amp, bb.channels_last = resolve_amp(amp, dev), channels_last
    return bb


def check_taps(taps: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Check tap names before any model is loaded (each is checked against the model later)."""
    bad = [t for t in taps if t not in TAPS and not LAYER.match(t)]
    if bad or not taps:
        raise unknown("tap", bad[0] if bad else "(none)", TAPS,
                      "or layer<i> (intermediate layer i of the network; layer-1 is the last)")
    return tuple(dict.fromkeys(taps))
