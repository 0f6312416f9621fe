"""A user's own network: ``package.module:function``, where ``function()`` returns ``(module,
data_config)``: a ``torch.nn.Module`` whose output for a batch of images is one feature vector each (a
feature map is averaged), and the preprocessing it expects as a timm data config (``input_size``,
``mean``, ``std``; ``interpolation`` bilinear and ``crop_pct`` 1.0 unless given). ``--weights FILE``
loads a safetensors state dict into it; otherwise its weights are the ones the function made. Tap:
``pooled``."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import PipelineError
from . import register_model_source
from .base import Backbone, file_sha256, plain, state_dict_sha256


class ModuleBackbone(Backbone):
    def _forward(self, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = self.model(x)
        return {"pooled": out.mean((2, 3)) if out.ndim == 4 else out.flatten(1)}


@register_model_source("module", "package.module:function returning (torch.nn.Module, timm data config)",
                       claims=lambda name: ":" in name)
def load(name: str, weights: Path | None) -> Backbone:
    module_name, _, function = name.partition(":")
    try:
        made = getattr(importlib.import_module(module_name), function)()
    except (ImportError, AttributeError) as e:
        raise PipelineError(f"backbone {name!r}: cannot import {function!r} from {module_name!r} ({e})") from None
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module) and isinstance(made[1], dict)):
        raise PipelineError(f"backbone {name!r}: {function}() must return (torch.nn.Module, data config dict)")
    model, config = made
    missing = [k for k in ("input_size", "mean", "std") if k not in config]
    if missing:
        raise PipelineError(f"backbone {name!r}: its data config lacks {', '.join(missing)}")
    config = dict(dict(interpolation="bilinear", crop_pct=1.0, crop_mode="center"), **config)
    if weights is not None:
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as e:  # a missing file, another format, other tensor names or shapes
            raise PipelineError(f"weights {weights} do not fit {name!r}: {str(e).splitlines()[0][:200]}") from e
        sha, source = file_sha256(Path(weights)), str(Path(weights).resolve())
    else:
        sha, source = state_dict_sha256(model), f"module:{name}"
    return ModuleBackbone(name, model.eval(), sha, source, plain(config), source="module")
