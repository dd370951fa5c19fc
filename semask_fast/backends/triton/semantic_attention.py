"""Triton implementation of ``semantic_attention`` (kernels in ``semask_fast.kernels.semantic_attention``)."""

from __future__ import annotations

from typing import List

from ..registry import register
from . import TritonImpl


@register
class SemanticAttentionTriton(TritonImpl):
    op = "semantic_attention"

    def input_reasons(self, inp) -> List[str]:
        from ...kernels.semantic_attention import MAX_K

        k = inp.sq.shape[-1]
        if k > MAX_K:
            return [f"classes K={k} (supported: 1..{MAX_K}; the backward holds K in registers)"]
        return []

    def forward(self, inp):
        from ...kernels.semantic_attention import semantic_attention_forward

        sq, sk, yv = inp.sq.contiguous(), inp.sk.contiguous(), inp.yv.contiguous()
        out, lse = semantic_attention_forward(sq, sk, yv)
        return (out,), (sq, sk, yv, out, lse)

    def backward(self, inp, saved, grad_outputs):
        from ...kernels.semantic_attention import semantic_attention_backward

        sq, sk, yv, out, lse = saved
        return semantic_attention_backward(sq, sk, yv, out, lse, grad_outputs[0].contiguous())
