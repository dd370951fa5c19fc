"""atm_attention from ``csrc/ops/atm_attention.cu`` (cuda and SIMT-harness backends).

The forward kernel writes both outputs: the attention output and the head-mean
pre-softmax logits (B, Nq, Nk) (the (B, h, Nq, Nk) logits never exist in memory).
A block takes 16 class tokens, a range of keys and every head, in two passes over
the range (pass 1: head-mean logits and every head's softmax statistics; pass 2:
P v with the final statistics).  With one range (the default when the grid fills
the device) it writes the outputs directly; with several, fp32 partials merged by
a combine kernel.  :func:`plan_splits` picks the number of ranges.  Backward takes
both gradients: dS_h = P (dP - rowsum(dP P)) + dM / h.  Dropout uses the same
Philox hash as window_attention, element index ``((b * h + head) * Nq + i) * Nk + j``.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from ...ops.atm_attention import ATMAttentionInputs
from ..registry import register
from . import CudaImpl, SimtImpl

MAX_HEAD_DIM = 128
#: Query rows and keys per forward tile (BM, BN in the .cu).
BLOCK_ROWS, BLOCK_KEYS = 16, 32
#: The device the harness stands for: an H100 SXM (132 SMs, 227 KiB of shared memory per block).
HARNESS_DEVICE = (132, 232448)
#: Roofline figures of the split model (H100 SXM): DRAM bytes/s, dense FLOP/s on tensor cores
#: (fp16/bf16) and on FFMA (fp32).
H100_BANDWIDTH, H100_TENSOR_FLOPS, H100_FP32_FLOPS = 3.35e12, 989e12, 67e12

#: Tests set this to run the forward with this many key ranges (normalised: clamped to
#: 1..key tiles, none empty) instead of the plan.
force_splits: Optional[int] = None


def _padded_head_dim(head_dim: int) -> int:
    return 32 if head_dim <= 32 else 64 if head_dim <= 64 else 128


def forward_smem_bytes(dtype: torch.dtype, head_dim: int, heads: int) -> int:
    """Shared memory of a forward block (mirrors fwd_smem_bytes in the .cu): every head's row
    max and sum (16 rows, fp32), and per warp its q and k tiles and a region holding, in turn,
    its two head-sum tiles of the logits (pass 1) and its v tile (and fp32 output rows, pass 2)."""
    dp = _padded_head_dim(head_dim)
    bm, bn = BLOCK_ROWS, BLOCK_KEYS
    if dtype == torch.float32:
        warps = 2 if dp > 32 else 4
        q, k, pass2 = 4 * bm * dp, 4 * bn * (dp + 1), 4 * (bn * (dp + 1) + bm * dp)
    else:
        warps = 4
        q, k = 2 * bm * (dp + 8), 2 * bn * (dp + 8)
        pass2 = k
    return 2 * 4 * heads * bm + warps * (q + k + max(pass2, 2 * 4 * bm * bn))


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

    ``requested`` (tests) is normalised by :func:`_normalised`.  Otherwise the count, among
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
def _device_limits(device: torch.device) -> Tuple[int, int]:
    if device.type != "cuda":
        return HARNESS_DEVICE
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.shared_memory_per_block_optin


class _ATMAttentionKernels:
    op = "atm_attention"

    def input_reasons(self, inp: ATMAttentionInputs) -> List[str]:
        d = inp.q.shape[-1]
        if d > MAX_HEAD_DIM:
            return [f"head_dim={d} (supported: 1..{MAX_HEAD_DIM})"]
        heads = inp.q.shape[1]
        need, limit = forward_smem_bytes(inp.q.dtype, d, heads), _device_limits(inp.q.device)[1]
        if need > limit:  # fp32 with head_dim > 64 on a 99 KiB (sm_86 / sm_89) device, or very many heads
            return [f"dtype={inp.q.dtype} head_dim={d} heads={heads}: the forward needs {need} bytes of shared "
                    f"memory per block (this device: {limit})"]
        return []

    def forward(self, inp: ATMAttentionInputs, seed: int):
        q, k, v = (t.contiguous() for t in (inp.q, inp.k, inp.v))
        splits = plan_splits(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.dtype, q.shape[3],
                             sms=_device_limits(q.device)[0], requested=force_splits)
        out, mask_logits, lse = self.library().atm_attention_forward(q, k, v, inp.scale, inp.dropout_p, seed, splits)
        return (out, mask_logits), (lse,)

    def residuals_like(self, inp: ATMAttentionInputs):
        return (inp.q.new_empty(inp.q.shape[:3], dtype=torch.float32),)  # lse

    def backward(self, inp: ATMAttentionInputs, outputs, residuals, grad_outputs, needs, seed: int):
        # The kernels compute every gradient (needs is not passed down yet).
        q, k, v = (t.contiguous() for t in (inp.q, inp.k, inp.v))
        dout, dmask = (g.contiguous() for g in grad_outputs)
        return tuple(self.library().atm_attention_backward(dout, dmask, q, k, v, outputs[0], residuals[0], inp.scale,
                                                           inp.dropout_p, seed))


@register
class ATMAttentionCuda(_ATMAttentionKernels, CudaImpl):
    pass


@register
class ATMAttentionSimt(_ATMAttentionKernels, SimtImpl):
    pass
