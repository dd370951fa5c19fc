"""Triton implementation of ``atm_attention`` (kernels in ``semask_fast.kernels.atm_attention``)."""

from __future__ import annotations

from typing import List

import torch

from ..registry import register
from . import TritonImpl


@register
class ATMAttentionTriton(TritonImpl):
    op = "atm_attention"

    def input_reasons(self, inp) -> List[str]:
        from ...kernels.atm_attention import MAX_HEAD_DIM, MAX_HEADS, MIN_HEAD_DIM

        reasons = []
        heads, d = inp.q.shape[1], inp.q.shape[3]
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            reasons.append(f"head_dim={d} (supported: {MIN_HEAD_DIM}..{MAX_HEAD_DIM})")
        if heads > MAX_HEADS:
            reasons.append(f"heads={heads} (supported: 1..{MAX_HEADS}; one program reduces all heads)")
        return reasons

    def forward(self, inp, seed):
        from ...kernels import atm_attention as k

        q, kk, v = inp.q.contiguous(), inp.k.contiguous(), inp.v.contiguous()
        out, mask_logits, lse = k.atm_attention_forward(q, kk, v, scale=inp.scale, dropout_p=inp.dropout_p, seed=seed)
        return (out, mask_logits), (lse,)

    def residuals_like(self, inp):
        return (inp.q.new_empty(inp.q.shape[:3], dtype=torch.float32),)  # lse

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed):
        # dq and (dk, dv) come from separate kernels, each launched only when autograd needs it.
        from ...kernels import atm_attention as k

        q, kk, v = inp.q.contiguous(), inp.k.contiguous(), inp.v.contiguous()
        dout, dmask = (g.contiguous() for g in grad_outputs)
        dq, dk, dv = k.atm_attention_backward(q, kk, v, outputs[0], residuals[0], dout, dmask, scale=inp.scale,
                                              dropout_p=inp.dropout_p, seed=seed,
                                              needs=(needs[0], needs[1] or needs[2]))
        return dq, dk if needs[1] else None, dv if needs[2] else None
