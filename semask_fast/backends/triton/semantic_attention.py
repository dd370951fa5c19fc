"""Triton implementation of ``semantic_attention`` (kernels in ``semask_fast.kernels.semantic_attention``)."""

from __future__ import annotations

from typing import List

from ..registry import register
from . import TritonImpl
from .window_attention import unit_stride


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

        # Row-strided views (e.g. column slices of one fused q/k/v projection) are read in place.
        sq, sk, yv = unit_stride(inp.sq), unit_stride(inp.sk), unit_stride(inp.yv)
        out, lse = semantic_attention_forward(sq, sk, yv)
        return (out,), (sq, sk, yv, out, lse)

    def backward(self, inp, saved, grad_outputs):
        from ...kernels.semantic_attention import semantic_attention_backward

        sq, sk, yv, out, lse = saved
        return semantic_attention_backward(sq, sk, yv, out, lse, grad_outputs[0].contiguous())
