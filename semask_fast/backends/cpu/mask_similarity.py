"""mask_similarity from ``csrc/cpu/mask_similarity.cpp`` (native cpu backend).

Forward: the classes packed in 6-row panels scaled by their inverse norms, times the patches
transposed a depth block at a time (patches in vector lanes), the patch norms and the optional
LayerNorm over K applied on the tile.  It keeps the cosines (the output itself when that is all it
is) and the inverse norms.  Backward, one pass per batch: dP and dC (= G^T P, accumulated over row
blocks in order) from the same L2-resident rows of P, with the LayerNorm gradient.  The LayerNorm
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
    matrix_unit = True

    def forward(self, inp: MaskSimilarityInputs, seed: int):
        acc = _compute_dtype(inp.patches.dtype)
        out, scores, rinv_p, rinv_c = self.library().mask_similarity_forward(
            inp.patches.contiguous(), inp.classes.contiguous(), _affine(inp.norm_weight, acc),
            _affine(inp.norm_bias, acc), inp.norm, inp.norm_eps)
        # An empty scores tensor means the output holds the cosines (no LayerNorm, fp32 / fp64).
        return (out,), (scores, rinv_p, rinv_c)

    def residuals_like(self, inp: MaskSimilarityInputs):
        acc = _compute_dtype(inp.patches.dtype)
        (b, n_p, _), k = inp.patches.shape, inp.classes.shape[1]
        scores_in_out = not inp.norm and inp.patches.dtype == acc
        scores = inp.patches.new_empty((0,) if scores_in_out else (b, n_p, k), dtype=acc)
        return scores, inp.patches.new_empty((b, n_p), dtype=acc), inp.patches.new_empty((b, k), dtype=acc)

    def backward(self, inp: MaskSimilarityInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels skip dP or dC when autograd does not need them.
        scores, rinv_p, rinv_c = residuals
        acc = _compute_dtype(inp.patches.dtype)
        dp, dc, dw, db = self.library().mask_similarity_backward(
            grad_outputs[0].contiguous(), inp.patches.contiguous(), inp.classes.contiguous(),
            outputs[0] if scores.numel() == 0 else scores, rinv_p, rinv_c, _affine(inp.norm_weight, acc), inp.norm,
            inp.norm_eps, needs[0], needs[1])
        dw = dw.to(inp.norm_weight.dtype) if needs[2] else None
        db = db.to(inp.norm_bias.dtype) if needs[3] else None
        return dp if needs[0] else None, dc if needs[1] else None, dw, db
