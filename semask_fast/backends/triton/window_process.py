"""Triton implementations of ``window_partition`` and ``window_merge`` (each the other's backward)."""

from __future__ import annotations

from ..registry import register
from . import TritonImpl


def _kernels():
    from semask_fast.kernels import window_process as k

    return k


@register
class WindowPartitionTriton(TritonImpl):
    op = "window_partition"

    def forward(self, inp, seed: int):
        return (_kernels().window_partition(inp.x, inp.window_size, inp.shift_size, inp.pad_then_roll),), ()

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed: int):
        h, w = inp.x.shape[1:3]
        return (_kernels().window_merge(grad_outputs[0], inp.window_size, inp.shift_size, h, w, inp.pad_then_roll),)


@register
class WindowMergeTriton(TritonImpl):
    op = "window_merge"

    def forward(self, inp, seed: int):
        return (_kernels().window_merge(inp.windows, inp.window_size, inp.shift_size, inp.H, inp.W,
                                        inp.pad_then_roll),), ()

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed: int):
        win = _kernels().window_partition(grad_outputs[0], inp.window_size, inp.shift_size, inp.pad_then_roll)
        return (win.view(inp.windows.shape),)
