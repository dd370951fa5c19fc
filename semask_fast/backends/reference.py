"""The reference backend: :mod:`semask_fast.reference` behind the backend interface.

It serves every validated input on every device and dtype (float64 included),
differentiable through autograd.  Dropout draws from torch's generator.
"""

from __future__ import annotations

from typing import Any, FrozenSet, List, Tuple

import torch

from .. import reference as ref
from .base import OpImpl, note_ran
from .registry import register


class ReferenceImpl(OpImpl):
    backend = "reference"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cpu", "cuda"})  # and any other device PyTorch runs on

    def not_supported_reasons(self, inp: Any) -> List[str]:
        return []

    def run(self, inp: Any) -> Tuple[torch.Tensor, ...]:
        note_ran(self.op, self.backend, "forward")
        out = self.compute(inp)
        return out if isinstance(out, tuple) else (out,)

    def compute(self, inp: Any):
        raise NotImplementedError


@register
class WindowAttentionReference(ReferenceImpl):
    op = "window_attention"

    def compute(self, inp):
        return ref.window_attention(inp.q, inp.k, inp.v, inp.bias_table, window_size=inp.window_size,
                                    shift_size=inp.shift_size, grid=inp.grid, mask=inp.mask, scale=inp.scale,
                                    mask_value=inp.mask_value, dropout_p=inp.dropout_p)


@register
class WindowPartitionReference(ReferenceImpl):
    op = "window_partition"

    def compute(self, inp):
        return ref.window_partition(inp.x, inp.window_size, inp.shift_size, inp.pad_then_roll)


@register
class WindowMergeReference(ReferenceImpl):
    op = "window_merge"

    def compute(self, inp):
        return ref.window_merge(inp.windows, inp.window_size, inp.shift_size, inp.H, inp.W, inp.pad_then_roll)


@register
class ShiftedWindowAttentionReference(ReferenceImpl):
    op = "shifted_window_attention"

    def compute(self, inp):
        return ref.shifted_window_attention(
            inp.qkv, inp.bias_table, num_heads=inp.num_heads, window_size=inp.window_size,
            shift_size=inp.shift_size, pad_then_roll=inp.pad_then_roll, qkv_bias=inp.qkv_bias, scale=inp.scale,
            mask_value=inp.mask_value, dropout_p=inp.dropout_p)


@register
class SemanticAttentionReference(ReferenceImpl):
    op = "semantic_attention"

    def compute(self, inp):
        return ref.semantic_attention(inp.sq, inp.sk, inp.yv)


@register
class ATMAttentionReference(ReferenceImpl):
    op = "atm_attention"

    def compute(self, inp):
        return ref.atm_attention(inp.q, inp.k, inp.v, scale=inp.scale, dropout_p=inp.dropout_p)


@register
class MaskSimilarityReference(ReferenceImpl):
    op = "mask_similarity"

    def compute(self, inp):
        return ref.mask_similarity(inp.patches, inp.classes, norm_weight=inp.norm_weight, norm_bias=inp.norm_bias,
                                   norm=inp.norm, norm_eps=inp.norm_eps)
