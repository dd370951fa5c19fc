"""semantic_attention from ``csrc/cpu/semantic_attention.cpp`` (the native ``cpu`` backend).

float32 and float64 inputs are read in place with any batch and row strides (SemanticAttention's
column views of one fused projection are not copied); only a non-unit last-dim stride needs a
copy.  float16 / bfloat16 run as they are where the CPU's matrix unit serves them (AMX; the
kernels say so: ``CpuImpl.on_matrix_unit``), products accumulated in float32; elsewhere they are
converted to float32 here (a copy), computed in float32 and rounded once.  Forward saves the row
logsumexp, and for float16 / bfloat16 the float32 output (the returned output is its rounding)
where the backward needs it: always on the converted path, on the matrix unit when its backward
has several key blocks (``semantic_attention_keeps_output``).  Backward recomputes the
probabilities tile by tile.
"""

from __future__ import annotations

import torch

from ...ops.semantic_attention import SemanticAttentionInputs
from ..base import unit_last_stride
from ..registry import register
from . import CpuImpl, computes_wider


@register
class SemanticAttentionCpu(CpuImpl):
    op = "semantic_attention"
    matrix_unit = True

    def _operands(self, inp: SemanticAttentionInputs):
        """(sq, sk, yv) as the kernels take them: float32 / float64, or a reduced type the matrix unit
        serves (else converted to float32), each with a contiguous last dim."""
        wider = computes_wider(inp.sq.dtype) and not self.on_matrix_unit(inp.sq.dtype)
        return tuple(unit_last_stride(t.float() if wider else t) for t in (inp.sq, inp.sk, inp.yv))

    def _keeps_float32_output(self, inp: SemanticAttentionInputs) -> bool:
        """Whether forward saves the float32 output for backward."""
        if not computes_wider(inp.yv.dtype):
            return False
        return (not self.on_matrix_unit(inp.yv.dtype)
                or self.library().semantic_attention_keeps_output(inp.sq.shape[1]))

    def forward(self, inp: SemanticAttentionInputs, seed: int):
        sq, sk, yv = self._operands(inp)
        out, lse, wide = self.library().semantic_attention_forward(sq, sk, yv)
        if out.dtype != inp.yv.dtype:  # converted: the kernels' float32 output, rounded here
            return (out.to(inp.yv.dtype),), (lse, out)
        return (out,), ((lse, wide) if self._keeps_float32_output(inp) else (lse,))

    def residuals_like(self, inp: SemanticAttentionInputs):
        wide = torch.float64 if inp.sq.dtype == torch.float64 else torch.float32
        lse = inp.sq.new_empty(inp.sq.shape[:2], dtype=wide)
        if self._keeps_float32_output(inp):
            return lse, inp.yv.new_empty(inp.yv.shape, dtype=torch.float32)
        return (lse,)

    def backward(self, inp: SemanticAttentionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels compute only the gradients autograd needs.
        sq, sk, yv = self._operands(inp)
        lse = residuals[0]
        if not computes_wider(inp.yv.dtype):
            out = outputs[0]
        elif len(residuals) == 2:  # the float32 output, kept by forward (either path reads it)
            out = residuals[1]
        elif sq.dtype == inp.sq.dtype:  # on the matrix unit, which needs none here
            out = None
        else:
            # Forward ran on the matrix unit without keeping it, and oneDNN has been switched off since:
            # the converted path's float32 output, recomputed.
            out, lse, _ = self.library().semantic_attention_forward(sq, sk, yv)
        dout = grad_outputs[0].to(sq.dtype).contiguous()
        grads = self.library().semantic_attention_backward(dout, sq, sk, yv, out, lse, *needs)
        return tuple(g.to(t.dtype) if need else None for g, t, need in zip(grads, (inp.sq, inp.sk, inp.yv), needs))
