"""The head card: the JSON beside a saved head (``<head>.json`` next to ``<head>.skops``) that says what the
head needs to be used again. Like timm's ``pretrained_cfg`` it travels with what it configures: the task,
its classes or tags, the tap, and per backbone (in the order of the head's features) the feature spec,
where the weights were read from and the cache it was fitted on. Written by ``fit``, read by ``predict``
and by ``finetune``'s lp-ft start; nothing else parses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import PipelineError
from ..files import atomic_path
from ..spec import FeatureSpec


@dataclass
class CardPart:
    """One backbone's share of a head's features: its spec, where its weights were read, its cache (relative
    to the card's folder, and absolute as it was when the head was saved)."""

    spec: FeatureSpec
    weights_source: str
    cache: str
    cache_abs: str

    def caches(self, folder: Path) -> list[Path]:
        """Where the cache may be now: beside a moved run folder first, then where it was."""
        return [folder / self.cache, Path(self.cache_abs)]


@dataclass
class HeadCard:
    head: str
    task: str
    task_kind: str
    tap: str
    classes: list[str]
    backbone: str
    eval: str
    protocol: str
    parts: list[CardPart] = field(default_factory=list)

    @staticmethod
    def path_of(head_path: str | os.PathLike) -> Path:
        return Path(head_path).with_suffix(".json")

    @staticmethod
    def part(spec: FeatureSpec, weights_source: str, cache: Path, head_path: Path) -> CardPart:
        """A part for ``cache``, its relative path taken from the head's folder."""
        rel = Path(os.path.relpath(cache.resolve(), Path(head_path).parent.resolve())).as_posix()
        return CardPart(spec, weights_source, rel, str(cache.resolve()))

    def write(self, head_path: str | os.PathLike) -> Path:
        d = asdict(self)
        d["parts"] = [{**asdict(p), "spec": p.spec.to_dict()} for p in self.parts]
        path = self.path_of(head_path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(d, indent=1))
        return path

    @classmethod
    def read(cls, head_path: str | os.PathLike) -> "HeadCard":
        path = cls.path_of(head_path)
        if not path.is_file():
            raise PipelineError(f"{head_path} has no {path.name} beside it naming its feature specs")
        d = json.loads(path.read_text())
        parts = [CardPart(FeatureSpec.from_dict(p["spec"]), p.get("weights_source", ""), p["cache"], p["cache_abs"])
                 for p in d.pop("parts")]
        return cls(d["head"], d["task"], d.get("task_kind", "classification"), d["tap"], d["classes"],
                   d.get("backbone", ""), d.get("eval", ""), d.get("protocol", ""), parts)
