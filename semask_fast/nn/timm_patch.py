"""Swap timm Swin attention modules for semask_fast ones, in place."""

from __future__ import annotations

import math

from torch import nn

from .window_attention import WindowAttention

__all__ = ["patch_timm"]


def _is_timm_window_attention(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ == "WindowAttention" and cls.__module__ == "timm.models.swin_transformer"


def _from_timm(m: nn.Module, backend: str) -> WindowAttention:
    head_dim = m.qkv.out_features // (3 * m.num_heads)
    w = m.relative_position_bias_table
    new = WindowAttention(m.dim, m.num_heads, head_dim=head_dim, window_size=m.window_size,
                          qkv_bias=m.qkv.bias is not None, attn_drop=m.attn_drop.p, proj_drop=m.proj_drop.p,
                          device=w.device, dtype=w.dtype, backend=backend)
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    if not math.isclose(new.scale, m.scale):
        raise ValueError(f"cannot patch {m}: scale {m.scale} differs from head_dim ** -0.5")
    return new


def patch_timm(model: nn.Module, backend: str = "auto") -> int:
    """Replace every timm Swin ``WindowAttention`` in ``model`` by ours, in place.

    Weights, device, dtype and train/eval mode are kept; returns how many modules
    were replaced.  The patched model computes the same outputs.
    """
    targets = [(name, m) for name, m in model.named_modules() if name and _is_timm_window_attention(m)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _from_timm(m, backend))
    return len(targets)
