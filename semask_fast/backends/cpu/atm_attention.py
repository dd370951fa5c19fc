"""atm_attention from ``csrc/cpu/atm_attention.cpp`` (the native ``cpu`` backend).

The kernels take contiguous tensors with head_dim a multiple of 16 (another head_dim is zero
padded: padding changes no logit; the padded output columns are dropped): float32 / float64, and
float16 / bfloat16 as they are where the CPU's matrix unit serves them (AMX; products accumulated
in float32); elsewhere float16 / bfloat16 are converted to float32 here (computed in float32,
rounded once).  Forward saves the row logsumexp, and on the converted or padded path the kernels'
output when the returned one is not it; backward takes both gradients,
dS_h = P (dP - rowsum(dP P)) + dM / h, recomputing the probabilities tile by tile.  Dropout keeps
element (b, head, i, j) when ``philox(seed, ((b h + head) Nq + i) Nk + j)`` clears p, with the seed
drawn as on the GPU backends, so :func:`semask_fast.testing.dropout_keep`
replays it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops.atm_attention import ATMAttentionInputs
from ..registry import register
from . import CpuImpl, computes_wider

#: The kernels' head_dim granularity (whole vectors of the widest instruction set).
HEAD_DIM_MULTIPLE = 16


def _output_is_kernels(inp: ATMAttentionInputs, on_unit: bool) -> bool:
    """Whether the returned output is the kernels' own (no rounding, no head_dim padding to cut)."""
    return (on_unit or not computes_wider(inp.q.dtype)) and inp.q.shape[-1] % HEAD_DIM_MULTIPLE == 0


@register
class ATMAttentionCpu(CpuImpl):
    op = "atm_attention"
    matrix_unit = True

    def _compute(self, t: torch.Tensor, on_unit: bool) -> torch.Tensor:
        """``t`` contiguous as the kernels take it, head_dim zero padded to the granularity."""
        if computes_wider(t.dtype) and not on_unit:
            t = t.float()
        pad = -t.shape[-1] % HEAD_DIM_MULTIPLE
        # F.pad keeps a channels_last layout: contiguous after it too.
        return (F.pad(t, (0, pad)) if pad else t).contiguous()

    def forward(self, inp: ATMAttentionInputs, seed: int):
        on_unit = self.on_matrix_unit(inp.q.dtype)
        q, k, v = (self._compute(t, on_unit) for t in (inp.q, inp.k, inp.v))
        out, mask_logits, lse = self.library().atm_attention_forward(q, k, v, inp.scale, inp.dropout_p, seed)
        d, dtype = inp.q.shape[-1], inp.q.dtype
        if _output_is_kernels(inp, on_unit):
            return (out, mask_logits), (lse,)
        if on_unit:  # padded head_dim: the output cut; backward recomputes what it needs
            return (out[..., :d].contiguous(), mask_logits), (lse,)
        return (out[..., :d].to(dtype), mask_logits.to(dtype)), (lse, out)

    def residuals_like(self, inp: ATMAttentionInputs):
        on_unit = self.on_matrix_unit(inp.q.dtype)
        wide = torch.float64 if inp.q.dtype == torch.float64 else torch.float32
        lse = inp.q.new_empty(inp.q.shape[:3], dtype=wide)
        if on_unit or _output_is_kernels(inp, on_unit):
            return (lse,)
        d = inp.q.shape[-1]
        return lse, inp.q.new_empty((*inp.q.shape[:3], d + -d % HEAD_DIM_MULTIPLE), dtype=wide)

    def backward(self, inp: ATMAttentionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels compute only what autograd needs: dQ, and dK with dV.
        on_unit = self.on_matrix_unit(inp.q.dtype)
        q, k, v = (self._compute(t, on_unit) for t in (inp.q, inp.k, inp.v))
        lse = residuals[0]
        if on_unit:
            out = None  # delta comes from the recomputed tiles
        elif len(residuals) == 2:  # the kernels' own output, kept by forward
            out = residuals[1]
        elif _output_is_kernels(inp, False):
            out = outputs[0]
        else:
            # Forward ran on the matrix unit, which has been switched off since (oneDNN disabled):
            # the converted path's float32 output, recomputed (with the same seed: the same dropout).
            out, _, lse = self.library().atm_attention_forward(q, k, v, inp.scale, inp.dropout_p, seed)
        dout = self._compute(grad_outputs[0].to(q.dtype), on_unit)
        dmask = grad_outputs[1].to(q.dtype).contiguous()
        grads = self.library().atm_attention_backward(dout, dmask, q, k, v, out, lse, inp.scale, inp.dropout_p, seed,
                                                      needs[0], needs[1] or needs[2])
        d = inp.q.shape[-1]
        return tuple(g[..., :d].to(t.dtype) if need else None for g, t, need in zip(grads, (inp.q, inp.k, inp.v), needs))
