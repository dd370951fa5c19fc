"""Drop-in replacements for the Swin attention layers of the official code, mm*, torchvision and transformers.

Each replacement adopts the original's parameters and buffers (the same tensors, so
state_dict keys, shapes and any optimizer built beforehand are unchanged) and calls the
public ops with its ``backend``.  :func:`semask_fast.patch` builds them; the
``from_module`` constructors assume the checks that function makes.

* :class:`SwinWindowAttention`: the official Swin / SeMask ``WindowAttention`` and mm*'s
  ``WindowMSA`` (``forward(x, mask=None)`` on windows, ``qk_scale``, index buffer kept as is).
* :class:`ShiftWindowMSA`: mmseg / mmdet / mmpretrain ``ShiftWindowMSA`` (pad, then roll).
* :class:`ShiftedWindowAttention`: torchvision's V1 module (pad, then roll; per-axis shift,
  dropped on an axis that holds a single window).
* :func:`hf_swin_self_attention_forward` / :func:`hf_swin_attention_forward`: forwards bound
  onto transformers' ``SwinSelfAttention`` (v4 layout) and ``SwinAttention`` (v5 layout).
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops import window_attention, window_merge, window_partition
from ..ops.window_process import padded_grid
from .window_attention import WindowAttention

__all__ = ["SwinWindowAttention", "ShiftWindowMSA", "ShiftedWindowAttention", "hf_swin_self_attention_forward",
           "hf_swin_attention_forward", "warn_fallback_once"]

_warned = set()


def warn_fallback_once(where: str, reason: str) -> None:
    """One warning per (module, reason): a patched module ran its original forward."""
    if (where, reason) not in _warned:
        _warned.add((where, reason))
        warnings.warn(f"semask_fast.patch: {where} runs its original forward: {reason}", stacklevel=3)


class BoundPatch:
    """``fn(module, *args, **settings, **kwargs)`` as a module's method (a replaced ``forward``):
    unlike a bound ``functools.partial``, it pickles (``torch.save(model)``) and torch.compile
    traces it."""

    def __init__(self, module: nn.Module, fn, **settings):
        self.module, self.fn, self.settings = module, fn, settings

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **self.settings, **kwargs)


def adopt_buffer(new: nn.Module, name: str, old: nn.Module) -> None:
    """Take ``old``'s buffer ``name`` itself, with its persistence (so state_dict keys match)."""
    persistent = name not in old._non_persistent_buffers_set
    new.register_buffer(name, getattr(old, name), persistent=persistent)


class SwinWindowAttention(WindowAttention):
    """The official Swin / SeMask ``WindowAttention`` (and mm*'s ``WindowMSA``) on the fast ops.

    Constructor of the official class (``qk_scale`` overrides ``head_dim ** -0.5``), its
    parameter names (``qkv``, ``proj``, ``relative_position_bias_table``) and its persistent
    ``relative_position_index`` buffer; ``forward(x, mask=None)`` on windows (B*nW, N, C) with
    the additive mask (nW, N, N) the block passes.  :meth:`forward_image` runs a whole
    (B, H, W, C) image, with the zero-copy op or with partition and merge copies.
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None, backend: str = "auto"):
        super().__init__(dim, num_heads, window_size=window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, device=device, dtype=dtype, backend=backend)
        self.register_buffer("relative_position_index", self.relative_position_index, persistent=True)
        self.scale = qk_scale or self.scale

    @classmethod
    def from_module(cls, m: nn.Module, *, dim: int, num_heads: int, window_size: Sequence[int], scale: float,
                    attn_drop: nn.Module, proj_drop: nn.Module, backend: str) -> "SwinWindowAttention":
        """Wrap ``m``'s own qkv, proj, table and index (no copy), e.g. an official ``WindowAttention``."""
        new = cls(dim, tuple(window_size), num_heads, qkv_bias=m.qkv.bias is not None, device="meta",
                  backend=backend)
        new.qkv, new.proj, new.attn_drop, new.proj_drop = m.qkv, m.proj, attn_drop, proj_drop
        new.relative_position_bias_table = m.relative_position_bias_table
        adopt_buffer(new, "relative_position_index", m)
        new.scale = scale
        new.train(m.training)
        return new

    def forward_image(self, x: torch.Tensor, shift_size=0, pad_then_roll: bool = True,
                      zero_copy: bool = True) -> torch.Tensor:
        """(S)W-MSA of a (B, H, W, C) image: pad with zeros, roll by -shift (in the order
        ``pad_then_roll`` says), attend in windows with the shift mask, merge, un-roll, crop.

        ``zero_copy=True`` is :func:`semask_fast.shifted_window_attention` on the qkv image;
        ``False`` partitions and merges with copies (:func:`semask_fast.window_partition`).
        """
        if zero_copy:
            return super().forward_image(x, shift_size, pad_then_roll)
        _, H, W, C = x.shape
        windows = window_partition(x, self.window_size, shift_size, pad_then_roll, backend=self.backend)
        b_ = windows.shape[0]
        q, k, v = self.qkv(windows.view(b_, self.window_area, C)).reshape(
            b_, self.window_area, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = window_attention(q, k, v, self.relative_position_bias_table, window_size=self.window_size,
                               shift_size=shift_size, grid=padded_grid(H, W, self.window_size), scale=self.scale,
                               dropout_p=self.attn_drop.p if self.training else 0.0, backend=self.backend)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b_, self.window_area, -1)))
        return window_merge(out, self.window_size, shift_size, H, W, pad_then_roll, backend=self.backend)


class ShiftWindowMSA(nn.Module):
    """mmseg / mmdet / mmpretrain ``ShiftWindowMSA`` on the fast ops: ``forward(query, hw_shape)``.

    Pads to window multiples, then rolls (SPEC.md section 1); ``w_msa`` is a
    :class:`SwinWindowAttention` holding mm*'s ``WindowMSA`` parameters, ``drop`` the
    original's DropPath.  ``pad_small_map=False`` is mmpretrain's classification rule: no
    shift when the map's short side equals the window, an error when it is smaller.
    """

    def __init__(self, w_msa: SwinWindowAttention, window_size: int, shift_size: int, drop: nn.Module,
                 pad_small_map: bool = True, zero_copy: bool = True):
        super().__init__()
        self.w_msa = w_msa
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop = drop
        self.pad_small_map = pad_small_map
        self.zero_copy = zero_copy

    def forward(self, query: torch.Tensor, hw_shape) -> torch.Tensor:
        B, L, C = query.shape
        H, W = hw_shape
        if L != H * W:
            raise ValueError(f"query has {L} tokens, hw_shape {tuple(hw_shape)} means {H * W}")
        shift = self.shift_size
        if not self.pad_small_map and min(H, W) <= self.window_size:
            if min(H, W) < self.window_size:
                raise ValueError(f"the input shape ({H}, {W}) is smaller than the window size ({self.window_size}):"
                                 " set pad_small_map=True or decrease the window_size")
            shift = 0
        x = self.w_msa.forward_image(query.view(B, H, W, C), shift, pad_then_roll=True, zero_copy=self.zero_copy)
        return self.drop(x.reshape(B, H * W, C))


class ShiftedWindowAttention(SwinWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (V1) on the fast ops: ``forward(x)``, x (B, H, W, C).

    torchvision pads, then rolls, and drops the shift on an axis whose padded size is one
    window; ``attention_dropout`` and ``dropout`` are its attention and output dropout.
    Parameters and the flat ``relative_position_index`` buffer are torchvision's.
    """

    def __init__(self, dim: int, window_size: Sequence[int], shift_size: Sequence[int], num_heads: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0, device=None, dtype=None, backend: str = "auto", zero_copy: bool = True):
        super().__init__(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attention_dropout,
                         proj_drop=dropout, device=device, dtype=dtype, backend=backend)
        if not proj_bias:
            self.proj = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.register_buffer("relative_position_index", self.relative_position_index.flatten())
        self.shift_size = list(shift_size)
        self.zero_copy = zero_copy

    @property
    def attention_dropout(self) -> float:
        return self.attn_drop.p

    @property
    def dropout(self) -> float:
        return self.proj_drop.p

    @classmethod
    def from_torchvision(cls, m: nn.Module, backend: str, zero_copy: bool) -> "ShiftedWindowAttention":
        """Wrap torchvision module ``m``'s own parameters and buffer (no copy)."""
        new = cls(m.qkv.in_features, m.window_size, m.shift_size, m.num_heads, qkv_bias=m.qkv.bias is not None,
                  attention_dropout=m.attention_dropout, dropout=m.dropout, device="meta", backend=backend,
                  zero_copy=zero_copy)
        new.qkv, new.proj = m.qkv, m.proj
        new.relative_position_bias_table = m.relative_position_bias_table
        adopt_buffer(new, "relative_position_index", m)
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        grid = padded_grid(H, W, self.window_size)
        # torchvision drops the shift on an axis whose padded size is a single window.
        shift = tuple(s if n > 1 else 0 for s, n in zip(self.shift_size, grid))
        return self.forward_image(x, shift, pad_then_roll=True, zero_copy=self.zero_copy)


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    b_, n, _ = t.shape
    return t.view(b_, n, heads, -1).transpose(1, 2)


def hf_swin_self_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, head_mask=None,
                                   output_attentions=False, *, backend: str = "auto", where: str = ""):
    """transformers' ``SwinSelfAttention.forward`` (v4 layout: ``query``, ``key``, ``value``,
    ``relative_position_bias_table``) on :func:`semask_fast.window_attention`.

    Attention weights (``output_attentions``) and ``head_mask`` need the probabilities, which
    the op never stores: then the original forward runs (one warning per module).
    """
    reason = ("attention weights requested (output_attentions=True)" if output_attentions else
              "head_mask given" if head_mask is not None else
              "window of another size than the module's" if hidden_states.shape[1] != self.window_size[0] *
              self.window_size[1] else None)
    if reason:
        warn_fallback_once(where or type(self).__name__, reason)
        return type(self).forward(self, hidden_states, attention_mask, head_mask, output_attentions)
    heads = self.num_attention_heads
    q, k, v = (_heads_first(proj(hidden_states), heads) for proj in (self.query, self.key, self.value))
    out = window_attention(q, k, v, self.relative_position_bias_table, window_size=tuple(self.window_size),
                           mask=attention_mask, scale=self.attention_head_size ** -0.5,
                           dropout_p=self.dropout.p if self.training else 0.0, backend=backend)
    return (out.transpose(1, 2).reshape(*hidden_states.shape[:2], -1),)


def _hf_attentions_requested(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    # transformers v5 records attention weights by hooks while the model's forward runs; the
    # request lives in its context variable (read only if transformers is loaded).
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    wanted = collector.get() if collector is not None else None
    return bool(wanted) and "attentions" in wanted


def hf_swin_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, *, backend: str = "auto",
                              where: str = "", **kwargs):
    """transformers' ``SwinAttention.forward`` (v5 layout: ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``relative_position_bias``) on :func:`semask_fast.window_attention`.

    Returns ``(output, None)``; when the caller asks for attention weights the original
    forward runs instead (one warning per module).
    """
    bias = self.relative_position_bias
    reason = ("attention weights requested (output_attentions)" if _hf_attentions_requested(kwargs) else
              "window of another size than the module's" if hidden_states.shape[1] != bias.window_area else None)
    if reason:
        warn_fallback_once(where or type(self).__name__, reason)
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    heads = self.num_attention_heads
    q, k, v = (_heads_first(proj(hidden_states), heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = window_attention(q, k, v, bias.relative_position_bias_table, window_size=tuple(bias.window_size),
                           mask=attention_mask, scale=self.scaling,
                           dropout_p=self.attention_dropout if self.training else 0.0, backend=backend)
    return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:2], -1)), None
