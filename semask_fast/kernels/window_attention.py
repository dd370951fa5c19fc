"""Swin (shifted-)window attention in Triton, forward and backward.

One kernel pair serves two layouts, chosen by the ``IMAGE`` constexpr:

* window layout: q, k, v, out of shape (B*nW, h, N, d), any strides with a unit
  last stride (``window_attention``);
* image layout ("zero-copy"): q, k, v read straight from the qkv projection's
  (B, H, W, 3*h*d) image and the output written to (B, H, W, h*d); the pad,
  the cyclic roll and the partition are index arithmetic (``shifted_window_attention``).

A program owns ``WPP`` consecutive windows of one head.  Each window is cut
into ``NT`` query tiles and ``NT`` key tiles of ``BLOCK`` tokens: N <= 64 is one
tile (bias gather and mask computed once per tile), larger windows loop over
key tiles with an online softmax.  The relative-position bias is gathered from
the table with the index computed in the kernel; the SW-MSA mask is computed
from the token coordinates (or read from an explicit (nW, N, N) mask).  The
forward saves the fp32 row logsumexp; nothing of size (B*nW, h, N, N) is
written.  Dropout uses Philox (``tl.rand``) keyed by (seed, window, head, i, j),
so backward replays the forward's keep-mask.

Backward recomputes the probabilities from the logsumexp.  The bias-table gradient is a
fixed-shape tree, bitwise reproducible, no atomics: each program sums dS over its windows
into its own fp32 partial (G, h, N, N), G = B*nW / WPP; a fold program per (table rows,
head, chunk of CHUNK ~ sqrt(G) groups) folds the (i, j) pairs onto the table rows over its
chunk in order; the chunks are summed in order (Swin-T stage 1, B=128: G = 512, chunks of
32, 528 fold programs; serial loops ~sqrt(G)).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import AOTConfig, Plan, dot_fp32, interpreter_tiles, p2
from ._common import (ORDERED_SUM_PLAN, dropout_keep, dropped, load_seed, mm, ordered_sum, ordered_sum_kernel,
                      seed_tensor, softmax_step)

# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #


@triton.jit
def _tokens(b_, n, nW, nWw, H, W, sy, sx, WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr,
            IMAGE: tl.constexpr, PAD_THEN_ROLL: tl.constexpr):
    """Coordinates of tokens ``n`` of window ``b_``: (img, y, x, py, px, real), ``img`` the batch row
    (image layout: the image; window layout: the window), (y, x) where the token lives in memory
    (window layout: y = n, x = 0), (py, px) its position on the padded, rolled grid (for the shift
    mask) and ``real`` whether it exists in memory (False for tile padding and, in image layout, for
    pad tokens)."""
    w = b_ % nW
    img = b_ // nW
    py = (w // nWw) * WH + n // WW
    px = (w % nWw) * WW + n % WW
    inside = n < N
    if IMAGE:
        hp = (nW // nWw) * WH
        wp = nWw * WW
        if PAD_THEN_ROLL:
            y = (py + sy) % hp
            x = (px + sx) % wp
            real = inside & (y < H) & (x < W)
        else:
            real = inside & (py < H) & (px < W)
            y = (py + sy) % H
            x = (px + sx) % W
    else:
        img = b_ + 0 * nW
        y = n
        x = n * 0
        real = inside
    return img, y, x, py, px, real


@triton.jit
def _offsets(img, y, x, hh, s_b, s_h, s_y, s_x):
    # 64-bit: an activation may hold more than 2^31 elements.
    return img.to(tl.int64) * s_b + hh.to(tl.int64) * s_h + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x


@triton.jit
def _load_tile(ptr, offs, real, inside, d, QKVB, qkvb_off, D: tl.constexpr, HAS_QKVB: tl.constexpr):
    """(BLOCK, BLOCK_D) tile; pad tokens of the image layout take the qkv bias."""
    dm = d < D
    t = tl.load(ptr + offs[:, None] + d[None, :], mask=real[:, None] & dm[None, :], other=0.0)
    if HAS_QKVB:
        bias = tl.load(QKVB + qkvb_off + d, mask=dm, other=0.0).to(t.dtype)
        pad = inside & (real == 0)
        t = tl.where(pad[:, None], bias[None, :], t)
    return t


@triton.jit
def _store_tile(ptr, offs, real, d, x, D: tl.constexpr):
    tl.store(ptr + offs[:, None] + d[None, :], x.to(ptr.dtype.element_ty), mask=real[:, None] & (d < D)[None, :])


@triton.jit
def _key_rows(K, V, QKVB, b_, hh, j, d, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x, HEADS, nW, nWw, H, W, sy, sx,
              WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr, D: tl.constexpr, IMAGE: tl.constexpr,
              PAD_THEN_ROLL: tl.constexpr, HAS_QKVB: tl.constexpr):
    """k, v tiles of keys ``j`` of window b_ and the keys' coordinates (see :func:`_tokens`)."""
    img, y, x, py, px, real = _tokens(b_, j, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE, PAD_THEN_ROLL)
    k = _load_tile(K, _offsets(img, y, x, hh, sk_b, sk_h, sk_y, sk_x), real, j < N, d, QKVB, HEADS * D + hh * D, D,
                   HAS_QKVB)
    v = _load_tile(V, _offsets(img, y, x, hh, sv_b, sv_h, sv_y, sv_x), real, j < N, d, QKVB, 2 * HEADS * D + hh * D,
                   D, HAS_QKVB)
    return k, v, img, y, x, py, px, real


@triton.jit
def _region(p, length, window: tl.constexpr, shift):
    # Official SW-MSA slices (0, -ws), (-ws, -s), (-s, None) on one axis; s == 0 is one region.
    r = (p >= length - window).to(tl.int32) + (p >= length - shift).to(tl.int32)
    return tl.where(shift > 0, r, 0)


@triton.jit
def _logits(q, k, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt, sth, MASK, smw, smi, smj, nW, nWw, sy, sx,
            scale, mask_value, N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, HAS_TABLE: tl.constexpr,
            MASK_MODE: tl.constexpr, DOT_FP32: tl.constexpr):
    """fp32 logits scale*q.k^T + bias + mask of one (query tile, key tile); -inf on padded keys."""
    s = mm(q, tl.trans(k), DOT_FP32) * scale
    valid = (i[:, None] < N) & (j[None, :] < N)
    if HAS_TABLE:
        yi = i // WW
        xi = i % WW
        yj = j // WW
        xj = j % WW
        idx = (yi[:, None] - yj[None, :] + WH - 1) * (2 * WW - 1) + (xi[:, None] - xj[None, :] + WW - 1)
        s += tl.load(TABLE + idx * stt + hh * sth, mask=valid, other=0.0).to(tl.float32)
    if MASK_MODE == 1:  # explicit (nW, N, N) additive mask
        w = (b_ % nW).to(tl.int64)
        s += tl.load(MASK + w * smw + i[:, None] * smi + j[None, :] * smj, mask=valid, other=0.0).to(tl.float32)
    if MASK_MODE == 2:  # shift mask from the grid
        hp = (nW // nWw) * WH
        wp = nWw * WW
        ri = _region(pyi, hp, WH, sy) * 3 + _region(pxi, wp, WW, sx)
        rj = _region(pyj, hp, WH, sy) * 3 + _region(pxj, wp, WW, sx)
        s += tl.where(ri[:, None] == rj[None, :], 0.0, mask_value)
    return tl.where(j[None, :] < N, s, float("-inf"))


@triton.jit
def _keep(seed, b_, hh, HEADS, i, j, N: tl.constexpr, dropout_p):
    """Dropout keep-mask of (window b_, head hh, i, j)."""
    return dropout_keep(seed, b_.to(tl.int64) * HEADS + hh, i[:, None], j[None, :], N, N, dropout_p)


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


@triton.jit
def window_attention_fwd_kernel(
        Q, K, V, O, LSE, TABLE, MASK, QKVB, SEED,
        sq_b, sq_h, sq_y, sq_x, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x, so_b, so_h, so_y, so_x,
        stt, sth, smw, smi, smj,
        HEADS, nW, nWw, H, W, sy, sx, scale, mask_value, dropout_p,
        N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr, NT: tl.constexpr, WPP: tl.constexpr, IMAGE: tl.constexpr,
        PAD_THEN_ROLL: tl.constexpr, HAS_TABLE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_QKVB: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    seed = load_seed(SEED, DROPOUT)
    g = tl.program_id(0)
    hh = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    for wi in range(WPP):
        b_ = g * WPP + wi
        for qt in range(NT):
            i = qt * BLOCK + r
            img, y, x, pyi, pxi, real_i = _tokens(b_, i, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE, PAD_THEN_ROLL)
            q = _load_tile(Q, _offsets(img, y, x, hh, sq_b, sq_h, sq_y, sq_x), real_i, i < N, d, QKVB, hh * D, D,
                           HAS_QKVB)
            m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK,), tl.float32)
            acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
            for kt in range(NT):
                j = kt * BLOCK + r
                k, v, _, _, _, pyj, pxj, _ = _key_rows(K, V, QKVB, b_, hh, j, d, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h,
                                                       sv_y, sv_x, HEADS, nW, nWw, H, W, sy, sx, WH, WW, N, D, IMAGE,
                                                       PAD_THEN_ROLL, HAS_QKVB)
                s = _logits(q, k, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt, sth, MASK, smw, smi, smj, nW, nWw,
                            sy, sx, scale, mask_value, N, WH, WW, HAS_TABLE, MASK_MODE, DOT_FP32)
                m_i, alpha, p, l_i = softmax_step(m_i, l_i, s)
                if DROPOUT:
                    p = dropped(p, _keep(seed, b_, hh, HEADS, i, j, N, dropout_p), dropout_p)
                acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_FP32)
            _store_tile(O, _offsets(img, y, x, hh, so_b, so_h, so_y, so_x), real_i, d, acc / l_i[:, None], D)
            tl.store(LSE + (b_.to(tl.int64) * HEADS + hh) * N + i, m_i + tl.log(l_i), mask=i < N)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


@triton.jit
def _query_rows(Q, O, DO, LSE, QKVB, b_, hh, i, d, sq_b, sq_h, sq_y, sq_x, so_b, so_h, so_y, so_x, sdo_b, sdo_h,
                sdo_y, sdo_x, HEADS, nW, nWw, H, W, sy, sx, WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr,
                D: tl.constexpr, IMAGE: tl.constexpr, PAD_THEN_ROLL: tl.constexpr, HAS_QKVB: tl.constexpr):
    """q and dO tiles of queries ``i``, their D = rowsum(dO * O) and logsumexp, and their coordinates."""
    img, y, x, py, px, real = _tokens(b_, i, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE, PAD_THEN_ROLL)
    q = _load_tile(Q, _offsets(img, y, x, hh, sq_b, sq_h, sq_y, sq_x), real, i < N, d, QKVB, hh * D, D, HAS_QKVB)
    do = _load_tile(DO, _offsets(img, y, x, hh, sdo_b, sdo_h, sdo_y, sdo_x), real, i < N, d, QKVB, 0, D, False)
    o = _load_tile(O, _offsets(img, y, x, hh, so_b, so_h, so_y, so_x), real, i < N, d, QKVB, 0, D, False)
    o_delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + (b_.to(tl.int64) * HEADS + hh) * N + i, mask=i < N, other=0.0)
    return q, do, o_delta, lse, img, y, x, py, px, real


@triton.jit
def _grad_scores(q, k, v, do, o_delta, lse, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt, sth, MASK, smw, smi,
                 smj, nW, nWw, sy, sx, scale, mask_value, seed, HEADS, dropout_p,
                 N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, HAS_TABLE: tl.constexpr,
                 MASK_MODE: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """(p_dropped, dS) of one tile: P from the saved logsumexp, dS = P * (dP - rowsum(dO * O))."""
    s = _logits(q, k, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt, sth, MASK, smw, smi, smj, nW, nWw, sy, sx,
                scale, mask_value, N, WH, WW, HAS_TABLE, MASK_MODE, DOT_FP32)
    p = tl.exp(s - lse[:, None])
    dp = mm(do, tl.trans(v), DOT_FP32)
    p_drop = p
    if DROPOUT:
        keep = _keep(seed, b_, hh, HEADS, i, j, N, dropout_p)
        p_drop = dropped(p, keep, dropout_p)
        dp = dropped(dp, keep, dropout_p)
    ds = p * (dp - o_delta[:, None])
    ds = tl.where((i[:, None] < N) & (j[None, :] < N), ds, 0.0)
    return p_drop, ds


@triton.jit
def _pad_sum(x, n, real, N: tl.constexpr):
    """Column sums of x over the pad tokens among ``n`` (the qkv-bias gradient)."""
    return tl.sum(tl.where(((n < N) & (real == 0))[:, None], x, 0.0), 0)


@triton.jit
def window_attention_bwd_kernel(
        Q, K, V, O, DO, LSE, DQ, DK, DV, DT_PART, DB_PART, TABLE, MASK, QKVB, SEED,
        sq_b, sq_h, sq_y, sq_x, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x, so_b, so_h, so_y, so_x,
        sdo_b, sdo_h, sdo_y, sdo_x, sdq_b, sdq_h, sdq_y, sdq_x, sdk_b, sdk_h, sdk_y, sdk_x, sdv_b, sdv_h, sdv_y,
        sdv_x, stt, sth, smw, smi, smj,
        HEADS, nW, nWw, H, W, sy, sx, scale, mask_value, dropout_p,
        N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr, NT: tl.constexpr, WPP: tl.constexpr, IMAGE: tl.constexpr,
        PAD_THEN_ROLL: tl.constexpr, HAS_TABLE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_QKVB: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, WANT_DQ: tl.constexpr, WANT_DKV: tl.constexpr,
        WANT_DTABLE: tl.constexpr, WANT_DQKVB: tl.constexpr):
    seed = load_seed(SEED, DROPOUT)
    # WANT_*: the gradients autograd needs (needs_input_grad); the qkv-bias gradient sums dq, dk, dv
    # over pad tokens, so it needs them computed even where they are not stored.
    COMPUTE_DQ: tl.constexpr = WANT_DQ or WANT_DQKVB
    COMPUTE_DKV: tl.constexpr = WANT_DKV or WANT_DQKVB
    g = tl.program_id(0)
    hh = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    # This program's own slice of the partial dS sums: (NT*BLOCK, NT*BLOCK) fp32.
    part = DT_PART + (g.to(tl.int64) * HEADS + hh) * (NT * BLOCK) * (NT * BLOCK)
    ds_acc = tl.zeros((BLOCK, BLOCK), tl.float32)  # used when the window is one tile
    # qkv-bias gradient: sum of dq, dk, dv over pad tokens (image layout only).
    dbq = tl.zeros((BLOCK_D,), tl.float32)
    dbk = tl.zeros((BLOCK_D,), tl.float32)
    dbv = tl.zeros((BLOCK_D,), tl.float32)
    for wi in range(WPP):
        b_ = g * WPP + wi
        for kt in range(NT):
            j = kt * BLOCK + r
            k, v, imgj, yj, xj, pyj, pxj, real_j = _key_rows(
                K, V, QKVB, b_, hh, j, d, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x, HEADS, nW, nWw, H, W, sy, sx,
                WH, WW, N, D, IMAGE, PAD_THEN_ROLL, HAS_QKVB)
            dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)
            dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
            for qt in range(NT):
                i = qt * BLOCK + r
                q, do, o_delta, lse, img, y, x, pyi, pxi, real_i = _query_rows(
                    Q, O, DO, LSE, QKVB, b_, hh, i, d, sq_b, sq_h, sq_y, sq_x, so_b, so_h, so_y, so_x, sdo_b, sdo_h,
                    sdo_y, sdo_x, HEADS, nW, nWw, H, W, sy, sx, WH, WW, N, D, IMAGE, PAD_THEN_ROLL, HAS_QKVB)
                p_drop, ds = _grad_scores(q, k, v, do, o_delta, lse, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt,
                                          sth, MASK, smw, smi, smj, nW, nWw, sy, sx, scale, mask_value, seed, HEADS,
                                          dropout_p, N, WH, WW, HAS_TABLE, MASK_MODE, DROPOUT, DOT_FP32)
                if COMPUTE_DKV:
                    dv += mm(tl.trans(p_drop.to(do.dtype)), do, DOT_FP32)
                    dk += mm(tl.trans(ds.to(q.dtype)), q, DOT_FP32)
                if NT == 1:
                    if COMPUTE_DQ:
                        dq = mm(ds.to(k.dtype), k, DOT_FP32) * scale
                        if WANT_DQ:
                            _store_tile(DQ, _offsets(img, y, x, hh, sdq_b, sdq_h, sdq_y, sdq_x), real_i, d, dq, D)
                        if WANT_DQKVB:
                            dbq += _pad_sum(dq, i, real_i, N)
                    if WANT_DTABLE:
                        ds_acc += ds
                else:
                    if WANT_DTABLE:
                        # Read-modify-write of this program's own slice: deterministic, no atomics.  The
                        # first window stores without reading, so the buffer needs no zero fill.
                        # Only the N x N real pairs are stored (the reduction reads no others).
                        pp = part + i[:, None] * (NT * BLOCK) + j[None, :]
                        real_pair = (i[:, None] < N) & (j[None, :] < N)
                        later = tl.full((BLOCK, BLOCK), wi, tl.int32) > 0
                        tl.store(pp, tl.load(pp, mask=later & real_pair, other=0.0) + ds, mask=real_pair)
                        tl.debug_barrier()
            dk = dk * scale
            if WANT_DKV:
                _store_tile(DK, _offsets(imgj, yj, xj, hh, sdk_b, sdk_h, sdk_y, sdk_x), real_j, d, dk, D)
                _store_tile(DV, _offsets(imgj, yj, xj, hh, sdv_b, sdv_h, sdv_y, sdv_x), real_j, d, dv, D)
            if WANT_DQKVB:
                dbk += _pad_sum(dk, j, real_j, N)
                dbv += _pad_sum(dv, j, real_j, N)
        if NT > 1 and COMPUTE_DQ:
            # dq of each query tile, looping over the key tiles (recomputes P).
            for qt in range(NT):
                i = qt * BLOCK + r
                q, do, o_delta, lse, img, y, x, pyi, pxi, real_i = _query_rows(
                    Q, O, DO, LSE, QKVB, b_, hh, i, d, sq_b, sq_h, sq_y, sq_x, so_b, so_h, so_y, so_x, sdo_b, sdo_h,
                    sdo_y, sdo_x, HEADS, nW, nWw, H, W, sy, sx, WH, WW, N, D, IMAGE, PAD_THEN_ROLL, HAS_QKVB)
                dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
                for kt in range(NT):
                    j = kt * BLOCK + r
                    k, v, _, _, _, pyj, pxj, _ = _key_rows(
                        K, V, QKVB, b_, hh, j, d, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x, HEADS, nW, nWw, H, W,
                        sy, sx, WH, WW, N, D, IMAGE, PAD_THEN_ROLL, HAS_QKVB)
                    _, ds = _grad_scores(q, k, v, do, o_delta, lse, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt, sth,
                                         MASK, smw, smi, smj, nW, nWw, sy, sx, scale, mask_value, seed, HEADS,
                                         dropout_p, N, WH, WW, HAS_TABLE, MASK_MODE, DROPOUT, DOT_FP32)
                    dq += mm(ds.to(k.dtype), k, DOT_FP32)
                dq = dq * scale
                if WANT_DQ:
                    _store_tile(DQ, _offsets(img, y, x, hh, sdq_b, sdq_h, sdq_y, sdq_x), real_i, d, dq, D)
                if WANT_DQKVB:
                    dbq += _pad_sum(dq, i, real_i, N)
    if NT == 1:
        if WANT_DTABLE:
            tl.store(part + r[:, None] * BLOCK + r[None, :], ds_acc, mask=(r[:, None] < N) & (r[None, :] < N))
    if WANT_DQKVB:
        # (G, 3, HEADS, D) partial sums, reduced on the host in a fixed order.
        db = DB_PART + g.to(tl.int64) * 3 * HEADS * D + hh * D + d
        tl.store(db, dbq, mask=d < D)
        tl.store(db + HEADS * D, dbk, mask=d < D)
        tl.store(db + 2 * HEADS * D, dbv, mask=d < D)


@triton.jit
def window_attention_table_fold_kernel(
        DT_PART, DT_CHUNKS, G, HEADS, R,
        N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr, CHUNK: tl.constexpr):
    """chunks[c, r, h] = sum over the groups g of chunk c (in order) and the pairs (i, j) with
    idx[i, j] == r of partial[g, h, i, j].

    Table row r = (dy, dx) collects the pairs j = i - (dy - Wh + 1) * Ww - (dx - Ww + 1)
    whose coordinates stay inside the window: a gather, no colliding scatter.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    hh = tl.program_id(1)
    c = tl.program_id(2)
    i = tl.arange(0, BLOCK_I)
    ddy = rows // (2 * WW - 1) - (WH - 1)
    ddx = rows % (2 * WW - 1) - (WW - 1)
    yj = (i // WW)[None, :] - ddy[:, None]
    xj = (i % WW)[None, :] - ddx[:, None]
    ok = (rows[:, None] < R) & (i[None, :] < N) & (yj >= 0) & (yj < WH) & (xj >= 0) & (xj < WW)
    pair = i[None, :] * NP + yj * WW + xj
    acc = tl.zeros((BLOCK_R, BLOCK_I), tl.float32)
    for gi in range(CHUNK):
        g = c * CHUNK + gi
        base = (hh + g * HEADS).to(tl.int64) * NP * NP
        acc += tl.load(DT_PART + base + pair, mask=ok & (g < G), other=0.0)
    tl.store(DT_CHUNKS + (c.to(tl.int64) * R + rows) * HEADS + hh, tl.sum(acc, 1), mask=rows < R)


@triton.jit
def window_attention_keep_kernel(KEEP, SEED, HEADS, dropout_p, N: tl.constexpr, BLOCK: tl.constexpr):
    """Materialises the dropout keep-mask of window program_id(0), head program_id(1) (tests replay it)."""
    seed = load_seed(SEED, True)
    b_ = tl.program_id(0)
    hh = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    keep = _keep(seed, b_, hh, HEADS, i, i, N, dropout_p)
    base = (b_.to(tl.int64) * HEADS + hh) * N * N
    tl.store(KEEP + base + i[:, None] * N + i[None, :], keep.to(tl.int8), mask=(i[:, None] < N) & (i[None, :] < N))


# --------------------------------------------------------------------------- #
# Plans
# --------------------------------------------------------------------------- #

#: Largest window (and head dim) the forward handles as one tile; beyond it, multi-token tiles.
SINGLE_TILE_MAX = 64
#: Token tile of the multi-tile paths: 16 on GPUs.  Triton's interpreter costs per tile operation:
#: there the same kernel code runs with 32-token tiles, 4x fewer tile pairs.
MULTI_TILE = {False: 16, True: 32}
MAX_HEAD_DIM = 128

#: Programs to keep: forward about 4 per SM of a large GPU; backward about one wave
#: (heavier programs, and fewer partials: table-gradient traffic stays < 10% of the minimum).
FWD_MIN_PROGRAMS = 512
BWD_MIN_PROGRAMS = 128

#: Per-thread register cap handed to ptxas.  The score tiles and accumulators live in registers;
#: left to itself ptxas capped some configurations (2-warp fp32 forward, 8-warp fp32 backward on
#: sm_80) at 128 registers and spilled.  Shared memory, not registers, bounds occupancy here.
MAXNREG = 255


class Geometry:
    """Where the windows are: window layout (B*nW, h, N, d) or image layout (B, H, W, .)."""

    def __init__(self, window_size, num_windows: int, heads: int, head_dim: int, grid=None, shift=(0, 0),
                 image_hw: Optional[Tuple[int, int]] = None, pad_then_roll: bool = True):
        self.window_size = tuple(window_size)
        self.n = self.window_size[0] * self.window_size[1]
        self.num_windows, self.heads, self.head_dim = num_windows, heads, head_dim
        self.grid = tuple(grid) if grid is not None else (1, 1)
        self.shift = tuple(shift)
        self.image = image_hw is not None
        self.hw = tuple(image_hw) if self.image else (1, 1)
        self.pad_then_roll = pad_then_roll

    @property
    def nw(self) -> int:
        return self.grid[0] * self.grid[1]


def windows_per_program(num_windows: int, heads: int, min_programs: int) -> int:
    """Windows one program owns: the most of 16, 8, 4, 2 that divides B*nW and still leaves
    ``min_programs`` programs.  Packing amortises the launch and the per-tile index math
    and, in backward, divides the table-gradient partials (one N x N fp32 tile per program).
    A function of the shape only, so the table-gradient summation order is reproducible."""
    for wpp in (16, 8, 4, 2):
        if num_windows % wpp == 0 and (num_windows // wpp) * heads >= min_programs:
            return wpp
    return 1


def _plan(geo: Geometry, dtype, backward: bool, interpreter: bool) -> Plan:
    """Token tile, padded head dim and tiles per window, and the launch options.

    The half-precision forward takes a window of up to 64 tokens as one tile.  The
    backward (five live score tiles, dk/dv accumulators, per-row addressing), fp32
    (no tensor-core operands in ieee mode) and larger windows use 16-token tiles:
    32-token tiles still spill a few bytes in backward on sm_80/sm_90, 16 do not (see
    benchmarks/results/resources.md), and 16 divides N = 144 exactly.  Warps: chosen
    from the AOT table, no configuration spills on sm_80 or sm_90.
    """
    block_d = p2(geo.head_dim)
    block = p2(geo.n)
    if backward or dtype == torch.float32 or geo.n > SINGLE_TILE_MAX or block_d > 64:
        block = min(block, MULTI_TILE[interpreter])
    warps = 8 if backward or block >= 64 else 4 if block == 32 else 2
    wpp = windows_per_program(geo.num_windows, geo.heads, BWD_MIN_PROGRAMS if backward else FWD_MIN_PROGRAMS)
    return Plan(dict(BLOCK=block, BLOCK_D=block_d, NT=triton.cdiv(geo.n, block)), num_warps=warps, num_stages=1,
                maxnreg=MAXNREG, per_program=wpp)


def forward_plan(geo: Geometry, dtype, *, interpreter: Optional[bool] = None) -> Plan:
    """Tiles (BLOCK, BLOCK_D, NT), launch options and windows per program of the forward."""
    interpreter = interpreter_tiles(interpreter)
    return _plan(geo, dtype, False, interpreter)


def table_chunk(groups: int) -> int:
    """Groups one table-gradient fold program sums: ~sqrt(groups), a power of two, so the fold's
    serial loop and the number of chunk partials both stay ~sqrt(groups)."""
    return p2(math.isqrt(max(groups - 1, 0)) + 1, lo=1)


def backward_plan(geo: Geometry, dtype, *, interpreter: Optional[bool] = None) -> dict:
    """``{"main": ..., "table": ...}``: the backward kernel's plan (as :func:`forward_plan`) and the
    table-gradient fold's (rows per program, query tile, groups per chunk)."""
    interpreter = interpreter_tiles(interpreter)
    main = _plan(geo, dtype, True, interpreter)
    groups = geo.num_windows // main.per_program
    return dict(main=main, table=Plan(dict(BLOCK_R=16, BLOCK_I=p2(geo.n, lo=1), CHUNK=table_chunk(groups))))


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #


def _strides4(t: torch.Tensor, image: bool, head_dim: int):
    """(s_b, s_h, s_y, s_x) of a tensor as the kernel addresses it."""
    if image:  # (B, H, W, C), heads are channel blocks
        return t.stride(0), head_dim, t.stride(1), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), 0


def _geometry_args(geo: Geometry, table, mask):
    stt, sth = (table.stride(0), table.stride(1)) if table is not None else (0, 0)
    smw, smi, smj = mask.stride() if mask is not None else (0, 0, 0)
    nw = mask.shape[0] if mask is not None else geo.nw
    return (stt, sth, smw, smi, smj, geo.heads, nw, geo.grid[1], geo.hw[0], geo.hw[1], geo.shift[0], geo.shift[1])


def _flags(geo: Geometry, table, mask, qkv_bias, dropout_p, dtype) -> dict:
    return dict(N=geo.n, WH=geo.window_size[0], WW=geo.window_size[1], D=geo.head_dim, IMAGE=geo.image,
                PAD_THEN_ROLL=geo.pad_then_roll, HAS_TABLE=table is not None,
                MASK_MODE=1 if mask is not None else (2 if any(geo.shift) else 0),
                HAS_QKVB=qkv_bias is not None, DROPOUT=dropout_p > 0.0, DOT_FP32=dot_fp32(dtype))


def _programs(geo: Geometry, plan: Plan) -> int:
    """Programs per head: each owns ``plan.per_program`` consecutive windows."""
    if plan.per_program < 1 or geo.num_windows % plan.per_program:
        raise ValueError(f"plan.per_program={plan.per_program} must divide the B*nW={geo.num_windows} windows")
    return geo.num_windows // plan.per_program


def _launch_forward(q, k, v, out, geo: Geometry, table, mask, qkv_bias, scale, mask_value, dropout_p, seed,
                    plan: Optional[Plan]) -> torch.Tensor:
    """Runs the forward kernel into ``out``; returns the (B*nW, h, N) fp32 logsumexp."""
    plan = plan or forward_plan(geo, q.dtype)
    lse = torch.empty((geo.num_windows, geo.heads, geo.n), dtype=torch.float32, device=q.device)
    dummy = lse
    window_attention_fwd_kernel[(_programs(geo, plan), geo.heads)](
        q, k, v, out, lse, table if table is not None else dummy, mask if mask is not None else dummy,
        qkv_bias if qkv_bias is not None else dummy, seed_tensor(seed, q.device),
        *(s for t in (q, k, v, out) for s in _strides4(t, geo.image, geo.head_dim)),
        *_geometry_args(geo, table, mask), scale, mask_value, dropout_p,
        WPP=plan.per_program, **_flags(geo, table, mask, qkv_bias, dropout_p, q.dtype), **plan.launch())
    return lse


def _launch_backward(q, k, v, out, dout, lse, dq, dk, dv, geo: Geometry, table, mask, qkv_bias, scale, mask_value,
                     dropout_p, seed, plan: Optional[dict], want_table: bool, want_qkv_bias: bool):
    """Writes dq and dk, dv (same layouts as q, k, v) where given (None: not wanted, not computed
    unless the qkv-bias gradient needs them); returns (d_table or None, d_qkv_bias or None), computed
    only when wanted.

    The table gradient is bitwise reproducible: per-program partials, folded and summed in a fixed tree.
    """
    want_table = want_table and table is not None
    want_qkv_bias = want_qkv_bias and qkv_bias is not None
    plan = plan or backward_plan(geo, q.dtype)
    main, fold = plan["main"], plan["table"]
    groups = _programs(geo, main)
    np_ = main["NT"] * main["BLOCK"]
    part = torch.empty((groups, geo.heads, np_, np_) if want_table else (1,), dtype=torch.float32, device=q.device)
    db_part = torch.empty((groups, 3, geo.heads * geo.head_dim) if want_qkv_bias else (1,),
                          dtype=torch.float32, device=q.device)
    dummy = lse
    want = dict(WANT_DQ=dq is not None, WANT_DKV=dk is not None, WANT_DTABLE=want_table, WANT_DQKVB=want_qkv_bias)
    dq, dk, dv = (t if t is not None else dout for t in (dq, dk, dv))  # never written
    window_attention_bwd_kernel[(groups, geo.heads)](
        q, k, v, out, dout, lse, dq, dk, dv, part, db_part, table if table is not None else dummy,
        mask if mask is not None else dummy, qkv_bias if qkv_bias is not None else dummy, seed_tensor(seed, q.device),
        *(s for t in (q, k, v, out, dout, dq, dk, dv) for s in _strides4(t, geo.image, geo.head_dim)),
        *_geometry_args(geo, table, mask), scale, mask_value, dropout_p,
        WPP=main.per_program, **_flags(geo, table, mask, qkv_bias, dropout_p, q.dtype), **want, **main.launch())
    d_table = None
    if want_table:
        rows = table.shape[0]
        chunks = torch.empty((triton.cdiv(groups, fold["CHUNK"]), rows, geo.heads), dtype=torch.float32,
                             device=q.device)
        window_attention_table_fold_kernel[(triton.cdiv(rows, fold["BLOCK_R"]), geo.heads, chunks.shape[0])](
            part, chunks, groups, geo.heads, rows, N=geo.n, WH=geo.window_size[0], WW=geo.window_size[1], NP=np_,
            **fold.launch())
        d_table = ordered_sum(chunks, table.dtype)
    d_qkv_bias = None
    if want_qkv_bias:
        d_qkv_bias = db_part.sum(0).reshape(-1).to(qkv_bias.dtype)
    return d_table, d_qkv_bias


def window_attention_forward(q, k, v, geo: Geometry, table=None, mask=None, *, scale: float,
                             mask_value: float = -100.0, dropout_p: float = 0.0, seed: Union[int, torch.Tensor] = 0,
                             plan: Optional[Plan] = None):
    """(out, lse) of the window layout: q, k, v (B*nW, h, N, d) with a unit last stride; out contiguous,
    lse (B*nW, h, N) fp32.  ``plan``: as :func:`forward_plan`."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _launch_forward(q, k, v, out, geo, table, mask, None, scale, mask_value, dropout_p, seed, plan)
    return out, lse


def window_attention_backward(q, k, v, out, dout, lse, geo: Geometry, table=None, mask=None, *, scale: float,
                              mask_value: float = -100.0, dropout_p: float = 0.0, seed: Union[int, torch.Tensor] = 0,
                              plan: Optional[dict] = None, needs: Tuple[bool, bool, bool] = (True, True, True)):
    """(dq, dk, dv, d_table) of the window layout (dout with a unit last stride); ``needs`` says which of
    dq, (dk, dv), d_table to compute (the others come back None).  ``plan``: as :func:`backward_plan`."""
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) if need else None
                  for need in (needs[0], needs[1], needs[1]))
    d_table, _ = _launch_backward(q, k, v, out, dout, lse, dq, dk, dv, geo, table, mask, None, scale, mask_value,
                                  dropout_p, seed, plan, needs[2], False)
    return dq, dk, dv, d_table


def _qkv_blocks(t: torch.Tensor, geo: Geometry):
    c = geo.heads * geo.head_dim
    return t[..., :c], t[..., c:2 * c], t[..., 2 * c:]


def shifted_window_attention_forward(qkv, geo: Geometry, table=None, qkv_bias=None, *, scale: float,
                                     mask_value: float = -100.0, dropout_p: float = 0.0,
                                     seed: Union[int, torch.Tensor] = 0, plan: Optional[Plan] = None):
    """(out (B, H, W, h*d), lse) of the image layout: qkv (B, H, W, 3*h*d) with a unit last stride, read in
    place (``geo`` has ``image_hw``); pad tokens take ``qkv_bias`` (None: zeros)."""
    out = torch.empty(qkv.shape[:3] + (geo.heads * geo.head_dim,), dtype=qkv.dtype, device=qkv.device)
    lse = _launch_forward(*_qkv_blocks(qkv, geo), out, geo, table, None, qkv_bias, scale, mask_value, dropout_p,
                          seed, plan)
    return out, lse


def shifted_window_attention_backward(qkv, out, dout, lse, geo: Geometry, table=None, qkv_bias=None, *,
                                      scale: float, mask_value: float = -100.0, dropout_p: float = 0.0,
                                      seed: Union[int, torch.Tensor] = 0, plan: Optional[dict] = None,
                                      needs: Tuple[bool, bool, bool] = (True, True, True)):
    """(dqkv (B, H, W, 3*h*d), d_table, d_qkv_bias) of the image layout; ``needs`` says which of them
    to compute (the others come back None)."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device) if needs[0] else None
    blocks = _qkv_blocks(dqkv, geo) if needs[0] else (None, None, None)
    d_table, d_qkv_bias = _launch_backward(*_qkv_blocks(qkv, geo), out, dout, lse, *blocks, geo, table, None,
                                           qkv_bias, scale, mask_value, dropout_p, seed, plan, needs[1], needs[2])
    return dqkv, d_table, d_qkv_bias


def dropout_keep_mask(seed: Union[int, torch.Tensor], num_windows: int, heads: int, n: int, dropout_p: float,
                      device=None) -> torch.Tensor:
    """(B*nW, h, N, N) bool keep-mask the kernels use for ``seed`` (for exact replay in tests)."""
    keep = torch.empty((num_windows, heads, n, n), dtype=torch.int8, device=device)
    window_attention_keep_kernel[(num_windows, heads)](keep, seed_tensor(seed, keep.device), heads, dropout_p, N=n,
                                                       BLOCK=p2(n))
    return keep.bool()


# --------------------------------------------------------------------------- #
# Shipped configurations, compiled ahead of time by benchmarks/aot_compile.py
# --------------------------------------------------------------------------- #


def _aot_signature(kernel, ty: str):
    """Types of the non-constexpr arguments (an fp32 bias table)."""
    import inspect

    # The interpreter wraps kernels differently, so read the Python signature itself.
    params = inspect.signature(kernel.fn).parameters
    sig = {name: "i32" for name, param in params.items() if "constexpr" not in str(param.annotation)}
    sig.update({name: "*fp32" for name in ("LSE", "DT_PART", "DB_PART", "TABLE") if name in sig}, SEED="*i64")
    sig.update({name: f"*{ty}" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "MASK", "QKVB") if name in sig})
    sig.update(scale="fp32", mask_value="fp32", dropout_p="fp32")
    return sig


def _aot_configs():
    configs = []
    # (label, window, head_dim, image, mask_mode, dropout): Swin-T/S (ws 7, d 32), Swin-B/L and SeMask-B/L
    # (ws 12, d 32), d=64/128 heads, zero-copy image variants with shift and qkv bias.
    cases = [("w7", (7, 7), 32, False, 2, False), ("w7-mask", (7, 7), 32, False, 1, False),
             ("w7-drop", (7, 7), 32, False, 0, True), ("w8", (8, 8), 64, False, 2, False),
             ("w7-d128", (7, 7), 128, False, 0, False), ("w12", (12, 12), 32, False, 2, False),
             ("w12-d128", (12, 12), 128, False, 2, False),
             ("img-w7", (7, 7), 32, True, 2, False), ("img-w12", (12, 12), 32, True, 2, False)]
    for label, ws, hd, image, mask_mode, drop in cases:
        # Every dtype for the main Swin shapes; fp16 stands for the half types elsewhere.
        types = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
        for dtype, ty in types.items() if label in ("w7", "w12", "img-w7") else [(torch.float16, "fp16")]:
            geo = Geometry(ws, 8, 1, hd)
            flags = dict(N=geo.n, WH=ws[0], WW=ws[1], D=hd, WPP=8, IMAGE=image, PAD_THEN_ROLL=True, HAS_TABLE=True,
                         MASK_MODE=mask_mode, HAS_QKVB=image, DROPOUT=drop, DOT_FP32=False)
            plans = (forward_plan(geo, dtype, interpreter=False), backward_plan(geo, dtype, interpreter=False)["main"])
            wants = dict(WANT_DQ=True, WANT_DKV=True, WANT_DTABLE=True, WANT_DQKVB=image)  # every gradient
            for kernel, kind, plan, extra in zip((window_attention_fwd_kernel, window_attention_bwd_kernel),
                                                 ("fwd", "bwd"), plans, ({}, wants)):
                configs.append(AOTConfig.from_plan(kernel, f"window_attention_{kind}[{label},d={hd},{ty}]",
                                                   _aot_signature(kernel, ty), plan, **flags, **extra))
    for ws in ((7, 7), (12, 12)):
        # Swin-T stage 1 at B=128: 512 groups of 16 windows, chunks of 32.
        geo = Geometry(ws, 128 * 64, 3, 32)
        plan = backward_plan(geo, torch.float16, interpreter=False)
        configs.append(AOTConfig.from_plan(
            window_attention_table_fold_kernel, f"window_attention_table_fold[{ws[0]}x{ws[1]}]",
            {"DT_PART": "*fp32", "DT_CHUNKS": "*fp32", "G": "i32", "HEADS": "i32", "R": "i32"}, plan["table"],
            N=geo.n, WH=ws[0], WW=ws[1], NP=plan["main"]["NT"] * plan["main"]["BLOCK"]))
    for ty in ("fp16", "bf16", "fp32"):  # the chunks' sum, in the table's dtype
        configs.append(AOTConfig.from_plan(ordered_sum_kernel, f"window_attention_table_sum[{ty}]",
                                           dict(PARTS="*fp32", OUT=f"*{ty}", C="i32", M="i32"), ORDERED_SUM_PLAN))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["window_attention_forward", "window_attention_backward", "shifted_window_attention_forward",
           "shifted_window_attention_backward", "dropout_keep_mask", "Geometry", "forward_plan", "backward_plan",
           "windows_per_program", "table_chunk", "MAX_HEAD_DIM", "AOT_CONFIGS"]
