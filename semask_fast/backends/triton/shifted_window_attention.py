"""Triton implementation of the zero-copy ``shifted_window_attention``.

The window-attention kernels in image mode: q, k, v are read straight from the
(B, H, W, 3*h*d) qkv image (pad, roll and partition by index arithmetic; pad
tokens take ``qkv_bias``) and the output is written un-rolled and cropped to
(B, H, W, h*d).  Backward writes dqkv in image layout; the gradient reaching pad
tokens is summed into d(qkv_bias).
"""

from __future__ import annotations

from typing import List

import torch

from ..registry import register
from . import TritonImpl
from .window_attention import geometry_reasons, unit_stride


def _kernels():
    from semask_fast.kernels import window_attention as k

    return k


@register
class ShiftedWindowAttentionTriton(TritonImpl):
    op = "shifted_window_attention"

    def input_reasons(self, inp) -> List[str]:
        return geometry_reasons(inp.head_dim, inp.window_size[0] * inp.window_size[1])

    @staticmethod
    def _prepare(inp):
        qkv = unit_stride(inp.qkv)
        b, h, w, _ = qkv.shape
        grid = inp.grid
        geo = _kernels().Geometry(inp.window_size, b * grid[0] * grid[1], inp.num_heads, inp.head_dim, grid=grid,
                                  shift=inp.shift_size, image_hw=(h, w), pad_then_roll=inp.pad_then_roll)
        padded = h % inp.window_size[0] != 0 or w % inp.window_size[1] != 0
        # Without pad tokens the qkv bias plays no part in the attention.
        qkv_bias = inp.qkv_bias if padded else None
        return qkv, geo, qkv_bias

    def forward(self, inp, seed):
        qkv, geo, qkv_bias = self._prepare(inp)
        out, lse = _kernels().shifted_window_attention_forward(
            qkv, geo, inp.bias_table, qkv_bias, scale=inp.scale, mask_value=inp.mask_value, dropout_p=inp.dropout_p,
            seed=seed)
        return (out,), (lse,)

    def residuals_like(self, inp):
        n = inp.window_size[0] * inp.window_size[1]
        windows = inp.qkv.shape[0] * inp.grid[0] * inp.grid[1]
        return (inp.qkv.new_empty((windows, inp.num_heads, n), dtype=torch.float32),)  # lse

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed):
        # The kernels skip dqkv, the table gradient or the qkv-bias gradient when autograd does not
        # need them.
        qkv, geo, qkv_bias = self._prepare(inp)
        dqkv, d_table, d_qkv_bias = _kernels().shifted_window_attention_backward(
            qkv, outputs[0], unit_stride(grad_outputs[0]), residuals[0], geo, inp.bias_table, qkv_bias,
            scale=inp.scale, mask_value=inp.mask_value, dropout_p=inp.dropout_p, seed=seed, needs=tuple(needs))
        if needs[2] and d_qkv_bias is None:  # no pad tokens: the qkv bias reaches no attention input
            d_qkv_bias = torch.zeros_like(inp.qkv_bias)
        return dqkv, d_table, d_qkv_bias
