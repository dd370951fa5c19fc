"""semantic_attention from ``csrc/ops/semantic_attention.cu`` (cuda and SIMT-harness backends).

The class dimension K is staged whole in shared memory (K <= 160); C is tiled
over blocks.  Forward saves the output and the fp32 row logsumexp; backward
recomputes the probabilities (N x N never reaches global memory).  fp16 and bf16
run every product of forward and backward on tensor cores (``sf_mma.cuh``, fp32
accumulation); fp32 runs FFMA kernels.
"""

from __future__ import annotations

from typing import List

from ...ops.semantic_attention import SemanticAttentionInputs
from ..registry import register
from . import CudaImpl, SimtImpl

#: The K tile is staged whole; beyond 160 the backward's dSq accumulators spill (ptxas).
MAX_CLASSES = 160


class _SemanticAttentionKernels:
    op = "semantic_attention"

    def input_reasons(self, inp: SemanticAttentionInputs) -> List[str]:
        k = inp.sq.shape[-1]
        return [f"K={k} classes (supported: 1..{MAX_CLASSES})"] if k > MAX_CLASSES else []

    def forward(self, inp: SemanticAttentionInputs):
        sq, sk, yv = (t.contiguous() for t in (inp.sq, inp.sk, inp.yv))
        out, lse = self.library().semantic_attention_forward(sq, sk, yv)
        return (out,), (out, lse)

    def backward(self, inp: SemanticAttentionInputs, saved, grad_outputs):
        out, lse = saved
        sq, sk, yv = (t.contiguous() for t in (inp.sq, inp.sk, inp.yv))
        return tuple(self.library().semantic_attention_backward(grad_outputs[0].contiguous(), sq, sk, yv, out, lse))


@register
class SemanticAttentionCuda(_SemanticAttentionKernels, CudaImpl):
    pass


@register
class SemanticAttentionSimt(_SemanticAttentionKernels, SimtImpl):
    pass
