"""Triton implementation of ``mask_similarity`` (kernels in ``semask_fast.kernels.mask_similarity``)."""

from __future__ import annotations

from typing import List

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

    def forward(self, inp):
        from ...kernels.mask_similarity import mask_similarity_forward

        patches, classes = inp.patches.contiguous(), inp.classes.contiguous()
        weight = inp.norm_weight.contiguous() if inp.norm_weight is not None else None
        bias = inp.norm_bias.contiguous() if inp.norm_bias is not None else None
        out, rp, rc = mask_similarity_forward(patches, classes, weight, bias, norm=inp.norm, eps=inp.norm_eps)
        saved = (patches, classes, rp, rc) + ((weight,) if weight is not None else ())
        return (out,), saved

    def backward(self, inp, saved, grad_outputs):
        from ...kernels.mask_similarity import mask_similarity_backward

        patches, classes, rp, rc = saved[:4]
        weight = saved[4] if len(saved) > 4 else None
        dp, dc, dw, db = mask_similarity_backward(patches, classes, weight, rp, rc, grad_outputs[0].contiguous(),
                                                  norm=inp.norm, eps=inp.norm_eps)
        dw = dw.to(inp.norm_weight.dtype) if inp.norm_weight is not None else None
        db = db.to(inp.norm_bias.dtype) if inp.norm_bias is not None else None
        return dp, dc, dw, db
