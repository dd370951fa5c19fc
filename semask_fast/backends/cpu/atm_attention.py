"""atm_attention from ``csrc/cpu/atm_attention.cpp`` (the native ``cpu`` backend).

The kernels take contiguous float32 / float64 tensors with head_dim a multiple of 16: float16 /
bfloat16 are converted to float32 here (computed in float32, rounded once), and another head_dim
is zero padded (padding changes no logit; the padded output columns are dropped).  Forward saves
the row logsumexp, and the kernels' output when the returned one is not it (rounded to float16 /
bfloat16 or cut to head_dim); backward takes both gradients,
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
from . import CpuImpl

#: The kernels' head_dim granularity (whole vectors of the widest instruction set).
HEAD_DIM_MULTIPLE = 16


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous in the kernels' compute type, head_dim zero padded to the granularity."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    pad = -t.shape[-1] % HEAD_DIM_MULTIPLE
    # F.pad keeps a channels_last layout: contiguous after it too.
    return (F.pad(t, (0, pad)) if pad else t).contiguous()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _output_is_kernels(inp: ATMAttentionInputs) -> bool:
    """Whether the returned output is the kernels' own (no rounding, no head_dim padding to cut)."""
    return inp.q.dtype in (torch.float32, torch.float64) and inp.q.shape[-1] % HEAD_DIM_MULTIPLE == 0


@register
class ATMAttentionCpu(CpuImpl):
    op = "atm_attention"

    def forward(self, inp: ATMAttentionInputs, seed: int):
        q, k, v = (_compute(t) for t in (inp.q, inp.k, inp.v))
        out, mask_logits, lse = self.library().atm_attention_forward(q, k, v, inp.scale, inp.dropout_p, seed)
        d, dtype = inp.q.shape[-1], inp.q.dtype
        if _output_is_kernels(inp):
            return (out, mask_logits), (lse,)
        return (out[..., :d].to(dtype), mask_logits.to(dtype)), (lse, out)

    def residuals_like(self, inp: ATMAttentionInputs):
        acc = _compute_dtype(inp.q.dtype)
        lse = inp.q.new_empty(inp.q.shape[:3], dtype=acc)
        if _output_is_kernels(inp):
            return (lse,)
        d = inp.q.shape[-1]
        return lse, inp.q.new_empty((*inp.q.shape[:3], d + -d % HEAD_DIM_MULTIPLE), dtype=acc)

    def backward(self, inp: ATMAttentionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels compute only what autograd needs: dQ, and dK with dV.
        lse, out = residuals[0], outputs[0] if _output_is_kernels(inp) else residuals[1]
        q, k, v = (_compute(t) for t in (inp.q, inp.k, inp.v))
        dout = _compute(grad_outputs[0].to(out.dtype))
        dmask = grad_outputs[1].to(out.dtype).contiguous()
        grads = self.library().atm_attention_backward(dout, dmask, q, k, v, out, lse, inp.scale, inp.dropout_p, seed,
                                                      needs[0], needs[1] or needs[2])
        d = inp.q.shape[-1]
        return tuple(g[..., :d].to(t.dtype) if need else None for g, t, need in zip(grads, (inp.q, inp.k, inp.v), needs))
