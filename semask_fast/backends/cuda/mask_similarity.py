"""mask_similarity from ``csrc/ops/mask_similarity.cu`` (cuda and SIMT-harness backends).

Forward: one kernel per (batch, 32 patch rows) computes the cosines with the norms folded into
the GEMM (both norms from the staged tiles), and the optional LayerNorm over K as an epilogue
from shared memory.  Backward, two launches: per row block, dS (recomputing S) and that block's
rows of dP from the dS held in shared memory; then the dC GEMM, which sums the per-class partials
in a fixed order.  Nothing is saved but the inputs.  Only the gradients autograd needs are
computed: without dP no dP GEMM, without dC no dS written and, with the LayerNorm, only the blocks
summing its parameters' gradients run in the second launch.
"""

from __future__ import annotations

from typing import List

from ...ops.mask_similarity import MaskSimilarityInputs
from ..registry import register
from . import CudaImpl, SimtImpl, cuda_index

def _affine(t):
    return None if t is None else t.float().contiguous()


class _MaskSimilarityKernels:
    op = "mask_similarity"

    def input_reasons(self, inp: MaskSimilarityInputs) -> List[str]:
        # The kernels keep a 32-row block of scores (32 x K fp32) in shared memory: the C++ side
        # says what K needs and what the inputs' device gives (a 99 KiB sm_86/sm_89 GPU: K <= 644
        # in fp32, 704 in fp16/bf16).
        if inp.classes.device.type not in self.supported_devices():
            return []  # the device reason says it
        need, limit = self.library().mask_similarity_shared_memory(inp.classes.shape[1], inp.classes.dtype,
                                                                   cuda_index(inp.classes.device))
        if need > limit:
            return [f"K={inp.classes.shape[1]} classes in {inp.classes.dtype}: the kernels need {need} bytes of "
                    f"shared memory per block ({inp.classes.device} gives {limit})"]
        return []

    def forward(self, inp: MaskSimilarityInputs, seed: int):
        out = self.library().mask_similarity_forward(inp.patches.contiguous(), inp.classes.contiguous(),
                                                     _affine(inp.norm_weight), _affine(inp.norm_bias), inp.norm,
                                                     inp.norm_eps)
        return (out,), ()

    def backward(self, inp: MaskSimilarityInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels skip dP or dC when autograd does not need them (returned unwritten).
        dp, dc, dw, db = self.library().mask_similarity_backward(
            grad_outputs[0].contiguous(), inp.patches.contiguous(), inp.classes.contiguous(),
            _affine(inp.norm_weight), inp.norm, inp.norm_eps, needs[0], needs[1])
        dw = dw.to(inp.norm_weight.dtype) if needs[2] else None
        db = db.to(inp.norm_bias.dtype) if needs[3] else None
        return dp if needs[0] else None, dc if needs[1] else None, dw, db


@register
class MaskSimilarityCuda(_MaskSimilarityKernels, CudaImpl):
    pass


@register
class MaskSimilaritySimt(_MaskSimilarityKernels, SimtImpl):
    pass
