"""atm_attention from ``csrc/ops/atm_attention.cu`` (cuda and SIMT-harness backends).

The forward kernel writes both outputs: the attention output and the head-mean
pre-softmax logits (B, Nq, Nk) (the (B, h, Nq, Nk) logits never exist in memory).
It is split over keys: a block takes 16 class tokens, one range of keys and every
head, and the ranges are merged by a combine kernel (fp32 partials, split order).
:func:`plan_splits` picks the number of ranges.  Backward takes both gradients:
dS_h = P (dP - rowsum(dP P)) + dM / h.  Dropout uses the same Philox hash as
window_attention, element index ``((b * h + head) * Nq + i) * Nk + j``.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from ...ops.atm_attention import ATMAttentionInputs
from ..registry import register
from . import CudaImpl, SimtImpl
from .window_attention import draw_seed

MAX_HEAD_DIM = 128
#: Query rows and keys per forward tile, and key tiles per split at most (BM, BN, kMaxSplitTiles in the .cu).
BLOCK_ROWS, BLOCK_KEYS, MAX_SPLIT_TILES = 16, 32, 8
#: The device the harness stands for when it plans splits: an H100 SXM (132 SMs, 227 KiB of
#: shared memory per block).
HARNESS_DEVICE = (132, 232448)

#: Tests set this to run the forward with this many key splits (normalised by plan_splits:
#: clamped to 1..key tiles, at most MAX_SPLIT_TILES tiles each, none empty) instead of the plan.
force_splits: Optional[int] = None


def _padded_head_dim(head_dim: int) -> int:
    return 32 if head_dim <= 32 else 64 if head_dim <= 64 else 128


def forward_smem_bytes(dtype: torch.dtype, head_dim: int, split_keys: int) -> int:
    """Shared memory of a forward block (mirrors fwd_smem_bytes in the .cu): per warp, its
    fp32 head-sum tile of the logits (16 x split_keys) and its q, k, v (and fp32 output) tiles."""
    dp = _padded_head_dim(head_dim)
    if dtype == torch.float32:
        warps = 2 if dp > 32 else 4
        tiles = 4 * (2 * BLOCK_ROWS * dp + 2 * BLOCK_KEYS * (dp + 1) + 2 * BLOCK_ROWS)
    else:
        warps = 4
        tiles = 2 * (BLOCK_ROWS + 2 * BLOCK_KEYS) * (dp + 8)
    return warps * (4 * BLOCK_ROWS * split_keys + tiles)


def plan_splits(batch: int, nq: int, nk: int, dtype: torch.dtype, head_dim: int, *, sms: int, smem_limit: int,
                requested: Optional[int] = None) -> int:
    """Number of key ranges of the forward.

    Without ``requested``: enough ranges that the grid, ceil(Nq / 16) x B x splits blocks,
    covers about two waves of ``sms`` multiprocessors.  Every range holds the same number of
    32-key tiles, at most MAX_SPLIT_TILES and at most what fits ``smem_limit``; no range is empty.
    """
    tiles = math.ceil(nk / BLOCK_KEYS)
    if requested is None:
        requested = math.ceil(2 * sms / (batch * math.ceil(nq / BLOCK_ROWS)))
    per_split = math.ceil(tiles / min(max(requested, 1), tiles))
    # input_reasons refuses inputs whose one-tile range does not fit.
    fits = max((t for t in range(1, MAX_SPLIT_TILES + 1)
                if forward_smem_bytes(dtype, head_dim, t * BLOCK_KEYS) <= smem_limit), default=1)
    return math.ceil(tiles / min(per_split, fits))


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
        need, limit = forward_smem_bytes(inp.q.dtype, d, BLOCK_KEYS), _device_limits(inp.q.device)[1]
        if need > limit:  # fp32 with head_dim > 64 on a 99 KiB (sm_86 / sm_89) device
            return [f"dtype={inp.q.dtype} head_dim={d}: the forward needs {need} bytes of shared memory per block "
                    f"(this device: {limit})"]
        return []

    def forward(self, inp: ATMAttentionInputs):
        seed = draw_seed() if inp.dropout_p > 0 else 0
        q, k, v = (t.contiguous() for t in (inp.q, inp.k, inp.v))
        sms, smem_limit = _device_limits(q.device)
        splits = plan_splits(q.shape[0], q.shape[2], k.shape[2], q.dtype, q.shape[3], sms=sms, smem_limit=smem_limit,
                             requested=force_splits)
        out, mask_logits, lse = self.library().atm_attention_forward(q, k, v, inp.scale, inp.dropout_p, seed, splits)
        return (out, mask_logits), (out, lse, torch.tensor(seed, dtype=torch.int64))

    def backward(self, inp: ATMAttentionInputs, saved, grad_outputs):
        out, lse, seed = saved
        q, k, v = (t.contiguous() for t in (inp.q, inp.k, inp.v))
        dout, dmask = (g.contiguous() for g in grad_outputs)
        return tuple(self.library().atm_attention_backward(dout, dmask, q, k, v, out, lse, inp.scale, inp.dropout_p,
                                                           int(seed)))


@register
class ATMAttentionCuda(_ATMAttentionKernels, CudaImpl):
    pass


@register
class ATMAttentionSimt(_ATMAttentionKernels, SimtImpl):
    pass
