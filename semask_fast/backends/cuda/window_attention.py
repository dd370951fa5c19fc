"""window_attention from ``csrc/ops/window_attention.cu`` (cuda and SIMT-harness backends).

Forward saves the output and the fp32 row logsumexp; backward recomputes the
probabilities tile by tile (nothing N x N per window is stored) and returns a
bitwise reproducible bias-table gradient (per-chunk partials reduced in a fixed
order, no float atomics).  The bias table and an explicit mask enter the kernels
as fp32 (they are small); the table gradient is returned in the table's dtype.
Dropout keeps an element when ``philox(seed, ((b_ * h + head) * N + i) * N + j)``
clears ``p`` (replayed on the host by :func:`semask_fast.testing.dropout_keep`); forward and backward evaluate the same
hash, so no mask is stored.  fp16 / bf16 run on tensor cores; their forward and dK/dV
kernels pack the rows of consecutive (window, head) pairs into 64-row blocks, so a
7x7 window (N = 49) does not leave a quarter of each block idle; the dQ kernel packs
the rows of a window's heads (it keeps one window per step for the table gradient).
Windows of at most 64 tokens with head_dim <= 64 run one fused backward kernel instead
(every dtype: tensor cores for fp16 / bf16, FFMA for fp32), a block per (window, head):
q, k, v, dO are read once, and the table gradient is folded onto the table rows in the
block (see :func:`fused_backward`).  Gradients autograd does not need are not computed: no dK / dV
kernel (or products) without them, no dQ product without dq (its kernel still runs for the table).
:func:`windows_per_chunk` plans the table gradient's chunks (:func:`windows_per_chunk_override`
replaces the plan for measurements and tests).

q, k, v and dO are read in place with any window, head and row strides (the timm drop-in passes
q, k, v as permuted views of one fused (B_, N, 3, h, d) projection, and its dO arrives as a
transposed view); only a non-unit last-dim stride is copied.  Outputs and gradients are contiguous.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, List, Optional

import torch

from ... import _build
from ...ops.window_attention import WindowAttentionInputs
from ..base import unit_last_stride
from ..registry import register
from . import CudaImpl, SimtImpl


#: The kernels' instances: head_dim padded (zeros in shared memory) to the smallest of these tiles
#: that holds it, every dtype.  The one owner of the head_dim limit: the build compiles a unit per
#: (dtype, tile) and generates the list the .cu's dispatch and head_dim check are written from
#: (semask_fast/_build.py); the reasons below come from it.
INSTANCES = _build.Instances("head_dim", (32, 64, 128))

#: dQ blocks to keep (about one wave of a large GPU) before windows are packed into chunks.
DQ_MIN_BLOCKS = 128
#: Share of the backward's minimum traffic the table-gradient partials (written once, read
#: once) may take when there are enough windows to pack.
PARTIAL_TRAFFIC_SHARE = 0.1
#: Cap on the partial-sum buffer, in floats.
MAX_PARTIAL_FLOATS = 1 << 22


def fused_backward(n: int, head_dim: int, dtype: torch.dtype) -> bool:
    """The plan: whether the backward runs the fused one-tile kernel (N <= 64, head_dim <= 64, any
    dtype: q, k, v, dO read once, table partials folded), passed to the kernels, which check that
    the fused kernel serves the shape (``fused_backward_serves`` in the .cu) and raise otherwise."""
    return n <= 64 and head_dim <= 64


def windows_per_chunk(batch: int, heads: int, n: int, head_dim: int, dtype: torch.dtype) -> int:
    """Consecutive windows whose dS the backward sums into one fp32 partial of the table
    gradient: (h, N, N) per chunk, or (h, table rows) for the fused kernel.  The partials cost
    2 * chunks * slice bytes (written once, read once by the reduction); the backward's minimum
    is 8 * B_ * h * N * d * itemsize (q, k, v, dO read, dq, dk, dv written).  Packing k windows
    keeps the partials under PARTIAL_TRAFFIC_SHARE of it (k >= 10 N / (d * itemsize) for the
    (h, N, N) slices), but makes each block k times longer, so the grid (chunks x blocks per
    window) keeps at least DQ_MIN_BLOCKS blocks: at small batches the partials stay per window
    (parallelism first).  A function of the shape only, so the table gradient's summation
    order is reproducible."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if fused_backward(n, head_dim, dtype):  # a block per head of a window
        blocks_per_window = heads
        slice_bytes = heads * 4 * n * 4  # (2Wh - 1)(2Ww - 1) < 4 N table rows
    elif dtype == torch.float32:  # FFMA dQ kernel: a block per (head, 16-row tile)
        blocks_per_window = heads * -(-n // 16)
        slice_bytes = heads * n * n * 4
    else:  # tensor-core dQ kernel: the window's heads packed into 64-row blocks
        blocks_per_window = -(-heads * n // 64)
        slice_bytes = heads * n * n * 4
    budget = -(-2 * slice_bytes // int(PARTIAL_TRAFFIC_SHARE * 8 * heads * n * head_dim * itemsize))
    wave = max(1, batch * blocks_per_window // DQ_MIN_BLOCKS)
    memory = -(-batch * (slice_bytes // 4) // MAX_PARTIAL_FLOATS)
    return max(1, min(budget, wave, batch), memory)


#: The windows per chunk :func:`windows_per_chunk_override` asks for in the current context (None: the plan).
_requested_per_chunk: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("window_windows_per_chunk",
                                                                                     default=None)


@contextlib.contextmanager
def windows_per_chunk_override(per_chunk: Optional[int]) -> Iterator[None]:
    """Run the CUDA / harness window backwards inside the block with ``per_chunk`` windows per
    table-gradient chunk instead of :func:`windows_per_chunk`'s plan (clamped to the batch by the
    kernels; None restores the plan).  A measurement and testing hook, like ATM's
    ``forward_splits``: scoped to the block and to the calling thread / task (a context variable),
    nested blocks restore the outer choice.  The table gradient is the same for every chunking up
    to rounding, and bitwise reproducible for each."""
    if per_chunk is not None and per_chunk < 1:
        raise ValueError(f"windows per chunk must be >= 1, got {per_chunk}")
    token = _requested_per_chunk.set(per_chunk)
    try:
        yield
    finally:
        _requested_per_chunk.reset(token)


def _geometry(inp: WindowAttentionInputs):
    """(grid_h, grid_w, shift_h, shift_w) as the kernels take them: a grid only for the shift mask."""
    if inp.shifted:
        return (*inp.grid, *inp.shift_size)
    return (0, 0, 0, 0)


class _WindowAttentionKernels:
    op = "window_attention"

    def input_reasons(self, inp: WindowAttentionInputs) -> List[str]:
        d = inp.q.shape[-1]
        return [f"head_dim={d} (supported: 1..{INSTANCES.limit})"] if d > INSTANCES.limit else []

    @staticmethod
    def _fp32(t):
        return None if t is None else t.float().contiguous()

    def _args(self, inp: WindowAttentionInputs, seed):
        return (self._fp32(inp.bias_table), self._fp32(inp.mask), *inp.window_size, *_geometry(inp), inp.scale,
                inp.mask_value, inp.dropout_p, seed)

    @staticmethod
    def _per_chunk(inp: WindowAttentionInputs) -> int:
        if inp.bias_table is None:
            return 1  # no partials: one window per dQ block
        requested = _requested_per_chunk.get()
        return requested if requested is not None else windows_per_chunk(*inp.q.shape, inp.q.dtype)

    def forward(self, inp: WindowAttentionInputs, seed):
        q, k, v = (unit_last_stride(t) for t in (inp.q, inp.k, inp.v))
        out, lse = self.library().window_attention_forward(q, k, v, *self._args(inp, seed))
        return (out,), (lse,)

    def residuals_like(self, inp: WindowAttentionInputs):
        return (inp.q.new_empty(inp.q.shape[:3], dtype=torch.float32),)  # lse

    def backward(self, inp: WindowAttentionInputs, outputs, residuals, grad_outputs, needs, seed):
        # The kernels skip what autograd does not need: the table gradient (partials and reduction),
        # dq (its product; its kernel unless the table needs it), dk and dv (their kernel, or products).
        q, k, v = (unit_last_stride(t) for t in (inp.q, inp.k, inp.v))
        dq, dk, dv, dtable = self.library().window_attention_backward(
            unit_last_stride(grad_outputs[0]), q, k, v, outputs[0], residuals[0], *self._args(inp, seed),
            self._per_chunk(inp), fused_backward(*inp.q.shape[2:], inp.q.dtype), needs[0], needs[1] or needs[2],
            needs[3])
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dtable.to(inp.bias_table.dtype) if needs[3] else None)


@register
class WindowAttentionCuda(_WindowAttentionKernels, CudaImpl):
    pass


@register
class WindowAttentionSimt(_WindowAttentionKernels, SimtImpl):
    pass
