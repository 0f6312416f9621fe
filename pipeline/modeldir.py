"""A fine-tuned model folder: ``model.safetensors`` (the network's state dict) and ``config.json``
(timm's config with ``label_names``, plus a ``pipeline`` section: the feature spec its predictions go
through, the classes, the task, the base weights and the training settings). timm loads it as
``timm.create_model("local-dir:FOLDER", pretrained=True)``; ``predict`` and ``extract --weights`` use it
like any other backbone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from timm.models._hub import save_config_for_hf

from .errors import PipelineError
from .files import atomic_path

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def write_config(model: torch.nn.Module, folder: str | os.PathLike, classes: list[str], pipeline: dict) -> Path:
    """timm's ``config.json`` for ``model`` with ``label_names`` (the classes or tags; none for a
    regression) and the ``pipeline`` section, which holds them too."""
    path = Path(folder) / CONFIG_FILE
    extra = dict(pipeline={**pipeline, "classes": classes}, **({"label_names": classes} if classes else {}))
    with atomic_path(path) as tmp:
        save_config_for_hf(model, str(tmp), model_config=extra)
    return path


def read_config(folder: str | os.PathLike) -> dict:
    """The ``pipeline`` section of a model folder's ``config.json`` (feature spec, classes, task kind, ...)."""
    file = Path(folder) / CONFIG_FILE
    try:
        return dict(json.loads(file.read_text())["pipeline"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{file} is not a fine-tuned model's config ({type(e).__name__}: {e})") from e
