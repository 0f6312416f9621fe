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
    "audit": ("AuditConfig", "AuditResult", "audit"),
    "backbones": ("TAPS", "Backbone", "load_backbone"),
    "cache": ("FeatureCache", "find_caches"),
    "data": ("Sample", "load_image"),
    "errors": ("PipelineError",),
    "extract": ("ExtractResult", "extract"),
    "featurizer": ("Featurizer",),
    "finetune": ("FinetuneConfig", "FinetuneResult", "finetune"),
    "fit": ("FitConfig", "FitResult", "fit"),
    "heads": ("create_head", "list_heads", "load_head", "register_head", "save_head"),
    "kinds": ("TaskKind", "register_kind"),
    "neighbors": ("neighbors",),
    "predict": ("predict",),
    "protocol": ("Protocol",),
    "runs": ("Row", "RunFolder", "best_row"),
    "sources": ("ImageSource", "load_source", "register_source"),
    "spec": ("FeatureSpec",),
    "strategies": ("register_strategy",),
    "study": ("run",),
    "tasks": ("Task", "TaskData", "load_task", "read_labels"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

if TYPE_CHECKING:
    from .audit import AuditConfig, AuditResult, audit
    from .backbones import TAPS, Backbone, load_backbone
    from .cache import FeatureCache, find_caches
    from .data import Sample, load_image
    from .errors import PipelineError
    from .extract import ExtractResult, extract
    from .featurizer import Featurizer
    from .finetune import FinetuneConfig, FinetuneResult, finetune
    from .fit import FitConfig, FitResult, fit
    from .heads import create_head, list_heads, load_head, register_head, save_head
    from .kinds import TaskKind, register_kind
    from .neighbors import neighbors
    from .predict import predict
    from .protocol import Protocol
    from .runs import Row, RunFolder, best_row
    from .sources import ImageSource, load_source, register_source
    from .spec import FeatureSpec
    from .strategies import register_strategy
    from .study import run
    from .tasks import Task, TaskData, load_task, read_labels


def __getattr__(name: str):
    # Exports load on first use, so a process that imports only `pipeline.fit` (a joblib worker fitting
    # heads) never pays for torch and timm. All modules load together and then every export is bound,
    # because importing a submodule sets the package attribute of its name (`pipeline.extract` the
    # module) over the function of the same name.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    modules = {mod: import_module(f".{mod}", __name__) for mod in _EXPORTS}
    for mod, names in _EXPORTS.items():
        for export in names:
            globals()[export] = getattr(modules[mod], export)
    return globals()[name]
