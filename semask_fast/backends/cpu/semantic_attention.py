"""semantic_attention from ``csrc/cpu/semantic_attention.cpp`` (the native ``cpu`` backend).

float32 and float64 inputs are read in place with any batch and row strides (SemanticAttention's
column views of one fused projection are not copied); only a non-unit last-dim stride needs a
copy.  float16 / bfloat16 are converted to float32 here (a copy), computed in float32 and rounded
once.  Forward saves the row logsumexp, and for float16 / bfloat16 the float32 output (the
returned output is its rounding); backward recomputes the probabilities tile by tile.
"""

from __future__ import annotations

import torch

from ...ops.semantic_attention import SemanticAttentionInputs
from ..base import unit_last_stride
from ..registry import register
from . import CpuImpl


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the kernels' compute type (float32, or float64) with a contiguous last dim."""
    return unit_last_stride(t if t.dtype in (torch.float32, torch.float64) else t.float())


def _rounded(dtype: torch.dtype) -> bool:
    """Whether the output is a rounding of the kernels' float32 output (kept for backward)."""
    return dtype not in (torch.float32, torch.float64)


@register
class SemanticAttentionCpu(CpuImpl):
    op = "semantic_attention"

    def forward(self, inp: SemanticAttentionInputs, seed: int):
        sq, sk, yv = (_compute(t) for t in (inp.sq, inp.sk, inp.yv))
        out, lse = self.library().semantic_attention_forward(sq, sk, yv)
        if _rounded(inp.yv.dtype):
            return (out.to(inp.yv.dtype),), (lse, out)
        return (out,), (lse,)

    def residuals_like(self, inp: SemanticAttentionInputs):
        lse = inp.sq.new_empty(inp.sq.shape[:2], dtype=torch.float32 if _rounded(inp.sq.dtype) else inp.sq.dtype)
        if _rounded(inp.yv.dtype):
            return lse, inp.yv.new_empty(inp.yv.shape, dtype=torch.float32)
        return (lse,)

    def backward(self, inp: SemanticAttentionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels compute only the gradients autograd needs.
        lse, out = residuals[0], residuals[1] if _rounded(inp.yv.dtype) else outputs[0]
        sq, sk, yv = (_compute(t) for t in (inp.sq, inp.sk, inp.yv))
        dout = grad_outputs[0].to(out.dtype).contiguous()
        grads = self.library().semantic_attention_backward(dout, sq, sk, yv, out, lse, *needs)
        return tuple(g.to(t.dtype) if need else None for g, t, need in zip(grads, (inp.sq, inp.sk, inp.yv), needs))
