"""Loading released checkpoints whose parameter names differ from ours by a fixed renaming."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

__all__ = ["unwrap_checkpoint", "load_renamed_state_dict"]


def unwrap_checkpoint(checkpoint: Mapping, wrapper_keys: Sequence[str]) -> Mapping[str, torch.Tensor]:
    """The state dict inside a training checkpoint (mmseg: ``{'state_dict', 'meta'}``, Segmenter:
    ``{'model', 'optimizer', ...}``), or ``checkpoint`` itself when it is already one."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a state dict (a mapping), got {type(checkpoint).__name__}")
    for key in wrapper_keys:
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def load_renamed_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                            official_name: Callable[[str], str], strict: bool = True) -> _IncompatibleKeys:
    """Load ``state_dict`` (official names) into ``model``, whose entry ``k`` is official ``official_name(k)``.

    Returns missing and unexpected keys in the official names, as ``load_state_dict`` does; with
    ``strict`` either kind, or a shape mismatch, raises.
    """
    ours = model.state_dict()
    to_ours: Dict[str, str] = {official_name(k): k for k in ours}
    renamed, unexpected = {}, []
    for key, value in state_dict.items():
        if key not in to_ours:
            unexpected.append(key)
            continue
        expected = ours[to_ours[key]].shape
        if tuple(value.shape) != tuple(expected):
            raise RuntimeError(f"official parameter {key!r} has shape {tuple(value.shape)}, "
                               f"the model built here expects {tuple(expected)} (check the config)")
        renamed[to_ours[key]] = value
    missing = [official_name(k) for k in ours if k not in renamed]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) loading the official state dict into {type(model).__name__}: "
                           f"missing keys {missing}, unexpected keys {unexpected}")
    model.load_state_dict(renamed, strict=False)
    return _IncompatibleKeys(missing, unexpected)
