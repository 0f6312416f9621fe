"""Fine-tune strategies, picked by name from a registry: which parameters train after the head epochs,
and at which learning-rate scale (timm's ``lr_scale``, applied by its scheduler).

A strategy is one function ``param_groups(model, settings) -> (optimizer groups, body parameters)``
registered with ``@register_strategy``; ``body`` are the non-classifier parameters that start training
once the head-only epochs are over. ``settings`` is the fine-tune's config (``unfreeze``,
``backbone_lr_scale``, ``layer_decay``, ``weight_decay``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay

from .validation import Rule, unknown

Groups = tuple[list[dict], list[torch.nn.Parameter]]


@dataclass(frozen=True)
class Strategy:
    name: str
    doc: str
    param_groups: Callable[[torch.nn.Module, object], Groups]
    needs_init: bool = False  # starts the classifier from a fit run's linear head (--init)


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(name: str, doc: str, needs_init: bool = False):
    """Register ``param_groups(model, settings)`` under ``name`` (decorator)."""

    def wrap(fn: Callable[[torch.nn.Module, object], Groups]) -> Callable[[torch.nn.Module, object], Groups]:
        _REGISTRY[name] = Strategy(name, doc, fn, needs_init)
        return fn

    return wrap


def list_strategies() -> list[str]:
    return list(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    if name not in _REGISTRY:
        raise unknown("strategy", name, _REGISTRY)
    return _REGISTRY[name]


# ``--unfreeze``: how many top block groups train, or all of them
UNFREEZE = Rule(lambda v: str(v) == "all" or str(v).strip().isdigit(), "a number of top blocks (0 or more) or 'all'")


def parse_unfreeze(unfreeze: str | int) -> int | None:
    """``all`` -> None (every block group), else the number of top block groups to train (a value
    :data:`UNFREEZE` accepts)."""
    return None if str(unfreeze) == "all" else int(unfreeze)


def _top_blocks(model: torch.nn.Module, settings) -> Groups:
    """The classifier at scale 1 and the top ``unfreeze`` coarse block groups (timm's ``group_matcher``;
    all for ``all``) at ``backbone_lr_scale``."""
    top = parse_unfreeze(settings.unfreeze)
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    model.requires_grad_(False)
    named = dict(model.named_parameters())
    blocks = group_parameters(model, model.group_matcher(coarse=True))
    body = [[named[n] for n in names if id(named[n]) not in head_ids] for _, names in sorted(blocks.items())]
    body = [g for g in body if g]
    chosen = [p for g in (body if top is None else body[len(body) - top:] if top else []) for p in g]
    for p in head + chosen:
        p.requires_grad_(True)
    groups = [dict(params=head, lr_scale=1.0)]
    if chosen:
        groups.append(dict(params=chosen, lr_scale=settings.backbone_lr_scale))
    return groups, chosen


register_strategy("lp-ft", "the classifier starts as the best linear probe (--init), trains alone for the head "
                  "epochs, then the top --unfreeze block groups join at lr x --backbone-lr-scale", needs_init=True)(_top_blocks)
register_strategy("freeze-unfreeze", "the same two phases from a fresh classifier")(_top_blocks)


@register_strategy("discriminative", "after the head epochs every block trains, at lr x --layer-decay^depth "
                   "(depth counted from the top; timm's layer-wise decay groups)")
def _discriminative(model: torch.nn.Module, settings) -> Groups:
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    model.requires_grad_(True)
    groups = param_groups_layer_decay(model, weight_decay=settings.weight_decay, layer_decay=settings.layer_decay)
    return groups, [p for p in model.parameters() if id(p) not in head_ids]
