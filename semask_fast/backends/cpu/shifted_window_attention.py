"""Zero-copy ``shifted_window_attention`` from ``csrc/cpu/window_attention.cpp`` (the ``cpu`` backend).

The window-attention engine in image mode: each (window, head) task finds its tokens in the
(B, H, W, 3*h*d) qkv image by the pad / roll arithmetic (pad tokens read ``qkv_bias``) and writes
its output rows straight into the (B, H, W, h*d) image; backward writes dqkv in image layout and
sums what reaches the pad tokens into d(qkv_bias), in chunk order (reproducible).
"""

from __future__ import annotations

from typing import List

import torch

from ..registry import register
from . import CpuImpl
from .window_attention import as_compute, compute_dtype, window_reasons


@register
class ShiftedWindowAttentionCpu(CpuImpl):
    op = "shifted_window_attention"
    source = "window_attention.cpp"

    def input_reasons(self, inp) -> List[str]:
        return window_reasons(inp.window_size[0] * inp.window_size[1])

    @staticmethod
    def _pad_row(inp) -> torch.Tensor:
        # Pad tokens are zero before the qkv projection, so they carry its bias, in qkv's dtype.
        qkv = inp.qkv
        if inp.qkv_bias is None:
            return torch.zeros(qkv.shape[-1], dtype=qkv.dtype, device=qkv.device)
        return inp.qkv_bias.to(qkv.dtype).contiguous()

    def _args(self, inp, seed: int):
        return (inp.num_heads, *inp.window_size, *inp.shift_size, inp.pad_then_roll, inp.scale, inp.mask_value,
                inp.dropout_p, seed)

    def forward(self, inp, seed: int):
        out, lse = self.library().shifted_window_attention_forward(
            inp.qkv.contiguous(), as_compute(inp.bias_table, inp.qkv.dtype), self._pad_row(inp),
            *self._args(inp, seed))
        return (out,), (lse,)

    def residuals_like(self, inp):
        n = inp.window_size[0] * inp.window_size[1]
        windows = inp.qkv.shape[0] * inp.grid[0] * inp.grid[1]
        return (inp.qkv.new_empty((windows, inp.num_heads, n), dtype=compute_dtype(inp.qkv.dtype)),)  # lse

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels skip the table and qkv_bias gradients when autograd does not need them.
        dqkv, dtable, dpad = self.library().shifted_window_attention_backward(
            grad_outputs[0].contiguous(), inp.qkv.contiguous(), residuals[0],
            as_compute(inp.bias_table, inp.qkv.dtype), self._pad_row(inp), *self._args(inp, seed), needs[1],
            needs[2])
        dtable = dtable.to(inp.bias_table.dtype) if needs[1] else None
        dbias = dpad.to(inp.qkv_bias.dtype) if needs[2] else None
        return dqkv, dtable, dbias
