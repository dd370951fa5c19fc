"""Drop-in modules built on the functional ops.

Each keeps the constructor, parameter and buffer names of the layer it
replaces, so state_dicts load both ways; ``forward`` is the original layer's
math with the attention core replaced by one op call.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .ops import atm_attention, semantic_attention, window_attention
from .reference import relative_position_index

__all__ = ["WindowAttention", "SemanticAttention", "ATMAttention", "patch_timm"]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class WindowAttention(nn.Module):
    """Swin window attention with relative position bias, as ``timm``'s ``WindowAttention``.

    Same constructor, parameters (``qkv``, ``proj``, ``relative_position_bias_table``),
    non-persistent ``relative_position_index`` buffer and ``forward(x, mask=None)``.
    ``backend`` picks the attention backend (default: automatic).

    Shapes: x (B*nW, N, C) -> (B*nW, N, C); mask (nW, N, N) additive or None.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size=7,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None,
                 backend: str = "auto"):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.window_size = _pair(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.backend = backend
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
        self.register_buffer("relative_position_index",
                             relative_position_index(self.window_size, device=device), persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def set_window_size(self, window_size) -> None:
        """Change the window, resizing the bias table as timm does (needs timm)."""
        from timm.layers import resize_rel_pos_bias_table

        window_size = _pair(window_size)
        if window_size == self.window_size:
            return
        old = self.window_size
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        with torch.no_grad():
            shape = ((2 * window_size[0] - 1) * (2 * window_size[1] - 1), self.num_heads)
            table = self.relative_position_bias_table
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(table, new_window_size=window_size, new_bias_shape=shape,
                                          old_window_size=old), requires_grad=table.requires_grad)
        self.relative_position_index = relative_position_index(window_size, device=table.device)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = window_attention(q, k, v, self.relative_position_bias_table, window_size=self.window_size, mask=mask,
                             scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                             backend=self.backend)
        x = x.transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))


class SemanticAttention(nn.Module):
    """SeMask's semantic attention layer (``SemanticAttention(dim, n_cls)`` of the official code).

    ``forward(x) -> (prior, out)``: x (B_, N, C) layer-normed windows (or whole
    images); prior = Sq (B_, N, K) raw class logits; out = gamma * Dropout(mlp_res(
    softmax(Sq Sk^T) Yv)) + x, (B_, N, C).  No scale on the scores (as the official code).

    Init as the class itself does: Linears kaiming-normal with zero bias, then
    ``mlp_res`` and ``gamma`` zeroed (the FPN model re-initialises; see
    :mod:`semask_fast.models`).
    """

    def __init__(self, dim: int, num_classes: int, proj_drop: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.nc = num_classes
        self.backend = backend
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v):
            nn.init.kaiming_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.mlp_res.weight)
        nn.init.zeros_(self.mlp_res.bias)
        nn.init.zeros_(self.gamma)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        sq = self.mlp_cls_q(x)
        sk = self.mlp_cls_k(x)
        yv = self.mlp_v(x)
        f = self.proj_drop(self.mlp_res(semantic_attention(sq, sk, yv, backend=self.backend)))
        return sq, self.gamma * f + x


class ATMAttention(nn.Module):
    """SegViT's ATM ``Attention``: class tokens attend over spatial tokens.

    Official defaults and names (``q``, ``k``, ``v``, ``proj``); its decoder layer
    builds it with ``qkv_bias=True, attn_drop=0.1``.

    ``forward(xq, xk, xv) -> (out, mask_logits)``: xq (B, Nq, C), xk and xv
    (B, Nk, C); out (Nq, B, C) sequence-first as the official code returns it;
    mask_logits (B, Nq, Nk) = head-mean of the scaled pre-softmax logits.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, nq, c = xq.shape
        out, mask_logits = atm_attention(self._heads(self.q(xq)), self._heads(self.k(xk)), self._heads(self.v(xv)),
                                         scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                                         backend=self.backend)
        x = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, nq, c)))
        return x.transpose(0, 1), mask_logits


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
