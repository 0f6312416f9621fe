"""Backbones: a timm model name plus weights, resolved the same way everywhere, in eval mode, with the
preprocessing from its own pretrained config.

Weights resolve in this order: an explicit file, ``$PIPELINE_WEIGHTS_DIR/<name>.safetensors``, then
timm's hub cache or a download. A backbone that cannot get pretrained weights is an error, never a
silent random initialisation.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import os
import re
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import timm
import torch
from safetensors import SafetensorError, safe_open
from timm.data import create_transform, resolve_data_config, resolve_model_data_config

from .errors import PipelineError
from .modeldir import MODEL_FILE

WEIGHTS_DIR_ENV = "PIPELINE_WEIGHTS_DIR"
TAPS = ("pooled", "logits")  # plus layer<i>: intermediate i of timm's forward_intermediates, pooled
_LAYER = re.compile(r"layer(-?\d+)$")
AMP = ("auto", "off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Backbone:
    """A frozen timm model and what determines its features: name, weights hash, data config."""

    name: str
    model: torch.nn.Module
    weights_sha256: str
    weights_source: str
    data_config: dict = field(default_factory=dict)
    amp: str = "off"  # autocast dtype of the forward pass: off, bf16 or fp16
    channels_last: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def transform(self) -> Callable:
        """timm's eval transform for this model's own pretrained config (size, crop, mean, std)."""
        return create_transform(**self.data_config, is_training=False)

    @property
    def decode_size(self) -> int:
        """Smallest side, in pixels, an image needs before the eval transform's resize: JPEGs can be
        decoded at a reduced scale (``Image.draft``) down to this without changing what the model sees."""
        size = max(self.data_config["input_size"][1:])
        return math.floor(size / self.data_config.get("crop_pct", 1.0))

    @property
    def n_layers(self) -> int:
        """How many intermediates ``forward_intermediates`` offers (stages of a CNN, blocks of a ViT)."""
        info = getattr(self.model, "feature_info", None)
        if not hasattr(self.model, "forward_intermediates") or not info:
            return 0
        return len(info)

    def resolve_taps(self, taps: tuple[str, ...]) -> tuple[str, ...]:
        """Check ``taps`` against this model; ``layer-1`` becomes ``layer<n-1>``."""
        out = []
        for tap in taps:
            m = _LAYER.match(tap)
            if m:
                i, n = int(m.group(1)), self.n_layers
                if not n:
                    raise PipelineError(f"{self.name} has no forward_intermediates in timm, so no layer taps; use pooled or logits")
                if not -n <= i < n:
                    raise PipelineError(f"{self.name} has layers 0..{n - 1}; {tap!r} is out of range")
                tap = f"layer{i % n}"
            elif tap == "logits" and self.model.num_classes == 0:
                raise PipelineError(f"{self.name} has no classifier in its weights, so it has no 'logits' tap; use --taps pooled")
            out.append(tap)
        return tuple(dict.fromkeys(out))

    def autocast(self, amp: str | None = None) -> torch.autocast:
        """The autocast context of ``amp`` (default: this backbone's setting; disabled for ``off``)."""
        amp = amp or self.amp
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES.get(amp), enabled=amp != "off")

    def forward(self, x: torch.Tensor, taps: tuple[str, ...], tta: str | None = None,
                amp: str | None = None) -> dict[str, torch.Tensor]:
        """Features for each tap, in float32: ``pooled`` is the pre-logits embedding, ``logits`` the
        classifier's output, ``layer<i>`` intermediate i, global-average pooled (the class token for a ViT).
        With ``tta="flip"``, the mean of the image's and its mirror's features. ``amp`` overrides the
        backbone's autocast setting."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast(amp):
            out = self._forward(x, taps)
            if tta == "flip":
                out = {k: (v.float() + w.float()) / 2 for (k, v), w in zip(out.items(), self._forward(x.flip(-1), taps).values())}
        return {k: v.float() for k, v in out.items()}

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
            elif tap == "logits":
                out[tap] = self.model.get_classifier()(pooled)
            else:
                out[tap] = inter[tap]
        return out

    def tap_dims(self, taps: tuple[str, ...]) -> dict[str, int]:
        """Width of each tap, from one forward pass on a blank image of the model's input size."""
        x = torch.zeros((1, *self.data_config["input_size"]), device=self.device)
        with torch.inference_mode():
            return {k: v.shape[1] for k, v in self.forward(x, taps).items()}


def check_taps(taps: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Check tap names before any model is loaded (``layer<i>`` is checked against the model later)."""
    bad = [t for t in taps if t not in TAPS and not _LAYER.match(t)]
    if bad or not taps:
        raise PipelineError(
            f"unknown tap {bad[0] if bad else '(none)'!r}; choose from {', '.join(TAPS)} or layer<i> "
            "(intermediate i of timm's forward_intermediates; layer-1 is the last)"
        )
    return tuple(dict.fromkeys(taps))


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that supports it, else fp16 on a GPU; on a CPU, bf16 only where the CPU
    computes it natively (AVX512-BF16 or AMX), since emulated bf16 and CPU fp16 are slower than float32."""
    if amp not in AMP:
        raise PipelineError(f"unknown --amp {amp!r}; choose {', '.join(AMP)}")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    native = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
              or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return "bf16" if native else "off"


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PipelineError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def load_backbone(name: str, weights: str | os.PathLike | None = None, device: str = "cpu", amp: str = "off",
                  channels_last: bool = False) -> Backbone:
    """Create ``name`` with pretrained weights, frozen and in eval mode, on ``device``; ``amp`` (see
    ``resolve_amp``) and ``channels_last`` set how its forward pass runs."""
    _check_model_name(name)
    file = resolve_weights_file(name, weights)
    if file is not None:
        model = _from_file(name, file)
        sha, source = file_sha256(file), str(file.resolve())
    else:
        model = _from_hub(name, weights_looked_in=weights_dir_candidates(name))
        sha, source = _state_dict_sha256(model), f"hub:{model.pretrained_cfg.get('hf_hub_id') or name}"
    dev = resolve_device(device)
    model.eval().requires_grad_(False).to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return Backbone(name, model, sha, source, _as_lists(resolve_model_data_config(model)), resolve_amp(amp, dev), channels_last)


def pretrained_data_config(name: str) -> dict | None:
    """The preprocessing ``load_backbone`` will record for ``name``, from timm's pretrained config alone,
    without building the model; None for a name timm has no pretrained config of."""
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    return None if cfg is None else _as_lists(resolve_data_config(pretrained_cfg=cfg.to_dict()))


def _as_lists(data_config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def resolve_weights_file(name: str, weights: str | os.PathLike | None = None) -> Path | None:
    """The local weights file for ``name``: ``weights`` if given, else one in ``$PIPELINE_WEIGHTS_DIR``."""
    if weights is not None:
        path = Path(weights)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise PipelineError(f"weights file not found: {path}")
        return path
    return next((p for p in weights_dir_candidates(name) if p.is_file()), None)


def file_sha256(path: Path) -> str:
    st = os.stat(path)
    return _sha256(Path(path).resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Hashed once per process while the file is unchanged (the size and mtime are part of the key)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=True), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise PipelineError(f"unknown backbone {name!r}{hint}")


def _full_name(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    arch, tag = timm.models.split_model_name_tag(name)
    return f"{arch}.{cfg.tag}" if cfg is not None and not tag and cfg.tag else name


def weights_dir_candidates(name: str) -> list[Path]:
    """Where ``$PIPELINE_WEIGHTS_DIR`` would hold ``name``'s weights (with and without its default tag)."""
    directory = os.environ.get(WEIGHTS_DIR_ENV)
    if not directory:
        return []
    return [Path(directory) / f"{n}.safetensors" for n in dict.fromkeys([name, _full_name(name)])]


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
        model = timm.create_model(
            name, pretrained=True, num_classes=num_classes,
            pretrained_cfg_overlay=dict(file=str(file), num_classes=num_classes),
        )
    except (RuntimeError, KeyError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"weights file {file} does not fit backbone {name!r}: {first}") from e
    return model


def _from_hub(name: str, weights_looked_in: list[Path]) -> torch.nn.Module:
    cfg = timm.models.get_pretrained_cfg(name)
    looked = (
        f"--weights (not given), {WEIGHTS_DIR_ENV} "
        + (f"({', '.join(map(str, weights_looked_in))}: not found)" if weights_looked_in else "(not set)")
    )
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise PipelineError(f"no pretrained weights for {name!r}: looked in {looked}; timm has none to download")
    online = _hub_reachable()
    try:
        with nullcontext() if online else _hub_offline():
            return timm.create_model(name, pretrained=True)
    except Exception as e:  # network, cache and hub errors all mean the same thing here
        where = "timm's hub cache/download" if online else "timm's hub cache (the hub is unreachable: offline)"
        raise PipelineError(
            f"no pretrained weights for {name!r}: looked in {looked}, and {where} failed ({type(e).__name__})"
        ) from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection: offline, a download would retry for about a
    minute before failing, so it is not tried at all (the local hub cache still is)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode (what ``HF_HUB_OFFLINE=1`` sets) for the calls inside: files come
    from its local cache or fail at once."""
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _state_dict_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
