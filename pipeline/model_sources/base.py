"""The one backbone protocol every model source implements: a frozen network, what determines its
features (name, weights hash, timm-style data config) and a forward pass that returns named taps."""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import COMPUTE_DTYPES
from ..errors import PipelineError
from ..validation import unknown

TAPS = ("pooled", "logits", "cls")  # plus layer<i>: intermediate i of the network, pooled
LAYER = re.compile(r"layer(-?\d+)$")


@dataclass
class Backbone:
    """A frozen network and what determines its features. ``source`` is the model source that made it
    (``timm``, ``hf``, ``module``); subclasses give the forward pass (``_forward``) and the taps they have."""

    name: str
    model: torch.nn.Module
    weights_sha256: str
    weights_source: str
    data_config: dict = field(default_factory=dict)
    amp: str = "off"  # autocast dtype of the forward pass: off, bf16 or fp16
    channels_last: bool = False
    source: str = "timm"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        """How many intermediate layers ``layer<i>`` taps can name (0: none)."""
        return 0

    def head_taps(self) -> tuple[str, ...]:
        """The taps besides ``layer<i>`` this backbone has."""
        return ("pooled",)

    def resolve_taps(self, taps: tuple[str, ...]) -> tuple[str, ...]:
        """Check ``taps`` against this model; ``layer-1`` becomes ``layer<n-1>``."""
        out = []
        for tap in taps:
            m = LAYER.match(tap)
            if m:
                i, n = int(m.group(1)), self.n_layers
                if not n:
                    raise PipelineError(f"{self.name} offers no intermediate layers, so no layer taps; use "
                                        f"{' or '.join(self.head_taps())}")
                if not -n <= i < n:
                    raise PipelineError(f"{self.name} has layers 0..{n - 1}; {tap!r} is out of range")
                tap = f"layer{i % n}"
            elif tap not in self.head_taps():
                raise unknown("tap", tap, self.head_taps(),
                              ("or layer<i> " if self.n_layers else "") + f"(the taps of {self.name})")
            out.append(tap)
        return tuple(dict.fromkeys(out))

    def autocast(self, amp: str | None = None) -> torch.autocast:
        """The autocast context of ``amp`` (default: this backbone's setting; disabled for ``off``)."""
        amp = amp or self.amp
        return torch.autocast(self.device.type, dtype=COMPUTE_DTYPES[amp], enabled=amp != "off")

    def forward(self, x: torch.Tensor, taps: tuple[str, ...], tta: str | None = None,
                amp: str | None = None) -> dict[str, torch.Tensor]:
        """Features for each tap, in float32. With ``tta="flip"``, the mean of the image's and its
        mirror's features. ``amp`` overrides the backbone's autocast setting."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast(amp):
            out = self._forward(x, taps)
            if tta == "flip":
                out = {k: (v.float() + w.float()) / 2 for (k, v), w in zip(out.items(), self._forward(x.flip(-1), taps).values())}
        return {k: v.float() for k, v in out.items()}

    def _forward(self, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tap_dims(self, taps: tuple[str, ...]) -> dict[str, int]:
        """Width of each tap, from one forward pass on a blank image of the model's input size."""
        x = torch.zeros((1, *self.data_config["input_size"]), device=self.device)
        with torch.inference_mode():
            return {k: v.shape[1] for k, v in self.forward(x, taps).items()}


def file_sha256(path: Path) -> str:
    st = os.stat(path)
    return _sha256(Path(path).resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Hashed once per process while the file is unchanged (the size and mtime are part of the key)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of a network's parameters and buffers, for weights that do not come from one file."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def plain(data_config: dict) -> dict:
    """A data config with lists for tuples, as JSON (and a feature spec) holds it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
