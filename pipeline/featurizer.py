"""The one path from an image file to its features, built from a :class:`FeatureSpec`.

the spec's decode path (:mod:`pipeline.preprocess`: decoder, JPEG draft, the eval transform's resize and
crop, uint8 pixels in batches) -> on the device, conversion and normalisation, then the forward pass with
the spec's autocast and test-time augmentation -> rounded to the spec's storage dtype. ``extract``
creates a featurizer and writes its spec into the cache; ``predict``, ``cache verify`` and
``finetune``'s evaluation load one from a stored spec, so they compute what the cache holds.

With ``compile``, normalisation and the forward pass are one ``torch.compile``d step for a fixed batch
shape (the first batch's; a shorter last batch is padded), so a long run pays for one compilation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .backbones import Backbone, load_backbone
from .devices import resolve_amp, resolve_device
from .model_sources import model_source, model_source_named
from .batches import image_batches
from .cache import FeatureCache
from .data import Sample
from .errors import PipelineError
from .preprocess import Normalize, decode_path
from .progress import progress_bar
from .spec import DECODE_NEW, SPEC_INPUTS, FeatureSpec, spec_rules
from .validation import validate_params
from .workers import Workers

Batch = tuple[list[int], dict[str, np.ndarray], list[tuple[int, str]]]


class Featurizer:
    """A loaded backbone, the spec it computes, and that spec's decode path."""

    def __init__(self, spec: FeatureSpec, backbone: Backbone, compile: bool = False):
        self.spec = spec
        self.backbone = backbone
        self.decoder = decode_path(spec.decode, spec.data_config, spec.jpeg_draft)
        self.decoder.check_device(backbone.device)
        self.normalize = Normalize(spec.data_config, backbone.device, backbone.channels_last)
        self.compile = compile
        self._step = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self._rows = 0  # a compiled step's batch size: the first batch's

    @classmethod
    @validate_params(spec_rules())
    def create(cls, name: str, weights: str | os.PathLike | None = None, device: str = "auto",
               amp: str = SPEC_INPUTS["amp"].default, channels_last: bool = True,
               dtype: str = SPEC_INPUTS["dtype"].default, tta: str | None = SPEC_INPUTS["tta"].default,
               jpeg_draft: bool = SPEC_INPUTS["jpeg_draft"].default,
               decode: str | None = SPEC_INPUTS["decode"].default, compile: bool = False) -> "Featurizer":
        """Load ``name`` (weights resolved as ``load_backbone`` does) and state what it will compute
        (``decode`` None: the default decode path of new caches)."""
        bb = load_backbone(name, weights, device, amp, channels_last)
        spec = _spec(bb.name, bb.source, bb.weights_sha256, bb.data_config, bb.amp, dtype, tta, jpeg_draft, decode)
        return cls(spec, bb, compile)

    @classmethod
    def load(cls, spec: FeatureSpec, weights: Sequence[str | os.PathLike] = (), recorded: str | None = None,
             device: str = "auto", channels_last: bool = True) -> "Featurizer":
        """The backbone ``spec`` names with weights whose sha256 is the spec's, found among ``weights``
        (files the user gave) and ``recorded`` (where they were when the spec was made) by the spec's
        model source (timm: then ``$PIPELINE_WEIGHTS_DIR``, then the hub, only for weights from it)."""
        source = model_source_named(spec.source)
        file = source.find_weights(spec.backbone, spec.weights_sha256, [Path(w) for w in weights], recorded)
        bb = load_backbone(spec.backbone, file, device, spec.amp, channels_last)
        if bb.source != spec.source:
            raise PipelineError(f"{spec.backbone} now loads from model source {bb.source!r}, not {spec.source!r} as recorded")
        if bb.weights_sha256 != spec.weights_sha256:
            raise PipelineError(f"{spec.backbone}: the weights found ({bb.weights_source}) have sha256 "
                                f"{bb.weights_sha256[:12]}, not {spec.weights_sha256[:12]}; pass --weights FILE")
        if bb.data_config != spec.data_config:
            raise PipelineError(f"{spec.backbone}: timm now preprocesses with {bb.data_config}, not "
                                f"{spec.data_config} as recorded; its features would differ")
        return cls(spec, bb)

    def with_spec(self, spec: FeatureSpec) -> "Featurizer":
        """The same loaded backbone computing ``spec`` (one that differs from this one's in how it
        decodes or stores, not in the backbone's weights or preprocessing)."""
        return self if spec == self.spec else Featurizer(spec, self.backbone, self.compile)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def device_batches(self, samples: Sequence[Sample], batch_size: int, workers: int | Workers, progress: bool = False,
                       label: str = "") -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
        """Batches of decoded images as uint8 pixels (N, 3, H, W) on the backbone's device (None where all
        failed), with the indices into ``samples`` they hold and [(index, error)] for the others."""
        dev = self.device
        # On a CPU the forward pass needs every core: the workers decode a batch only while it waits.
        loader = image_batches(samples, self.decoder.load, batch_size, workers, pin_memory=dev.type == "cuda",
                               collate=self.decoder.collate, lockstep=dev.type == "cpu")
        with progress_bar(progress) as bar:
            task = bar.add_task(label, total=len(samples))
            for idx, batch, failed in loader:
                x = None
                if batch is not None:
                    x, lost = self.decoder.to_device(batch, dev)
                    gone = {pos for pos, _ in lost}
                    failed = failed + [(idx[pos], err) for pos, err in lost]
                    idx = [i for pos, i in enumerate(idx) if pos not in gone]
                yield idx, x if idx else None, failed
                bar.advance(task, len(idx) + len(failed))

    def features(self, x: torch.Tensor, taps: Sequence[str]) -> dict[str, np.ndarray]:
        """Float32 features per tap of a uint8 image batch, as the cache would store them (rounded to its dtype)."""
        n = len(x)
        if self.compile:
            self._rows = self._rows or n
            if n < self._rows:  # the fixed shape: pad, and drop the padding's features
                x = torch.cat([x, x.new_zeros((self._rows - n, *x.shape[1:]))])
        with torch.inference_mode():
            out = self._step(x, tuple(taps))
        return {k: v[:n].cpu().numpy().astype(self.spec.dtype).astype(np.float32) for k, v in out.items()}

    def _forward(self, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return self.backbone.forward(self.normalize(x), taps, self.spec.tta or None, self.spec.amp)

    def batches(self, samples: Sequence[Sample], taps: Sequence[str], batch_size: int, workers: int | Workers,
                progress: bool = False, label: str = "") -> Iterator[Batch]:
        """Per batch: (indices into ``samples``, features per tap, [(index, error)])."""
        for idx, x, failed in self.device_batches(samples, batch_size, workers, progress, label):
            yield idx, {} if x is None else self.features(x, taps), failed


@validate_params(spec_rules())
def planned_spec(name: str, weights: str | os.PathLike | None = None, device: str = "auto",
                 amp: str = SPEC_INPUTS["amp"].default, dtype: str = SPEC_INPUTS["dtype"].default,
                 tta: str | None = SPEC_INPUTS["tta"].default, jpeg_draft: bool = SPEC_INPUTS["jpeg_draft"].default,
                 decode: str | None = SPEC_INPUTS["decode"].default) -> FeatureSpec | None:
    """The spec ``Featurizer.create`` with these arguments will state, known without building the model
    (the model source's plan: for timm, the weights file's sha256 and its pretrained config). So a writer
    can take its cache's lock before any slow work, and a study's dry run can name a cache. None when the
    source cannot tell without loading (weights from the hub are hashed once loaded; a user's module must
    be built)."""
    source = model_source(name)
    plan = source.plan(name, None if weights is None else weights) if source.plan else None
    if plan is None:
        return None
    backbone, sha, data_config = plan
    return _spec(backbone, source.name, sha, data_config, resolve_amp(amp, resolve_device(device)), dtype, tta,
                 jpeg_draft, decode)


def _spec(backbone: str, source: str, weights_sha256: str, data_config: dict, amp: str, dtype: str, tta: str | None,
          jpeg_draft: bool, decode: str | None) -> FeatureSpec:
    return FeatureSpec(backbone=backbone, weights_sha256=weights_sha256, data_config=data_config, dtype=dtype, amp=amp,
                       tta=tta or "", jpeg_draft=jpeg_draft, decode=decode or DECODE_NEW, source=source)


@dataclass
class Part:
    """Features a model needs: a spec and tap, where the weights were, and caches that may hold them."""

    spec: FeatureSpec
    tap: str
    weights_source: str = ""
    caches: list[Path] = field(default_factory=list)


def part_features(part: Part, samples: list[Sample], featurizer: Callable[[], Featurizer], batch_size: int,
                  workers: int, progress: bool, from_cache: bool = True) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Features of ``part`` for each sample (by index), from a cache with the same spec where it holds the
    same bytes (unless not ``from_cache``), else computed through ``featurizer()`` (called only then: a
    loaded model, or one loaded now); and the reason for each sample that could not be read. ``predict``,
    ``serve`` and ``neighbors`` get the features of new images this way."""
    feats = cached_features(part, samples) if from_cache else {}
    errors: dict[int, str] = {}
    todo = [i for i in range(len(samples)) if i not in feats]
    if todo:
        fz = featurizer()
        for idx, by_tap, failed in fz.batches([samples[i] for i in todo], (part.tap,), batch_size, workers, progress,
                                              f"features {part.spec.backbone}"):
            errors.update({todo[i]: err for i, err in failed})
            feats.update({todo[i]: f for i, f in zip(idx, by_tap.get(part.tap, ()))})
    return feats, errors


def cached_features(part: Part, samples: list[Sample]) -> dict[int, np.ndarray]:
    """Features of images whose bytes are in a cache made with the part's spec, by content hash."""
    cache_file = next((c for c in part.caches if c.is_file()), None)
    if cache_file is None:
        return {}
    with FeatureCache(cache_file) as cache:
        if cache.spec != part.spec or part.tap not in cache.taps:
            return {}
        hits = cache.rows_of_files([s.path for s in samples])
        if not hits:
            return {}
        rows = cache.features(part.tap, np.array(list(hits.values())))
    return dict(zip(hits, rows))
