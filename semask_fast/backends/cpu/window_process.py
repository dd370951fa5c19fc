"""window_partition / window_merge from ``csrc/cpu/window_process.cpp`` (native cpu backend).

Parallel row copies (one memcpy per run of tokens consecutive in both tensors): bitwise exact for
every dtype, any H and W (zero padding), both pad/roll orders, non-square windows.  Partition and
merge are each other's gradient, so each op's backward runs the other direction.
"""

from __future__ import annotations

from ...ops.window_process import WindowMergeInputs, WindowPartitionInputs
from ..registry import register
from . import CpuImpl


@register
class WindowPartitionCpu(CpuImpl):
    op = "window_partition"

    def forward(self, inp: WindowPartitionInputs):
        out = self.library().window_partition_forward(inp.x.contiguous(), *inp.window_size, *inp.shift_size,
                                                      inp.pad_then_roll)
        return (out,), ()

    def backward(self, inp: WindowPartitionInputs, saved, grad_outputs):
        _, h, w, _ = inp.x.shape
        grad = self.library().window_partition_backward(grad_outputs[0].contiguous(), h, w, *inp.window_size,
                                                        *inp.shift_size, inp.pad_then_roll)
        return (grad,)


@register
class WindowMergeCpu(CpuImpl):
    op = "window_merge"

    def forward(self, inp: WindowMergeInputs):
        out = self.library().window_merge_forward(inp.windows.contiguous(), inp.H, inp.W, *inp.window_size,
                                                  *inp.shift_size, inp.pad_then_roll)
        return (out,), ()

    def backward(self, inp: WindowMergeInputs, saved, grad_outputs):
        grad = self.library().window_merge_backward(grad_outputs[0].contiguous(), *inp.window_size,
                                                    *inp.shift_size, inp.pad_then_roll)
        return (grad,)
