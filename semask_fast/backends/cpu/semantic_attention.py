"""semantic_attention from ``csrc/cpu/semantic_attention.cpp`` (the native ``cpu`` backend).

float32 and float64 inputs are read in place with any batch and row strides (SemanticAttention's
column views of one fused projection are not copied); only a non-unit last-dim stride needs a
copy.  float16 / bfloat16 are converted to float32 here (a copy), computed in float32 and rounded
once.  Forward saves the float32 (float64) output and row logsumexp; backward recomputes the
probabilities tile by tile.
"""

from __future__ import annotations

import torch

from ...ops.semantic_attention import SemanticAttentionInputs
from ..registry import register
from . import CpuImpl


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the kernels' compute type (float32, or float64) with a contiguous last dim."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@register
class SemanticAttentionCpu(CpuImpl):
    op = "semantic_attention"

    def forward(self, inp: SemanticAttentionInputs):
        sq, sk, yv = (_compute(t) for t in (inp.sq, inp.sk, inp.yv))
        out, lse = self.library().semantic_attention_forward(sq, sk, yv)
        return (out.to(inp.yv.dtype),), (out, lse)

    def backward(self, inp: SemanticAttentionInputs, saved, grad_outputs):
        out, lse = saved
        sq, sk, yv = (_compute(t) for t in (inp.sq, inp.sk, inp.yv))
        dout = grad_outputs[0].to(out.dtype).contiguous()
        grads = self.library().semantic_attention_backward(dout, sq, sk, yv, out, lse)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (inp.sq, inp.sk, inp.yv)))
