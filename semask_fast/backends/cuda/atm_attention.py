"""atm_attention from ``csrc/ops/atm_attention.cu`` (cuda and SIMT-harness backends).

The forward kernel writes both outputs: the attention output and the head-mean
pre-softmax logits (B, Nq, Nk) (the (B, h, Nq, Nk) logits never exist in memory).
A block takes 16 class tokens, a range of keys and every head, in two passes over
the range (pass 1: head-mean logits and every head's softmax statistics; pass 2:
P v with the final statistics).  With one range (the default when the grid fills
the device) it writes the outputs directly; with several, fp32 partials merged by
a combine kernel.  :func:`plan_splits` picks the number of ranges (:func:`forward_splits`
overrides it for measurements and tests).  Backward takes both gradients:
dS_h = P (dP - rowsum(dP P)) + dM / h.  Dropout uses the same Philox hash as
window_attention, element index ``((b * h + head) * Nq + i) * Nk + j``.

q, k, v and the gradients dO, dM are read in place with any batch, head and row strides
(e.g. SegViT's ATM layer passes q, k, v as permuted views of one fused projection);
only a non-unit last-dim stride is copied.  Outputs and gradients are contiguous.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator, List, Optional

import torch

from ... import _build
from ...ops.atm_attention import ATMAttentionInputs
from ..base import unit_last_stride
from ..registry import register
from . import CudaImpl, SimtImpl, cuda_index

#: The kernels' instances: head_dim padded to the smallest of these tiles that holds it, every
#: dtype.  The one owner of the head_dim limit: the build compiles a unit per (dtype, tile) and
#: generates the list the .cu's dispatch and head_dim checks are written from (semask_fast/_build.py);
#: the reasons below come from it.
INSTANCES = _build.Instances("head_dim", (32, 64, 128))
#: Query rows and keys per forward tile (BM, BN in the .cu).
BLOCK_ROWS, BLOCK_KEYS = 16, 32
#: Multiprocessors of the device the harness stands for in the split plan: an H100 SXM.
HARNESS_MULTIPROCESSORS = 132
#: Roofline figures of the split model (H100 SXM): DRAM bytes/s, dense FLOP/s on tensor cores
#: (fp16/bf16) and on FFMA (fp32).
H100_BANDWIDTH, H100_TENSOR_FLOPS, H100_FP32_FLOPS = 3.35e12, 989e12, 67e12

#: The key-range count :func:`forward_splits` asks for in the current context (None: the plan).
_requested_splits: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("atm_forward_splits",
                                                                                  default=None)


@contextlib.contextmanager
def forward_splits(splits: Optional[int]) -> Iterator[None]:
    """Run the CUDA / harness ATM forwards inside the block with ``splits`` key ranges instead of
    :func:`plan_splits`'s choice (normalised as there: clamped to 1..key tiles, none empty; None
    restores the plan).  A measurement and testing hook, like ``torch.nn.attention.sdpa_kernel``:
    scoped to the block and to the calling thread / task (a context variable), nested blocks
    restore the outer choice.  Results are the same for every count up to rounding."""
    token = _requested_splits.set(splits)
    try:
        yield
    finally:
        _requested_splits.reset(token)


def _normalised(splits: int, tiles: int) -> int:
    """The range count the kernel runs for ``splits``: ranges of ceil(tiles / splits) key
    tiles each, so none is empty."""
    splits = min(max(splits, 1), tiles)
    return math.ceil(tiles / math.ceil(tiles / splits))


def split_model_seconds(splits: int, batch: int, heads: int, nq: int, nk: int, head_dim: int, dtype: torch.dtype,
                        sms: int) -> float:
    """Modelled time of the forward with ``splits`` key ranges (a roofline MODEL, not a measurement):

        max(bytes / bandwidth, flops / (peak * min(1, blocks / sms)))

    bytes: q, k, v read and out, M, lse written once, plus for splits > 1 the fp32 partials
    (output and logsumexp per range and row) written by the forward and read by the combine,
    and q read again by every further range; flops: 6 B h Nq Nk d (S twice, P v once);
    blocks: ceil(Nq / 16) B splits, each on one SM.  H100 SXM bandwidth and peak
    (tensor cores for fp16/bf16, FFMA for fp32).
    """
    e = torch.finfo(dtype).bits // 8
    rows = batch * heads * nq
    q_bytes = rows * head_dim * e
    kv_bytes = 2 * batch * heads * nk * head_dim * e
    nbytes = 2 * q_bytes + kv_bytes + batch * nq * nk * e + 4 * rows
    if splits > 1:
        nbytes += 2 * splits * rows * (head_dim + 1) * 4 + (splits - 1) * q_bytes
    flops = 6 * batch * heads * nq * nk * head_dim
    peak = H100_FP32_FLOPS if dtype == torch.float32 else H100_TENSOR_FLOPS
    blocks = math.ceil(nq / BLOCK_ROWS) * batch * splits
    return max(nbytes / H100_BANDWIDTH, flops / (peak * min(1.0, blocks / sms)))


def plan_splits(batch: int, heads: int, nq: int, nk: int, dtype: torch.dtype, head_dim: int, *, sms: int,
                requested: Optional[int] = None) -> int:
    """Number of key ranges of the forward.

    ``requested`` (:func:`forward_splits`) is normalised by :func:`_normalised`.  Otherwise the count, among
    those that leave no range empty, minimising :func:`split_model_seconds` (ties: the
    smaller): one range as soon as the grid fills the ``sms`` multiprocessors, more for a
    small grid over long key ranges, as long as the partials' traffic does not cost more
    than the parallelism gains.  A model: nothing here was timed on a GPU.
    """
    tiles = math.ceil(nk / BLOCK_KEYS)
    if requested is not None:
        return _normalised(requested, tiles)
    candidates = sorted({_normalised(s, tiles) for s in range(1, tiles + 1)})
    return min(candidates, key=lambda s: (split_model_seconds(s, batch, heads, nq, nk, head_dim, dtype, sms), s))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """Multiprocessors of the inputs' device (the split plan's input); the harness models an H100."""
    if device.type != "cuda":
        return HARNESS_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


class _ATMAttentionKernels:
    op = "atm_attention"

    def input_reasons(self, inp: ATMAttentionInputs) -> List[str]:
        d = inp.q.shape[-1]
        if d > INSTANCES.limit:
            return [f"head_dim={d} (supported: 1..{INSTANCES.limit})"]
        if inp.q.device.type not in self.supported_devices():
            return []  # the device reason says it
        # The C++ side owns the forward's shared memory (every head's row statistics and the warps'
        # tiles): fp32 with head_dim > 64 on a 99 KiB sm_86 / sm_89 device, or very many heads, exceed it.
        need, limit = self.library().atm_attention_shared_memory(inp.q.dtype, d, inp.q.shape[1],
                                                                 cuda_index(inp.q.device))
        if need > limit:
            return [f"dtype={inp.q.dtype} head_dim={d} heads={inp.q.shape[1]}: the forward needs {need} bytes of "
                    f"shared memory per block ({inp.q.device} gives {limit})"]
        return []

    def forward(self, inp: ATMAttentionInputs, seed):
        q, k, v = (unit_last_stride(t) for t in (inp.q, inp.k, inp.v))
        splits = plan_splits(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype, q.shape[3],
                             sms=_multiprocessors(q.device), requested=_requested_splits.get())
        out, mask_logits, lse = self.library().atm_attention_forward(q, k, v, inp.scale, inp.dropout_p, seed, splits)
        return (out, mask_logits), (lse,)

    def residuals_like(self, inp: ATMAttentionInputs):
        return (inp.q.new_empty(inp.q.shape[:3], dtype=torch.float32),)  # lse

    def backward(self, inp: ATMAttentionInputs, outputs, residuals, grad_outputs, needs, seed):
        # dq and (dk, dv) come from separate kernels, each launched only when autograd needs it.
        q, k, v = (unit_last_stride(t) for t in (inp.q, inp.k, inp.v))
        dout, dmask = (unit_last_stride(g) for g in grad_outputs)
        grads = self.library().atm_attention_backward(dout, dmask, q, k, v, outputs[0], residuals[0], inp.scale,
                                                      inp.dropout_p, seed, needs[0], needs[1] or needs[2])
        return tuple(g if need else None for g, need in zip(grads, needs))


@register
class ATMAttentionCuda(_ATMAttentionKernels, CudaImpl):
    pass


@register
class ATMAttentionSimt(_ATMAttentionKernels, SimtImpl):
    pass
