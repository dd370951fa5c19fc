"""Models by name: ``create(name, ...)`` and ``list_models()``.

Each model family module registers its constructors with :func:`register_model`;
the registry imports those modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

#: Modules whose import registers models.
MODEL_MODULES = ("semask_fast.models.semask_swin", "semask_fast.models.segvit", "semask_fast.models.segmenter")

_MODELS: Dict[str, Callable[..., nn.Module]] = {}
_loaded = False


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``fn(num_classes=..., backend=..., **cfg) -> nn.Module`` becomes ``create(name)``."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn
    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in MODEL_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                # A family not written yet registers nothing; a missing dependency inside one is an error.
                if e.name != module:
                    raise
        _loaded = True


def list_models() -> List[str]:
    """Names accepted by :func:`create`, sorted."""
    _load()
    return sorted(_MODELS)


def create(name: str, num_classes: int = 150, backend: str = "auto", checkpoint: Optional[str] = None,
           **cfg) -> nn.Module:
    """Build model ``name``; ``checkpoint`` is a file in the official layout, loaded strictly."""
    _load()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(_MODELS)) or 'none'})")
    model = _MODELS[name](num_classes=num_classes, backend=backend, **cfg)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_official_state_dict(state, strict=True)
    return model


__all__ = ["register_model", "list_models", "create"]
