"""window_partition / window_merge from ``csrc/ops/window_process.cu`` (cuda and SIMT-harness backends).

The kernels are gather copies over raw bytes: bitwise exact for every dtype, any H and W
(zero padding), both pad/roll orders, non-square windows.  Partition and merge are each other's
gradient, so each op's backward launches the other direction.
"""

from __future__ import annotations

from ...ops.window_process import WindowMergeInputs, WindowPartitionInputs
from ..registry import register
from . import CudaImpl, SimtImpl


class _WindowPartitionKernels:
    op = "window_partition"

    def forward(self, inp: WindowPartitionInputs, seed: int):
        out = self.library().window_partition_forward(inp.x.contiguous(), *inp.window_size, *inp.shift_size,
                                                      inp.pad_then_roll)
        return (out,), ()

    def backward(self, inp: WindowPartitionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        _, h, w, _ = inp.x.shape
        grad = self.library().window_partition_backward(grad_outputs[0].contiguous(), h, w, *inp.window_size,
                                                        *inp.shift_size, inp.pad_then_roll)
        return (grad,)


class _WindowMergeKernels:
    op = "window_merge"

    def forward(self, inp: WindowMergeInputs, seed: int):
        out = self.library().window_merge_forward(inp.windows.contiguous(), inp.H, inp.W, *inp.window_size,
                                                  *inp.shift_size, inp.pad_then_roll)
        return (out,), ()

    def backward(self, inp: WindowMergeInputs, outputs, residuals, grad_outputs, needs, seed: int):
        grad = self.library().window_merge_backward(grad_outputs[0].contiguous(), *inp.window_size,
                                                    *inp.shift_size, inp.pad_then_roll)
        return (grad,)


@register
class WindowPartitionCuda(_WindowPartitionKernels, CudaImpl):
    pass


@register
class WindowPartitionSimt(_WindowPartitionKernels, SimtImpl):
    pass


@register
class WindowMergeCuda(_WindowMergeKernels, CudaImpl):
    pass


@register
class WindowMergeSimt(_WindowMergeKernels, SimtImpl):
    pass
