"""Model sources: where a backbone comes from, picked by the name's prefix from a registry.

- ``timm``: a timm model name (``tf_efficientnet_lite0.in1k``), and timm's own ``hf-hub:ORG/NAME`` and
  ``local-dir:FOLDER`` forms;
- ``hf``: ``hf:FOLDER`` or ``hf:ORG/NAME``, a Hugging Face ``transformers`` vision model (its vision
  tower for CLIP and SigLIP) with its ``AutoImageProcessor``'s preprocessing;
- ``module``: ``package.module:function``, a user's own ``torch.nn.Module`` with its data config;
- ``imported``: ``imported:NAME``, embeddings made elsewhere (``pipeline cache import``): no network, so
  building one is an error that says so.

Each returns a :class:`~pipeline.model_sources.base.Backbone`; the feature spec records the source, so
caches and heads from different sources never mix, and the source finds a spec's weights again
(``find_weights``: ``predict``, ``cache verify``). Adding a source is one module with a loader and
``@register_model_source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..validation import unknown
from .base import Backbone

Loader = Callable[[str, "Path | None"], Backbone]
Plan = Callable[[str, "Path | None"], "tuple[str, str, dict] | None"]
FindWeights = Callable[[str, str, Sequence[Path], "str | None"], "Path | None"]


def given_weights(name: str, weights_sha256: str, given: Sequence[Path], recorded: str | None) -> Path | None:
    """The weights of a spec for a source that resolves its own: the first file or folder given, else
    the recorded one where it still is, else None (the source's own resolution). The caller checks the
    loaded weights' hash."""
    local = [*given, *([Path(recorded)] if recorded and Path(recorded).exists() else [])]
    return local[0] if local else None


@dataclass(frozen=True)
class ModelSource:
    name: str
    doc: str
    claims: Callable[[str], bool]  # whether a backbone name is this source's
    load: Loader  # (name, weights file or folder, or None) -> a Backbone on the CPU, in eval mode
    plan: Plan | None = None  # (name, weights) -> (name, weights sha256, data config) without building the model, or None
    # (name, weights sha256, files the user gave, where they were recorded) -> the weights to load, or None
    find_weights: FindWeights = given_weights


_REGISTRY: list[ModelSource] = []


def register_model_source(name: str, doc: str, claims: Callable[[str], bool], plan: Plan | None = None,
                          find_weights: FindWeights = given_weights):
    """Register ``load(name, weights) -> Backbone`` (decorator); sources are asked in registration order.
    ``plan`` tells what a load would record without loading (so a cache can be locked first);
    ``find_weights`` where a recorded spec's weights are now."""

    def wrap(load: Loader) -> Loader:
        _REGISTRY.append(ModelSource(name, doc, claims, load, plan, find_weights))
        return load

    return wrap


def model_source(name: str) -> ModelSource:
    """The source whose names ``name`` looks like."""
    return next(s for s in _REGISTRY if s.claims(name))


def model_source_named(source: str) -> ModelSource:
    """The source registered as ``source`` (a feature spec's ``source``)."""
    found = next((s for s in _REGISTRY if s.name == source), None)
    if found is None:
        raise unknown("model source", source, [s.name for s in _REGISTRY])
    return found


from . import hf, timm, imported, module  # noqa: E402,F401  (registers the built-in sources; module last: it takes any "a:b")
