"""semantic_attention from ``csrc/ops/semantic_attention.cu`` (cuda and SIMT-harness backends).

The class dimension K is staged whole in shared memory (K <= 160, :data:`INSTANCES`); C is tiled
over blocks.  sq, sk and yv are read in place with their batch and row strides
(only the last dim must be contiguous).  Forward saves the output and the fp32 row logsumexp; backward
recomputes the probabilities (N x N never reaches global memory) in one launch: dSq blocks, and
dSk / dYv blocks (a block per key tile and C tile of dYv); the blocks computing dP compute
delta = rowsum(dO * O) of their query rows themselves, so none waits for another.  Only the
work of the gradients autograd needs runs: dSq blocks for dSq, the dYv blocks of every C tile
for dYv, dP in the key blocks for dSk.  fp16 and bf16 run every product of forward and backward
on tensor cores (``sf_mma.cuh``, fp32 accumulation); fp32 runs FFMA kernels.
"""

from __future__ import annotations

from typing import List

import torch

from ... import _build
from ...ops.semantic_attention import SemanticAttentionInputs
from ..base import unit_last_stride
from ..registry import register
from . import CudaImpl, SimtImpl

#: The backward's instances: K padded to KP = 32 * ceil(K / 32) (every multiple of 32 up to the
#: limit), every dtype.  The K tile is staged whole; beyond 160 the backward's dSq accumulators
#: spill (ptxas, sm_80 / sm_90).  The one owner of the class limit: the build compiles a unit per
#: (dtype, tile) and generates the list the .cu's dispatch and K check are written from
#: (semask_fast/_build.py); the reasons below come from it.
INSTANCES = _build.Instances("classes", (32, 64, 96, 128, 160))


class _SemanticAttentionKernels:
    op = "semantic_attention"

    def input_reasons(self, inp: SemanticAttentionInputs) -> List[str]:
        k = inp.sq.shape[-1]
        return [f"K={k} classes (supported: 1..{INSTANCES.limit})"] if k > INSTANCES.limit else []

    def forward(self, inp: SemanticAttentionInputs, seed: int):
        sq, sk, yv = (unit_last_stride(t) for t in (inp.sq, inp.sk, inp.yv))
        out, lse = self.library().semantic_attention_forward(sq, sk, yv)
        return (out,), (lse,)

    def residuals_like(self, inp: SemanticAttentionInputs):
        return (inp.sq.new_empty(inp.sq.shape[:2], dtype=torch.float32),)  # lse

    def backward(self, inp: SemanticAttentionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # Blocks serving only gradients autograd does not need are not launched (those come back unwritten).
        sq, sk, yv = (unit_last_stride(t) for t in (inp.sq, inp.sk, inp.yv))
        grads = self.library().semantic_attention_backward(grad_outputs[0].contiguous(), sq, sk, yv, outputs[0],
                                                           residuals[0], *needs)
        return tuple(g if need else None for g, need in zip(grads, needs))


@register
class SemanticAttentionCuda(_SemanticAttentionKernels, CudaImpl):
    pass


@register
class SemanticAttentionSimt(_SemanticAttentionKernels, SimtImpl):
    pass
