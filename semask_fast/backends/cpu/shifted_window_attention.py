"""Zero-copy ``shifted_window_attention`` from ``csrc/cpu/window_attention.cpp`` (the ``cpu`` backend).

The window-attention engine in image mode: each (window, head) task finds its tokens in the
(B, H, W, 3*h*d) qkv image by the pad / roll arithmetic (pad tokens read ``qkv_bias``) and writes
its output rows straight into the (B, H, W, h*d) image; backward writes dqkv in image layout and
sums what reaches the pad tokens into d(qkv_bias), in chunk order (reproducible).
"""

from __future__ import annotations

from typing import List

import torch

from ..cuda.window_attention import draw_seed
from ..registry import register
from . import CpuImpl
from .window_attention import as_compute, window_reasons


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

    def forward(self, inp):
        seed = draw_seed() if inp.dropout_p > 0 else 0
        out, lse = self.library().shifted_window_attention_forward(
            inp.qkv.contiguous(), as_compute(inp.bias_table, inp.qkv.dtype), self._pad_row(inp),
            *self._args(inp, seed))
        return (out,), (out, lse, torch.tensor(seed, dtype=torch.int64))

    def backward(self, inp, saved, grad_outputs):
        out, lse, seed = saved
        dqkv, dtable, dpad = self.library().shifted_window_attention_backward(
            grad_outputs[0].contiguous(), inp.qkv.contiguous(), out, lse, as_compute(inp.bias_table, inp.qkv.dtype),
            self._pad_row(inp), *self._args(inp, int(seed)))
        dtable = None if inp.bias_table is None else dtable.to(inp.bias_table.dtype)
        dbias = None if inp.qkv_bias is None else dpad.to(inp.qkv_bias.dtype)
        return dqkv, dtable, dbias
