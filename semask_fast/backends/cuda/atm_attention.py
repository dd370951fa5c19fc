"""atm_attention from ``csrc/ops/atm_attention.cu`` (cuda and SIMT-harness backends).

One forward kernel writes both outputs: the attention output and the head-mean
pre-softmax logits (B, Nq, Nk) (the (B, h, Nq, Nk) logits never exist in memory).
Backward takes both gradients: dS_h = P (dP - rowsum(dP P)) + dM / h.  Dropout
uses the same Philox hash as window_attention, element index
``((b * h + head) * Nq + i) * Nk + j``.
"""

from __future__ import annotations

from typing import List

import torch

from ...ops.atm_attention import ATMAttentionInputs
from ..registry import register
from . import CudaImpl, SimtImpl
from .window_attention import draw_seed

MAX_HEAD_DIM = 128
#: The forward block keeps every head's query tile and output accumulator in shared memory.
MAX_FORWARD_SMEM = 160 * 1024


def forward_smem_bytes(heads: int, head_dim: int) -> int:
    """Shared memory of the forward kernel (mirrors fwd_smem_floats in the .cu)."""
    dp = 32 if head_dim <= 32 else 64 if head_dim <= 64 else 128
    return 4 * (2 * heads * 16 * dp + 2 * 32 * (dp + 1) + 2 * heads * 16)


class _ATMAttentionKernels:
    op = "atm_attention"

    def input_reasons(self, inp: ATMAttentionInputs) -> List[str]:
        _, h, _, d = inp.q.shape
        if d > MAX_HEAD_DIM:
            return [f"head_dim={d} (supported: 1..{MAX_HEAD_DIM})"]
        smem = forward_smem_bytes(h, d)
        if smem > MAX_FORWARD_SMEM:
            return [f"heads={h} x head_dim={d} needs {smem} bytes of shared memory (max {MAX_FORWARD_SMEM})"]
        return []

    def forward(self, inp: ATMAttentionInputs):
        seed = draw_seed() if inp.dropout_p > 0 else 0
        q, k, v = (t.contiguous() for t in (inp.q, inp.k, inp.v))
        out, mask_logits, lse = self.library().atm_attention_forward(q, k, v, inp.scale, inp.dropout_p, seed)
        return (out, mask_logits), (out, lse, torch.tensor(seed, dtype=torch.int64))

    def backward(self, inp: ATMAttentionInputs, saved, grad_outputs):
        out, lse, seed = saved
        q, k, v = (t.contiguous() for t in (inp.q, inp.k, inp.v))
        dout, dmask = (g.contiguous() for g in grad_outputs)
        return tuple(self.library().atm_attention_backward(dout, dmask, q, k, v, out, lse, inp.scale, inp.dropout_p,
                                                           int(seed)))


@register
class ATMAttentionCuda(_ATMAttentionKernels, CudaImpl):
    pass


@register
class ATMAttentionSimt(_ATMAttentionKernels, SimtImpl):
    pass
