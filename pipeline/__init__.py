"""Transfer learning on a feature cache: extract frozen-backbone features once into HDF5, compare cheap
heads on the cache, fine-tune where it pays, predict on new images.

Every stage is a plain function with the same parameters as its CLI command::

    from pipeline import extract, fit, finetune, predict
    extract("data/hymenoptera", "tf_efficientnet_lite0.in1k", "cache")
    result = fit("cache", "runs/probe")
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "backbones": ("TAPS", "Backbone", "load_backbone"),
    "cache": ("FeatureCache", "find_caches"),
    "data": ("Sample", "load_image"),
    "errors": ("PipelineError",),
    "evaluation": ("HeadCard", "Protocol", "Row", "RunFolder", "best_row", "open_task"),
    "featurizer": ("Featurizer",),
    "heads": ("create_head", "list_heads", "register_head", "save_head"),
    "kinds": ("TaskKind", "register_kind"),
    "sources": ("ImageSource", "load_source", "register_source"),
    "spec": ("FeatureSpec",),
    "stages.audit": ("AuditConfig", "AuditResult", "audit"),
    "stages.cache_import": ("ImportResult", "import_embeddings"),
    "stages.cache_merge": ("MergeResult", "merge_caches"),
    "stages.export": ("ExportResult", "export_model"),
    "stages.extract": ("ExtractResult", "extract"),
    "stages.finetune": ("FinetuneConfig", "FinetuneResult", "finetune"),
    "stages.fit": ("FitConfig", "FitResult", "fit"),
    "stages.neighbors": ("neighbors",),
    "stages.predict": ("LoadedModel", "load_head", "predict"),
    "stages.serve": ("create_app", "serve"),
    "stages.study": ("run",),
    "strategies": ("register_strategy",),
    "tasks": ("Task", "TaskData", "load_task", "read_labels"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

if TYPE_CHECKING:
    from .backbones import TAPS, Backbone, load_backbone
    from .cache import FeatureCache, find_caches
    from .data import Sample, load_image
    from .errors import PipelineError
    from .evaluation import HeadCard, Protocol, Row, RunFolder, best_row, open_task
    from .featurizer import Featurizer
    from .heads import create_head, list_heads, register_head, save_head
    from .kinds import TaskKind, register_kind
    from .sources import ImageSource, load_source, register_source
    from .spec import FeatureSpec
    from .stages.audit import AuditConfig, AuditResult, audit
    from .stages.cache_import import ImportResult, import_embeddings
    from .stages.cache_merge import MergeResult, merge_caches
    from .stages.export import ExportResult, export_model
    from .stages.extract import ExtractResult, extract
    from .stages.finetune import FinetuneConfig, FinetuneResult, finetune
    from .stages.fit import FitConfig, FitResult, fit
    from .stages.neighbors import neighbors
    from .stages.predict import LoadedModel, load_head, predict
    from .stages.serve import create_app, serve
    from .stages.study import run
    from .strategies import register_strategy
    from .tasks import Task, TaskData, load_task, read_labels


_HOME = {name: mod for mod, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    # Exports load on first use, each from its own module, so a process that imports only
    # `pipeline.stages.fit` (a joblib worker fitting heads) never pays for torch and timm. The stages live
    # in `pipeline.stages`, so no module of this package shares a name with an export: importing a
    # submodule binds the package attribute of its name, and would otherwise hide the function.
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = getattr(import_module(f".{_HOME[name]}", __name__), name)
    return globals()[name]
