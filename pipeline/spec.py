"""The feature spec: everything that determines the features an image gets, in one record with one key.

Like timm's ``pretrained_cfg`` travelling with a model, a spec travels with what it configures: it is
written into every cache (attribute ``feature_spec``), copied into the card of every head fitted on that
cache and into the config of every fine-tuned model, and ``extract``, ``predict``, ``cache verify`` and
``finetune``'s evaluation all build their image -> tensor -> feature path from it
(:class:`pipeline.featurizer.Featurizer`) and from nothing else. So a head always sees the features it
was trained on, whether they come from the cache or are computed anew, and two caches whose features
differ can never share a key.

Where the weights file lies is not part of the spec (the same weights may move); its sha256 is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

SPEC_VERSION = 1
# Features computed again through the same spec agree with stored ones to float16 rounding and
# batch-order noise in the forward pass; below this cosine similarity something has changed.
SAME_SPEC_MIN_COSINE = 0.999


DEFAULT_DECODE = "pil"  # the decode path of new caches: the one every cache before decode paths was made with


@dataclass(frozen=True)
class FeatureSpec:
    """What determines a cache's features.

    ``source``: where the backbone comes from (``timm``); ``backbone``: its name there;
    ``weights_sha256``: the weights; ``data_config``: timm's resolved preprocessing (size, crop,
    interpolation, mean, std); ``dtype``: storage dtype; ``amp``: autocast dtype of the forward pass
    (``off``, ``bf16``, ``fp16``); ``tta``: test-time augmentation (``""`` or ``flip``); ``jpeg_draft``:
    JPEGs decoded at reduced DCT scale where the resize allows; ``decode``: the decode path
    (:mod:`pipeline.preprocess`: ``pil``, the only one before there were several, ``turbo``, ``nvjpeg``).
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
        dtype=str(attrs["dtype"]), amp=str(attrs.get("amp", "off")), tta=str(attrs.get("tta") or ""),
    )
