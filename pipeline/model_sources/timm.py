"""timm backbones: a model name, or timm's ``hf-hub:`` and ``local-dir:`` forms.

Weights resolve in this order: an explicit file, ``$PIPELINE_WEIGHTS_DIR/<name>.safetensors``, then
timm's hub cache or a download. A backbone that cannot get pretrained weights is an error, never a
silent random initialisation. The preprocessing is the model's own pretrained config, also when the
weights come from a local file.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Sequence

import timm
import torch
from safetensors import SafetensorError, safe_open
from timm.data import resolve_data_config, resolve_model_data_config

from ..errors import PipelineError
from ..hub import hub_access
from ..modeldir import MODEL_FILE
from . import register_model_source
from .base import Backbone, file_sha256, plain, state_dict_sha256

WEIGHTS_DIR_ENV = "PIPELINE_WEIGHTS_DIR"
TIMM_FORMS = ("hf-hub:", "local-dir:")


class TimmBackbone(Backbone):
    """``pooled`` is the pre-logits embedding, ``logits`` the classifier's output (when the weights have
    one), ``layer<i>`` intermediate i of ``forward_intermediates``, global-average pooled (the class
    token for a ViT)."""

    @property
    def n_layers(self) -> int:
        info = getattr(self.model, "feature_info", None)
        if not hasattr(self.model, "forward_intermediates") or not info:
            return 0
        return len(info)

    def head_taps(self) -> tuple[str, ...]:
        return ("pooled", "logits") if self.model.num_classes else ("pooled",)

    def _forward(self, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
        layers = sorted({int(t[5:]) for t in taps if t.startswith("layer")})
        head = {"pooled", "logits"} & set(taps)
        inter: dict[str, torch.Tensor] = {}
        if layers:
            cls = getattr(self.model, "cls_token", None) is not None
            kw = dict(return_prefix_tokens=True) if cls else {}
            if not head:
                kw.update(intermediates_only=True, stop_early=True)
            res = self.model.forward_intermediates(x, indices=layers, **kw)
            final, maps = res if head else (None, res)
            for i, m in zip(layers, maps):
                inter[f"layer{i}"] = m[1][:, 0] if cls else m.mean((2, 3))
        else:
            final = self.model.forward_features(x) if head else None
        out = {}
        pooled = self.model.forward_head(final, pre_logits=True) if head else None
        for tap in taps:
            if tap == "pooled":
                out[tap] = pooled
            elif tap == "logits":  # in float32: a head fitted on the pooled features predicts the same
                with torch.autocast(pooled.device.type, enabled=False):
                    out[tap] = self.model.get_classifier()(pooled.float())
            else:
                out[tap] = inter[tap]
        return out


def plan(name: str, weights: Path | None) -> tuple[str, str, dict] | None:
    """What ``load`` will record for a timm name with a local weights file, from the file's sha256 and
    timm's pretrained config alone; None otherwise (hub weights are hashed once loaded)."""
    if ":" in name or not timm.is_model(name):
        return None
    file = resolve_weights_file(name, weights)
    cfg = _pretrained_cfg(name)
    if file is None or cfg is None:
        return None
    return _full_name(name), file_sha256(file), plain(resolve_data_config(pretrained_cfg=cfg.to_dict()))


def find_weights(name: str, weights_sha256: str, given: Sequence[Path], recorded: str | None) -> Path | None:
    """The first weights file whose sha256 is ``weights_sha256``, among the files given, the recorded one
    and ``$PIPELINE_WEIGHTS_DIR``'s; None when they came from the hub; an error naming every place looked
    in when there is none (at once: a file's weights cannot be downloaded)."""
    looked: list[str] = []
    from_hub = (recorded or "").startswith("hub:")
    candidates = [*given, *([Path(recorded)] if recorded and not from_hub else []), *weights_dir_candidates(name)]
    for path in dict.fromkeys(candidates):
        try:
            file = resolve_weights_file(name, path)
        except PipelineError:
            looked.append(f"{path} (missing)")
            continue
        sha = file_sha256(file)
        if sha == weights_sha256:
            return file
        looked.append(f"{file} (other weights, sha256 {sha[:12]})")
    if from_hub:
        return None
    if not os.environ.get(WEIGHTS_DIR_ENV):
        looked.append(f"${WEIGHTS_DIR_ENV} (not set)")
    raise PipelineError(f"no weights for {name} with sha256 {weights_sha256[:12]}: looked in "
                        f"{', '.join(looked)}; pass --weights FILE")


@register_model_source("timm", "timm model names, hf-hub:ORG/NAME and local-dir:FOLDER (timm's own forms)",
                       claims=lambda name: ":" not in name or name.startswith(TIMM_FORMS), plan=plan,
                       find_weights=find_weights)
def load(name: str, weights: Path | None) -> Backbone:
    if name.startswith("local-dir:"):
        model, sha, source = _from_local_dir(name, weights)
        name = f"local-dir:{Path(source).parent}"  # absolute: the same model from any directory
    elif name.startswith("hf-hub:"):
        model, sha, source = _from_hub(name, [], weights)
    else:
        _check_model_name(name)
        file = resolve_weights_file(name, weights)
        if file is not None:
            model, sha, source = _from_file(name, file), file_sha256(file), str(file.resolve())
        else:
            model, sha, source = _from_hub(name, weights_dir_candidates(name), None)
        name = _full_name(name)  # recorded with its tag, as timm resolves it: one name, one cache
    return TimmBackbone(name, model.eval(), sha, source, plain(resolve_model_data_config(model)), source="timm")


def resolve_weights_file(name: str, weights: str | os.PathLike | None = None) -> Path | None:
    """The local weights file for ``name``: ``weights`` if given (a model folder means its
    ``model.safetensors``), else one in ``$PIPELINE_WEIGHTS_DIR``."""
    if weights is not None:
        path = Path(weights)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise PipelineError(f"weights file not found: {path}")
        return path
    return next((p for p in weights_dir_candidates(name) if p.is_file()), None)


def weights_dir_candidates(name: str) -> list[Path]:
    """Where ``$PIPELINE_WEIGHTS_DIR`` would hold ``name``'s weights (with and without its default tag)."""
    directory = os.environ.get(WEIGHTS_DIR_ENV)
    if not directory or ":" in name:
        return []
    return [Path(directory) / f"{n}.safetensors" for n in dict.fromkeys([name, _full_name(name)])]


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=True), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise PipelineError(f"unknown backbone {name!r}{hint}")
    _pretrained_cfg(name)


def _pretrained_cfg(name: str):
    """timm's pretrained config of ``name`` (None when it has none); a tag timm does not know is an error
    naming the tags it does."""
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        arch, tag = timm.models.split_model_name_tag(name)
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise PipelineError(f"unknown backbone {name!r}: timm has no tag {tag!r} for {arch} (it has {tags})") from None


def _full_name(name: str) -> str:
    cfg = _pretrained_cfg(name)
    arch, tag = timm.models.split_model_name_tag(name)
    return f"{arch}.{cfg.tag}" if cfg is not None and not tag and cfg.tag else name


def _from_file(name: str, file: Path) -> torch.nn.Module:
    if file.suffix != ".safetensors":
        raise PipelineError(f"weights file {file} is not .safetensors; convert it (safetensors.torch.save_file)")
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier")
    try:
        with safe_open(str(file), framework="pt") as f:
            key = f"{classifier}.weight" if isinstance(classifier, str) else None
            num_classes = f.get_slice(key).get_shape()[0] if key and key in f.keys() else 0
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"weights file {file} is not a readable safetensors file: {e}") from e
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay=dict(file=str(file), num_classes=num_classes))
    except (RuntimeError, KeyError, ValueError, SafetensorError) as e:
        raise PipelineError(f"weights file {file} does not fit backbone {name!r}: {_shortened(e)}") from e


def _shortened(e: Exception, lines: int = 3, width: int = 200) -> str:
    """A loading error whole but short: torch's state-dict error is a header line then one line per kind
    of problem (missing keys, unexpected keys, each size mismatch), each possibly thousands of names long."""
    parts = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    shown = [p if len(p) <= width else p[:width] + " ..." for p in parts[:lines + 1]]
    more = f" (and {len(parts) - lines - 1} more)" if len(parts) > lines + 1 else ""
    return " ".join(shown) + more


def _from_local_dir(name: str, weights: Path | None) -> tuple[torch.nn.Module, str, str]:
    """timm's ``local-dir:FOLDER`` (a ``config.json`` and ``model.safetensors``, as ``finetune`` writes)."""
    folder = Path(weights) if weights is not None else Path(name[len("local-dir:"):])
    if folder.is_file():  # the weights file itself, as predict finds it from a cache's spec
        folder = folder.parent
    file = folder / MODEL_FILE
    if not file.is_file():
        raise PipelineError(f"{name}: {file} not found; a local-dir: model is a folder with config.json and {MODEL_FILE}")
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as e:  # timm's errors for a folder that is not a model are of many kinds
        raise PipelineError(f"{name}: timm cannot load {folder} ({type(e).__name__}: {e})") from e
    return model, file_sha256(file), str(file.resolve())


def _from_hub(name: str, looked_in: list[Path], weights: Path | None) -> tuple[torch.nn.Module, str, str]:
    if weights is not None:
        raise PipelineError(f"--weights does not apply to {name}: it names its weights on the hub")
    looked = (f"--weights (not given), {WEIGHTS_DIR_ENV} "
              + (f"({', '.join(map(str, looked_in))}: not found)" if looked_in else "(not set)"))
    cfg = None if name.startswith("hf-hub:") else timm.models.get_pretrained_cfg(name)
    if not name.startswith("hf-hub:") and (cfg is None or not (cfg.hf_hub_id or cfg.url)):
        raise PipelineError(f"no pretrained weights for {name!r}: looked in {looked}; timm has none to download")
    context, where = hub_access()
    try:
        with context:
            model = timm.create_model(name, pretrained=True)
    except Exception as e:  # network, cache and hub errors all mean the same thing here
        raise PipelineError(f"no pretrained weights for {name!r}: looked in {looked}, and {where} failed "
                            f"({type(e).__name__})") from e
    return model, state_dict_sha256(model), f"hub:{model.pretrained_cfg.get('hf_hub_id') or name}"
