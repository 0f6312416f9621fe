"""Embeddings imported with ``pipeline cache import``: ``imported:NAME``, a backbone that is not here.

An imported cache's feature spec names this source, so whatever would build its backbone to compute
features of new images (``predict``, ``neighbors``, ``serve``, ``export``, ``cache verify``) ends here
and says plainly that there is none to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import PipelineError
from ..stages.cache_import import PREFIX, SOURCE
from . import register_model_source
from .base import Backbone

def recorded_input(name: str, weights_sha256: str, given: Sequence[Path], recorded: str | None) -> Path | None:
    """Where the embeddings were imported from (the cache records it as its weights source), so that the
    refusal in :func:`load` can name it."""
    return Path(recorded) if recorded else None


@register_model_source(SOURCE, "imported:NAME, embeddings made elsewhere (pipeline cache import): no network",
                       claims=lambda name: name.startswith(PREFIX), find_weights=recorded_input)
def load(name: str, weights: Path | None) -> Backbone:
    where = f" from {weights}" if weights is not None else ""
    raise PipelineError(
        f"{name}: embeddings imported{where}: no backbone to run on new images; for images in the cache, predict "
        "in Python (pipeline.load_head, then its predict on FeatureCache.features of their rows); for new images, "
        "compute their embeddings elsewhere and import them (pipeline cache import)"
    )
