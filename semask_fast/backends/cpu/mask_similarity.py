"""mask_similarity from ``csrc/cpu/mask_similarity.cpp`` (native cpu backend).

Forward: one product per block of patch rows against the classes packed transposed and scaled by
their inverse norms, the patch norms and the optional LayerNorm over K applied on the tile.  It
keeps the cosines (the output itself when that is all it is) and the inverse norms, so backward
runs only its two products, dP and dC, with deterministic sums across row blocks.  The LayerNorm
parameters enter in the compute type (float32; float64 for float64 features) and their gradients
are returned in the parameters' own dtype.
"""

from __future__ import annotations

import torch

from ...ops.mask_similarity import MaskSimilarityInputs
from ..registry import register
from . import CpuImpl


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _affine(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


@register
class MaskSimilarityCpu(CpuImpl):
    op = "mask_similarity"

    def forward(self, inp: MaskSimilarityInputs):
        acc = _compute_dtype(inp.patches.dtype)
        out, scores, rinv_p, rinv_c = self.library().mask_similarity_forward(
            inp.patches.contiguous(), inp.classes.contiguous(), _affine(inp.norm_weight, acc),
            _affine(inp.norm_bias, acc), inp.norm, inp.norm_eps)
        # An empty scores tensor means the output holds the cosines (no LayerNorm, fp32 / fp64).
        return (out,), (out if scores.numel() == 0 else scores, rinv_p, rinv_c)

    def backward(self, inp: MaskSimilarityInputs, saved, grad_outputs):
        scores, rinv_p, rinv_c = saved
        acc = _compute_dtype(inp.patches.dtype)
        dp, dc, dw, db = self.library().mask_similarity_backward(
            grad_outputs[0].contiguous(), inp.patches.contiguous(), inp.classes.contiguous(), scores, rinv_p,
            rinv_c, _affine(inp.norm_weight, acc), inp.norm, inp.norm_eps)
        dw = None if inp.norm_weight is None else dw.to(inp.norm_weight.dtype)
        db = None if inp.norm_bias is None else db.to(inp.norm_bias.dtype)
        return dp, dc, dw, db
