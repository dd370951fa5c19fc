"""Zero-copy shifted-window attention on the image layout: public op and inputs."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import reference as ref
from ._common import (OpInputs, Pair, check_bias_table, check_bool, check_float, check_like, check_probability,
                      check_scale, check_size, check_tensor, check_window_geometry)
from ._library import Autocast, OpSpec
from .window_process import padded_grid


@dataclasses.dataclass(frozen=True)
class ShiftedWindowAttentionInputs(OpInputs):
    qkv: torch.Tensor
    bias_table: Optional[torch.Tensor]
    qkv_bias: Optional[torch.Tensor]
    num_heads: int
    window_size: Pair
    shift_size: Pair
    pad_then_roll: bool
    scale: float
    mask_value: float
    dropout_p: float

    grad_fields = ("qkv", "bias_table", "qkv_bias")

    @property
    def head_dim(self) -> int:
        return self.qkv.shape[-1] // (3 * self.num_heads)

    @property
    def grid(self) -> Pair:
        return padded_grid(self.qkv.shape[1], self.qkv.shape[2], self.window_size)


def shifted_window_attention(qkv: torch.Tensor, bias_table: Optional[torch.Tensor] = None, *, num_heads: int,
                             window_size, shift_size=0, pad_then_roll: bool = True,
                             qkv_bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                             mask_value: float = -100.0, dropout_p: float = 0.0,
                             backend: str = "auto") -> torch.Tensor:
    """Swin (S)W-MSA straight from the qkv projection's image layout.

    Equivalent to pad/roll -> :func:`window_partition` -> :func:`window_attention`
    with the shift mask -> :func:`window_merge`, without the copies.

    Args:
        qkv: (B, H, W, 3*h*d), channels [q | k | v], each head-major (timm's
            ``qkv`` Linear applied to the unpadded image), any H, W.
        bias_table: ((2Wh-1)(2Ww-1), h) relative-position bias table, optional.
        num_heads: h.
        window_size, shift_size, pad_then_roll: as :func:`window_partition`.
        qkv_bias: (3*h*d,) bias of the qkv projection: padded tokens are zero
            before the projection, so they carry this value (zero when None).
        scale, mask_value, dropout_p: as :func:`window_attention`.

    Returns:
        (B, H, W, h*d) attention output, un-rolled and cropped (before ``proj``).
    """
    check_tensor("qkv", qkv, 4, "(B, H, W, 3*heads*head_dim)")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    for dim, what in ((1, "H"), (2, "W"), (3, "3*heads*head_dim")):
        check_size("qkv", qkv, dim, what)
    c3 = qkv.shape[-1]
    if c3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim must be 3*num_heads*head_dim, got {c3} with num_heads={num_heads}")
    ws, shift = check_window_geometry(window_size, shift_size)
    check_bool("pad_then_roll", pad_then_roll)
    check_bias_table(bias_table, "qkv", qkv, ws, num_heads)
    if qkv_bias is not None:
        check_tensor("qkv_bias", qkv_bias, 1, f"({c3},)")
        check_like("qkv_bias", qkv_bias, "qkv", qkv, dtype=False)
        if qkv_bias.shape[0] != c3:
            raise ValueError(f"qkv_bias must have shape ({c3},), got {tuple(qkv_bias.shape)}")
    d = c3 // (3 * num_heads)
    return SPEC(backend, qkv=qkv, bias_table=bias_table, qkv_bias=qkv_bias, num_heads=num_heads, window_size=ws,
                shift_size=shift, pad_then_roll=pad_then_roll, scale=check_scale("scale", scale, d ** -0.5),
                mask_value=check_float("mask_value", mask_value),
                dropout_p=check_probability("dropout_p", dropout_p))[0]


def _reference(inp: ShiftedWindowAttentionInputs, dropout_keep):
    return (ref.shifted_window_attention(
        inp.qkv, inp.bias_table, num_heads=inp.num_heads, window_size=inp.window_size, shift_size=inp.shift_size,
        pad_then_roll=inp.pad_then_roll, qkv_bias=inp.qkv_bias, scale=inp.scale, mask_value=inp.mask_value,
        dropout_p=inp.dropout_p, dropout_keep=dropout_keep),)


def _outputs_like(inp: ShiftedWindowAttentionInputs):
    b, h, w, _ = inp.qkv.shape
    return (inp.qkv.new_empty((b, h, w, inp.num_heads * inp.head_dim)),)


def _dropout_shape(inp: ShiftedWindowAttentionInputs):
    n = inp.window_size[0] * inp.window_size[1]
    return (inp.qkv.shape[0] * inp.grid[0] * inp.grid[1], inp.num_heads, n, n)


SPEC = OpSpec("shifted_window_attention", ShiftedWindowAttentionInputs, outputs=("out",),
              outputs_like=_outputs_like, reference=_reference, dropout_shape=_dropout_shape,
              # Padded tokens carry qkv_bias in qkv's dtype, as the reference pads with it.
              autocast=Autocast(lowered=("qkv", "qkv_bias"), fp32=("bias_table",)))

__all__ = ["shifted_window_attention", "ShiftedWindowAttentionInputs", "SPEC"]
