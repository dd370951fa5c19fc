"""Triton implementation of ``semantic_attention`` (kernels in ``semask_fast.kernels.semantic_attention``)."""

from __future__ import annotations

from typing import List

import torch

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

    def forward(self, inp, seed):
        from ...kernels.semantic_attention import semantic_attention_forward

        # Row-strided views (e.g. column slices of one fused q/k/v projection) are read in place.
        sq, sk, yv = unit_stride(inp.sq), unit_stride(inp.sk), unit_stride(inp.yv)
        out, lse = semantic_attention_forward(sq, sk, yv)
        return (out,), (lse,)

    def residuals_like(self, inp):
        return (inp.sq.new_empty(inp.sq.shape[:2], dtype=torch.float32),)  # lse

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed):
        # dSq and (dSk, dYv) come from separate kernels, each launched only when autograd needs it.
        from ...kernels.semantic_attention import semantic_attention_backward

        sq, sk, yv = unit_stride(inp.sq), unit_stride(inp.sk), unit_stride(inp.yv)
        dsq, dsk, dyv = semantic_attention_backward(sq, sk, yv, outputs[0], residuals[0], grad_outputs[0].contiguous(),
                                                    needs=(needs[0], needs[1] or needs[2]))
        return dsq, dsk if needs[1] else None, dyv if needs[2] else None
