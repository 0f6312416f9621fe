"""Hugging Face ``transformers`` vision models: ``hf:FOLDER`` (a saved model and image processor) or
``hf:ORG/NAME`` (the hub, its local cache when offline). ``AutoModel`` gives the network (the vision
tower of CLIP and SigLIP), ``AutoImageProcessor`` the preprocessing, which timm's eval transform then
applies: a resize to the processor's size (squashed, or its shortest edge with a centre crop), its
interpolation, mean and std.

Taps: ``pooled`` (the model's pooler output, else its class token, else its averaged feature map),
``cls`` (the class token of a transformer), and ``layer<i>`` (``hidden_states[i]``: its class token, or
its feature map averaged).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import PipelineError
from ..hub import hub_access
from . import register_model_source
from .base import Backbone, plain, state_dict_sha256

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFBackbone(Backbone):
    tokens: bool = True  # a transformer (hidden states are tokens) rather than a CNN (feature maps)
    hidden: int = 0  # how many hidden states the model returns

    @property
    def n_layers(self) -> int:
        return self.hidden

    def head_taps(self) -> tuple[str, ...]:
        return ("pooled", "cls") if self.tokens else ("pooled",)

    def _forward(self, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
        res = self.model(pixel_values=x, output_hidden_states=any(t.startswith("layer") for t in taps))
        out = {}
        for tap in taps:
            if tap == "pooled":
                pooler = getattr(res, "pooler_output", None)
                out[tap] = pooler.flatten(1) if pooler is not None else _summary(res.last_hidden_state)
            elif tap == "cls":
                out[tap] = res.last_hidden_state[:, 0]
            else:
                out[tap] = _summary(res.hidden_states[int(tap[5:])])
        return out


def _summary(h: torch.Tensor) -> torch.Tensor:
    """A transformer's class token, or a CNN's feature map averaged over space."""
    return h[:, 0] if h.ndim == 3 else h.mean((2, 3))


@register_model_source("hf", "hf:FOLDER or hf:ORG/NAME, a Hugging Face transformers vision model (AutoModel + "
                       "AutoImageProcessor)", claims=lambda name: name.startswith("hf:"))
def load(name: str, weights: Path | None) -> Backbone:
    try:
        from transformers import AutoImageProcessor, AutoModel
    except ImportError:
        raise PipelineError(f"{name} needs the transformers package: pip install -e '.[hf]' (in the repository)") from None
    ref = name[len("hf:"):]
    folder = Path(weights) if weights is not None else Path(ref) if Path(ref).is_dir() else None
    context, where = hub_access() if folder is None else (nullcontext(), str(folder))
    try:
        with context:
            model = AutoModel.from_pretrained(folder or ref)
            processor = AutoImageProcessor.from_pretrained(folder or ref)
    except Exception as e:  # transformers raises many kinds for a folder or repo that is not a model
        raise PipelineError(f"{name}: no transformers vision model and image processor in {where} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    net = getattr(model, "vision_model", model).eval()
    if folder is None:
        sha, source = state_dict_sha256(net), f"hub:{ref}"
    else:
        sha, source = _folder_sha256(folder), str(folder.resolve())
        if weights is None:  # named by its folder: by the absolute path, so it means the same from anywhere
            name = f"hf:{folder.resolve()}"
    bb = HFBackbone(name, net, sha, source, plain(_data_config(processor.to_dict(), name)), source="hf")
    with torch.inference_mode():
        probe = net(pixel_values=torch.zeros((1, *bb.data_config["input_size"])), output_hidden_states=True)
    bb.tokens, bb.hidden = probe.last_hidden_state.ndim == 3, len(probe.hidden_states)
    return bb


def _data_config(p: dict, name: str) -> dict:
    """A processor's preprocessing as a timm data config."""
    size, crop = p.get("size") or {}, p.get("crop_size") if p.get("do_center_crop") else None
    normalise = p.get("do_normalize", True)
    config = dict(interpolation=_RESAMPLE.get(p.get("resample", 3), "bicubic"),
                  mean=tuple(p.get("image_mean") or (0.0,) * 3) if normalise else (0.0,) * 3,
                  std=tuple(p.get("image_std") or (1.0,) * 3) if normalise else (1.0,) * 3, crop_mode="center")
    if "height" in size and not crop:  # resized to exactly (height, width): a squash, no crop
        return dict(config, input_size=(3, size["height"], size["width"]), crop_pct=1.0, crop_mode="squash")
    if "shortest_edge" in size:
        edge = size["shortest_edge"]
        if crop:
            return dict(config, input_size=(3, crop["height"], crop["width"]), crop_pct=crop["height"] / edge)
        return dict(config, input_size=(3, edge, edge), crop_pct=p.get("crop_pct") or 1.0)
    raise PipelineError(f"{name}: its image processor's size {size} is neither height/width nor shortest_edge")


def _folder_sha256(folder: Path) -> str:
    """A hash of a saved model's config and weight files."""
    h = hashlib.sha256()
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()
