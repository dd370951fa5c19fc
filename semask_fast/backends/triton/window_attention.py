"""Triton implementation of ``window_attention`` (kernels in ``semask_fast.kernels.window_attention``)."""

from __future__ import annotations

from typing import List

import torch

from ..registry import register
from . import TritonImpl


def _kernels():
    from semask_fast.kernels import window_attention as k

    return k


def geometry_reasons(head_dim: int, n: int) -> List[str]:
    """Reasons shared by the window and zero-copy implementations."""
    from semask_fast.kernels.window_attention import MAX_HEAD_DIM

    reasons = []
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"head_dim={head_dim} (supported: 1..{MAX_HEAD_DIM})")
    if n > MAX_WINDOW_TOKENS:
        reasons.append(f"window of N={n} tokens (supported: N <= {MAX_WINDOW_TOKENS})")
    return reasons


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit stride on the last dim (any other strides are fine)."""
    return t if t.stride(-1) == 1 else t.contiguous()


#: Beyond this the table-gradient partials (one N x N fp32 tile per program) grow large.
MAX_WINDOW_TOKENS = 1024


@register
class WindowAttentionTriton(TritonImpl):
    op = "window_attention"

    def input_reasons(self, inp) -> List[str]:
        return geometry_reasons(inp.q.shape[-1], inp.q.shape[2])

    @staticmethod
    def _geometry(inp):
        k = _kernels()
        b_, h, n, d = inp.q.shape
        return k.Geometry(inp.window_size, b_, h, d, grid=inp.grid, shift=inp.shift_size)

    def forward(self, inp, seed):
        q, kk, v = (unit_stride(t) for t in (inp.q, inp.k, inp.v))
        out, lse = _kernels().window_attention_forward(
            q, kk, v, self._geometry(inp), inp.bias_table, inp.mask, scale=inp.scale, mask_value=inp.mask_value,
            dropout_p=inp.dropout_p, seed=seed)
        return (out,), (lse,)

    def residuals_like(self, inp):
        return (inp.q.new_empty(inp.q.shape[:3], dtype=torch.float32),)  # lse

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed):
        # The kernels skip dq, dk and dv, or the table gradient (its partials and their fold), when
        # autograd does not need them.
        q, kk, v = (unit_stride(t) for t in (inp.q, inp.k, inp.v))
        dq, dk, dv, d_table = _kernels().window_attention_backward(
            q, kk, v, outputs[0], unit_stride(grad_outputs[0]), residuals[0], self._geometry(inp), inp.bias_table,
            inp.mask, scale=inp.scale, mask_value=inp.mask_value, dropout_p=inp.dropout_p, seed=seed,
            needs=(needs[0], needs[1] or needs[2], needs[3]))
        return dq, dk if needs[1] else None, dv if needs[2] else None, d_table
