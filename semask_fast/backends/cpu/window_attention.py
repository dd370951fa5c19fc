"""window_attention from ``csrc/cpu/window_attention.cpp`` (the ``cpu`` backend).

A task per (window, head): S^T = K (Q scale)^T in per-thread tiles with the queries in vector
lanes, bias gathered and shift mask computed in the kernel, softmax down the key rows, O = P V.
Forward saves the row logsumexp; backward recomputes P per task (nothing N x N per window reaches
memory) and takes rowsum(dO O) as rowsum(P dP) from its tiles, in float32 (not from the output
rounded to float16 / bfloat16).  The bias table gradient is summed over chunks of windows fixed by
the shape and reduced in chunk order: bitwise reproducible for any thread count.  q, k and v are
read in place with their strides (timm's permuted views of one qkv tensor are not copied).
Dropout replays the GPU kernels' Philox hash (``semask_fast.backends.cuda.window_attention``).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ...ops.window_attention import WindowAttentionInputs
from ..base import unit_last_stride
from ..registry import register
from . import CpuImpl

#: Beyond this the per-thread tiles (four N x N fp32 tiles in backward) outgrow the caches.
MAX_WINDOW_TOKENS = 1024


def window_reasons(n: int) -> List[str]:
    return [f"window of N={n} tokens (supported: N <= {MAX_WINDOW_TOKENS})"] if n > MAX_WINDOW_TOKENS else []


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic: fp64 for double inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_compute(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A small operand (table, mask) in the kernels' compute dtype, contiguous."""
    return None if t is None else t.to(compute_dtype(dtype)).contiguous()


def _geometry(inp: WindowAttentionInputs):
    """(grid_h, grid_w, shift_h, shift_w): a grid only for the computed shift mask."""
    if inp.shifted:
        return (*inp.grid, *inp.shift_size)
    return (0, 0, 0, 0)


@register
class WindowAttentionCpu(CpuImpl):
    op = "window_attention"

    def input_reasons(self, inp: WindowAttentionInputs) -> List[str]:
        return window_reasons(inp.q.shape[2])

    def _args(self, inp: WindowAttentionInputs, seed: int):
        dtype = inp.q.dtype
        return (as_compute(inp.bias_table, dtype), as_compute(inp.mask, dtype), *inp.window_size, *_geometry(inp),
                inp.scale, inp.mask_value, inp.dropout_p, seed)

    def forward(self, inp: WindowAttentionInputs, seed: int):
        q, k, v = (unit_last_stride(t) for t in (inp.q, inp.k, inp.v))
        out, lse = self.library().window_attention_forward(q, k, v, *self._args(inp, seed))
        return (out,), (lse,)

    def residuals_like(self, inp: WindowAttentionInputs):
        return (inp.q.new_empty(inp.q.shape[:3], dtype=compute_dtype(inp.q.dtype)),)  # lse

    def backward(self, inp: WindowAttentionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels skip what autograd does not need: dQ, dK with dV, the table gradient.
        q, k, v = (unit_last_stride(t) for t in (inp.q, inp.k, inp.v))
        need_dkv = needs[1] or needs[2]
        dq, dk, dv, dtable = self.library().window_attention_backward(
            grad_outputs[0].contiguous(), q, k, v, residuals[0], *self._args(inp, seed), needs[0],
            need_dkv, needs[3])
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dtable.to(inp.bias_table.dtype) if needs[3] else None)
