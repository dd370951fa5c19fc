"""Drop-in replacement of timm's Swin ``WindowAttention``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import shifted_window_attention, window_attention
from ..reference import relative_position_index

__all__ = ["WindowAttention"]


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

    def forward_image(self, x: torch.Tensor, shift_size=0, pad_then_roll: bool = True) -> torch.Tensor:
        """(S)W-MSA of a whole image, (B, H, W, C) -> (B, H, W, C), without partition or merge copies.

        Same numbers as padding (zeros), rolling by -shift in the order ``pad_then_roll``
        says, partitioning, :meth:`forward` with the SW-MSA mask, merging, un-rolling and
        cropping: the qkv projection runs on the unpadded image and the zero-copy op
        (:func:`semask_fast.shifted_window_attention`) gives pad tokens the qkv bias.
        """
        qkv = self.qkv(x)
        x = shifted_window_attention(qkv, self.relative_position_bias_table, num_heads=self.num_heads,
                                     window_size=self.window_size, shift_size=shift_size,
                                     pad_then_roll=pad_then_roll, qkv_bias=self.qkv.bias, scale=self.scale,
                                     dropout_p=self.attn_drop.p if self.training else 0.0, backend=self.backend)
        return self.proj_drop(self.proj(x))
