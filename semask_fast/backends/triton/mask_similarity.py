"""Triton implementation of ``mask_similarity`` (kernels in ``semask_fast.kernels.mask_similarity``)."""

from __future__ import annotations

from typing import List

import torch

from ..registry import register
from . import TritonImpl


@register
class MaskSimilarityTriton(TritonImpl):
    op = "mask_similarity"

    def input_reasons(self, inp) -> List[str]:
        from ...kernels.mask_similarity import MAX_K

        k = inp.classes.shape[1]
        if k > MAX_K:
            return [f"classes K={k} (supported: 1..{MAX_K}; a program holds all K columns)"]
        return []

    def forward(self, inp, seed: int):
        from ...kernels.mask_similarity import mask_similarity_forward

        patches, classes = inp.patches.contiguous(), inp.classes.contiguous()
        out, rp, rc = mask_similarity_forward(patches, classes, _contiguous(inp.norm_weight),
                                              _contiguous(inp.norm_bias), norm=inp.norm, eps=inp.norm_eps)
        return (out,), (rp, rc)

    def residuals_like(self, inp):
        (b, n_p, _), k = inp.patches.shape, inp.classes.shape[1]
        return (inp.patches.new_empty((b, n_p), dtype=torch.float32),
                inp.patches.new_empty((b, k), dtype=torch.float32))  # inverse norms

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels skip dP or dC when autograd does not need them.
        from ...kernels.mask_similarity import mask_similarity_backward

        rp, rc = residuals
        dp, dc, dw, db = mask_similarity_backward(inp.patches.contiguous(), inp.classes.contiguous(),
                                                  _contiguous(inp.norm_weight), rp, rc, grad_outputs[0].contiguous(),
                                                  norm=inp.norm, eps=inp.norm_eps, needs=(needs[0], needs[1]))
        dw = dw.to(inp.norm_weight.dtype) if needs[2] else None
        db = db.to(inp.norm_bias.dtype) if needs[3] else None
        return dp, dc, dw, db


def _contiguous(t):
    return None if t is None else t.contiguous()
