"""The feature spec: everything that determines the features an image gets, in one record with one key.

Like timm's ``pretrained_cfg`` travelling with a model, a spec travels with what it configures: it is
written into every cache (attribute ``feature_spec``), copied into the card of every head fitted on that
cache and into the config of every fine-tuned model, and ``extract``, ``predict``, ``cache verify`` and
``finetune``'s evaluation all build their image -> tensor -> feature path from it
(:class:`pipeline.featurizer.Featurizer`) and from nothing else. So a head always sees the features it
was trained on, whether they come from the cache or are computed anew, and two caches whose features
differ can never share a key.

Where the weights file lies is not part of the spec (the same weights may move); its sha256 is.

What a caller may ask of a spec (storage dtype, autocast, TTA, JPEG draft, decode path), with its
default and allowed values, is one table, :data:`SPEC_INPUTS`; :func:`spec_rules` gives its rules to each
route's table (:func:`pipeline.validation.validate_params`), so every route words a bad input alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from .validation import Rule, optional, registered

SPEC_VERSION = 1
# Features computed again through the same spec agree with stored ones to float16 rounding and
# batch-order noise in the forward pass; below this cosine similarity something has changed.
SAME_SPEC_MIN_COSINE = 0.999


AMP = ("auto", "off", "bf16", "fp16")  # autocast requests; pipeline.devices.resolve_amp resolves auto

# The decode path of a cache made without one asked for: the fastest path whose features stay within the
# fidelity figures of docs/benchmarks.md. Caches made before it was the default were decoded the earlier
# way without asking; pipeline.cache.spec_to_write lets such a cache keep it, so an upgrade recomputes none.
DECODE_NEW, DECODE_BEFORE = "turbo", "pil"


def _decoders() -> tuple[str, ...]:
    from .preprocess import list_decoders  # the registry needs torch: asked only when a value is checked

    return tuple(list_decoders())


@dataclass(frozen=True)
class SpecInput:
    """One input of the feature spec as a caller asks for it: its default for new work and the values it
    may take (a callable: a registry's names, asked when a value is checked)."""

    default: Any
    choices: tuple | Callable[[], tuple]

    def allowed(self) -> tuple:
        return self.choices() if callable(self.choices) else self.choices

    def rule(self) -> Rule:
        """The :mod:`pipeline.validation` rule of its values (None passes where None is the default)."""
        rule = registered(self.allowed)
        return optional(rule) if self.default is None else rule


# The one table of the spec's inputs: the defaults of the CLI, the Python API (extract, Featurizer.create,
# planned_spec), the study file and finetune's --amp, and the values each may take. Not the defaults of
# FeatureSpec's fields: those are what a spec written before a field existed is read with.
SPEC_INPUTS: dict[str, SpecInput] = {
    "dtype": SpecInput("float16", ("float16", "float32")),
    "amp": SpecInput("auto", AMP),
    "tta": SpecInput(None, ("flip",)),
    "jpeg_draft": SpecInput(True, (True, False)),
    "decode": SpecInput(None, _decoders),  # None: DECODE_NEW, or an existing cache's DECODE_BEFORE
}


def spec_rules(*names: str) -> dict[str, Rule]:
    """The rules of the inputs ``names`` (default: all), for a route's table: ``--amp must be one of auto,
    off, bf16, fp16, got 'x'``, the one message every route gives."""
    return {name: SPEC_INPUTS[name].rule() for name in names or SPEC_INPUTS}


@dataclass(frozen=True)
class FeatureSpec:
    """What determines a cache's features.

    ``source``: where the backbone comes from (``timm``); ``backbone``: its name there;
    ``weights_sha256``: the weights; ``data_config``: timm's resolved preprocessing (size, crop,
    interpolation, mean, std); ``dtype``: storage dtype; ``amp``: autocast dtype of the forward pass
    (``off``, ``bf16``, ``fp16``: resolved, never ``auto``); ``tta``: test-time augmentation (``""`` or
    ``flip``); ``jpeg_draft``: JPEGs decoded at reduced DCT scale where the resize allows; ``decode``: the
    decode path (:mod:`pipeline.preprocess`: ``pil``, the only one before there were several, ``turbo``,
    ``nvjpeg``).

    The fields' defaults are what a spec written before the field existed holds (autocast off, no TTA,
    draft on, Pillow, timm): they are part of old caches' keys, so they never change. New work takes its
    defaults from :data:`SPEC_INPUTS`.
    """

    backbone: str
    weights_sha256: str
    data_config: dict = field(default_factory=dict)
    dtype: str = "float16"
    amp: str = "off"
    tta: str = ""
    jpeg_draft: bool = True
    decode: str = "pil"
    source: str = "timm"

    @property
    def key(self) -> str:
        """Short hash of the whole spec: caches, heads and models with the same key have the same features."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:10]

    @property
    def decode_key(self) -> str:
        """What decides the image tensor (not the forward pass): backbones that share it share one decode."""
        return json.dumps([self.data_config, self.jpeg_draft, self.decode], sort_keys=True)

    def to_dict(self) -> dict:
        return {"version": SPEC_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        fields = {k: v for k, v in d.items() if k != "version"}
        return cls(**{**fields, "tta": fields.get("tta") or ""})

    def with_weights(self, weights_sha256: str) -> "FeatureSpec":
        """The same path through other weights (a fine-tuned checkpoint of this backbone)."""
        return replace(self, weights_sha256=weights_sha256)

    def describe(self) -> str:
        """One line for people: what differs between two specs is easy to see."""
        dc = self.data_config
        return (f"{self.source}:{self.backbone} weights {self.weights_sha256[:12]}, {dc.get('input_size')} "
                f"{dc.get('interpolation')} crop {dc.get('crop_pct')}, {self.dtype}, autocast {self.amp}, "
                f"tta {self.tta or 'none'}, jpeg draft {'on' if self.jpeg_draft else 'off'}, decode {self.decode}")


def spec_from_attrs(attrs: dict) -> FeatureSpec:
    """The spec of a cache from its attributes; caches written before the spec existed are read from the
    attributes that then held the same facts (their JPEGs were decoded with draft, by Pillow)."""
    if "feature_spec" in attrs:
        return FeatureSpec.from_dict(json.loads(attrs["feature_spec"]))
    data_config = attrs["data_config"]
    return FeatureSpec(
        backbone=str(attrs["backbone"]), weights_sha256=str(attrs["weights_sha256"]),
        data_config=json.loads(data_config) if isinstance(data_config, str) else data_config,
        dtype=str(attrs["dtype"]), amp=str(attrs.get("amp", FeatureSpec.amp)), tta=str(attrs.get("tta") or ""),
    )
