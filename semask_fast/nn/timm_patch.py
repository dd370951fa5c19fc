"""Swap timm Swin attention modules for semask_fast ones, in place."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backends.registry import BACKENDS
from .swin_families import BoundPatch, adopt_buffer
from .window_attention import WindowAttention

__all__ = ["patch_timm"]


def check_patch_arguments(model: nn.Module, backend: str, zero_copy: bool) -> None:
    """The arguments of :func:`semask_fast.patch` and :func:`patch_timm`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend (expected 'auto' or one of {BACKENDS})")
    if not isinstance(zero_copy, bool):
        raise TypeError(f"zero_copy must be a bool, got {zero_copy!r}")


def _is_timm_window_attention(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ == "WindowAttention" and cls.__module__ == "timm.models.swin_transformer"


def _from_timm(m: nn.Module, backend: str) -> WindowAttention:
    head_dim = m.qkv.out_features // (3 * m.num_heads)
    # Built on meta, then given m's own modules and tensors (no copy): an optimizer built before
    # patching, frozen parameters and hooks stay valid.
    new = WindowAttention(m.dim, m.num_heads, head_dim=head_dim, window_size=m.window_size,
                          qkv_bias=m.qkv.bias is not None, device="meta", backend=backend)
    new.qkv, new.proj, new.attn_drop, new.proj_drop = m.qkv, m.proj, m.attn_drop, m.proj_drop
    new.relative_position_bias_table = m.relative_position_bias_table
    adopt_buffer(new, "relative_position_index", m)
    new.train(m.training)
    if not math.isclose(new.scale, m.scale):
        raise ValueError(f"cannot patch {m}: scale {m.scale} differs from head_dim ** -0.5")
    return new


def _is_timm_swin_block(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ == "SwinTransformerBlock" and cls.__module__ == "timm.models.swin_transformer"


def _zero_copy_attn(self, x: torch.Tensor) -> torch.Tensor:
    # timm rolls, then pads (SPEC.md section 1); its mask is the official one computed on the
    # padded grid, which the zero-copy op computes from the geometry.
    return self.attn.forward_image(x, self.shift_size, pad_then_roll=False)


def patch_timm(model: nn.Module, backend: str = "auto", zero_copy: bool = False) -> int:
    """Replace every timm Swin ``WindowAttention`` in ``model`` by ours, in place.

    The replacement holds the original's own modules, parameters and buffers (an optimizer
    built before patching stays valid), and its train/eval mode; returns how many modules
    were replaced.  The patched model computes the same outputs.

    With ``zero_copy=True`` each timm ``SwinTransformerBlock`` (whose geometry is
    known) also gets its ``_attn`` (roll, pad, partition, attention, merge, crop,
    un-roll) replaced by :meth:`WindowAttention.forward_image`, the zero-copy
    :func:`semask_fast.shifted_window_attention` between the qkv and output
    projections.  Blocks with timm's ``dynamic_mask`` keep the copy path.
    """
    check_patch_arguments(model, backend, zero_copy)
    targets = [(name, m) for name, m in model.named_modules() if name and _is_timm_window_attention(m)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _from_timm(m, backend))
    if zero_copy:
        for m in model.modules():
            if _is_timm_swin_block(m) and isinstance(m.attn, WindowAttention) and not getattr(m, "dynamic_mask",
                                                                                               False):
                m._attn = BoundPatch(m, _zero_copy_attn)
    return len(targets)
