"""Swin (shifted-)window attention: the public op and its validated inputs."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import reference as ref
from ._common import (OpInputs, Pair, SymPair, check_bias_table, check_float, check_like, check_probability,
                      check_scale, check_size, check_tensor, check_window_geometry, to_pair)
from ._library import Autocast, OpSpec

_QKV = "(B*nW, heads, N, head_dim)"


@dataclasses.dataclass(frozen=True)
class WindowAttentionInputs(OpInputs):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias_table: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    window_size: Pair
    shift_size: Pair
    grid: Optional[SymPair]
    scale: float
    mask_value: float
    dropout_p: float

    grad_fields = ("q", "k", "v", "bias_table")

    @property
    def num_windows(self) -> Optional[int]:
        """Windows per image (nW), when known from the grid or the mask."""
        if self.mask is not None:
            return self.mask.shape[0]
        if self.grid is not None:
            return self.grid[0] * self.grid[1]
        return None

    @property
    def shifted(self) -> bool:
        """True when the shift mask is computed from (grid, window, shift)."""
        return self.mask is None and any(self.shift_size)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor] = None,
                     *, window_size, shift_size=0, grid=None, mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, mask_value: float = -100.0, dropout_p: float = 0.0,
                     backend: str = "auto") -> torch.Tensor:
    """Swin W-MSA / SW-MSA attention inside windows.

    ``out = dropout(softmax(scale * q @ k^T + bias + mask)) @ v`` per window and head.

    Args:
        q, k, v: (B*nW, h, N, d), N = Wh*Ww; window index varies fastest in the
            batch (official ``window_partition`` order).
        bias_table: ((2Wh-1)(2Ww-1), h) relative-position bias table, gathered
            with the official index; same dtype as q, or float32.  Optional.
        window_size: Wh, Ww (int or pair).
        shift_size: cyclic shift (int or pair).  When > 0, the official SW-MSA
            mask (0 within a region, ``mask_value`` across) is derived from ``grid``.
        grid: (nWh, nWw) windows per image; required when ``shift_size`` > 0.
        mask: explicit additive mask (nW, N, N), as timm's ``WindowAttention``
            receives it; exclusive with ``shift_size`` > 0.
        scale: logit scale, default d ** -0.5 (applied to q before the product).
        mask_value: value of the computed shift mask across regions (official: -100).
        dropout_p: attention dropout probability (pass 0 in eval mode).
        backend: ``"auto"`` or one of ``semask_fast.backends.registry.BACKENDS``.

    Returns:
        (B*nW, h, N, d), differentiable in q, k, v and bias_table.
    """
    check_tensor("q", q, 4, _QKV)
    check_tensor("k", k, 4, _QKV)
    check_tensor("v", v, 4, _QKV)
    for name, t in (("k", k), ("v", v)):
        check_like(name, t, "q", q)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    check_size("q", q, 3, "head_dim")
    b_, h, n, d = q.shape
    ws, shift = check_window_geometry(window_size, shift_size)
    if n != ws[0] * ws[1]:
        raise ValueError(f"q must have N = Wh*Ww = {ws[0] * ws[1]} tokens for window_size={ws}, got N={n}")
    check_bias_table(bias_table, "q", q, ws, h)
    if grid is not None:
        grid = to_pair("grid", grid, minimum=1)
        if b_ % (grid[0] * grid[1]):
            raise ValueError(f"grid={grid} means {grid[0] * grid[1]} windows per image, which does not "
                             f"divide the batch B*nW={b_} of q")
    if mask is not None:
        if any(shift):
            raise ValueError("pass either mask or shift_size > 0 (with grid), not both")
        check_tensor("mask", mask, 3, "(nW, N, N)")
        check_like("mask", mask, "q", q, dtype=False)
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("mask requires grad, but window_attention does not differentiate its mask (only q, k, v "
                             "and bias_table): pass mask.detach()")
        if mask.shape[1:] != (n, n) or mask.shape[0] == 0 or b_ % mask.shape[0]:
            raise ValueError(f"mask must have shape (nW, {n}, {n}) with nW dividing B*nW={b_}, "
                             f"got {tuple(mask.shape)}")
    elif any(shift) and grid is None:
        raise ValueError("grid=(nWh, nWw) is required when shift_size > 0 (the shift mask depends on it)")
    return SPEC(backend, q=q, k=k, v=v, bias_table=bias_table, mask=mask, window_size=ws, shift_size=shift,
                grid=grid, scale=check_scale("scale", scale, d ** -0.5),
                mask_value=check_float("mask_value", mask_value),
                dropout_p=check_probability("dropout_p", dropout_p))[0]


def _reference(inp: WindowAttentionInputs, dropout_keep):
    return (ref.window_attention(inp.q, inp.k, inp.v, inp.bias_table, window_size=inp.window_size,
                                 shift_size=inp.shift_size, grid=inp.grid, mask=inp.mask, scale=inp.scale,
                                 mask_value=inp.mask_value, dropout_p=inp.dropout_p, dropout_keep=dropout_keep),)


SPEC = OpSpec("window_attention", WindowAttentionInputs, outputs=("out",),
              outputs_like=lambda inp: (inp.q.new_empty(inp.q.shape),), reference=_reference,
              dropout_shape=lambda inp: (*inp.q.shape[:3], inp.q.shape[2]),
              autocast=Autocast(lowered=("q", "k", "v"), fp32=("bias_table", "mask")))

__all__ = ["window_attention", "WindowAttentionInputs", "SPEC"]
