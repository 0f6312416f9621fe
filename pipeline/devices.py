"""Where torch work runs and at what precision: the one owner of ``device`` and ``amp`` choices, for the
backbones' forward passes and for the heads fitted in torch."""

from __future__ import annotations

import torch

from .errors import PipelineError
from .spec import AMP, spec_rules  # noqa: F401  (AMP: the autocast requests, for the heads' settings)
from .validation import unknown, validate_params

# The dtype each resolved ``amp`` computes its large products in.
COMPUTE_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@validate_params(spec_rules("amp"))
def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that supports it, else fp16 on a GPU; on a CPU, bf16 only where the CPU
    computes it natively (AVX512-BF16 or AMX), since emulated bf16 and CPU fp16 are slower than float32."""
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
        raise unknown("device", device, ("auto", "cpu", "cuda", "cuda:<i>"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)
