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

Backward recomputes the probabilities from the logsumexp.  The bias-table
gradient is deterministic: each program sums dS over its windows into its own
slice of an fp32 partial buffer (G, h, N, N), G = B*nW / WPP, and a second
kernel reduces the groups in a fixed order and folds the (i, j) pairs onto the
table rows.  No atomics anywhere.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import INTERPRETED, AOTConfig, dot_fp32
from ._common import mm

# --------------------------------------------------------------------------- #
# Shared device helpers
# --------------------------------------------------------------------------- #


@triton.jit
def _tokens(b_, n, nW, nWw, H, W, sy, sx, WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr,
            IMAGE: tl.constexpr, PAD_THEN_ROLL: tl.constexpr):
    """Coordinates of tokens ``n`` of window ``b_``.

    Returns (img, y, x, py, px, real): ``img`` the batch row (image layout: the image;
    window layout: the window), (y, x) where the
    token lives in memory (window layout: y = n, x = 0), (py, px) its position on
    the padded, rolled grid (for the shift mask) and ``real`` whether it exists
    in memory (False for tile padding and, in image layout, for pad tokens).
    """
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
def _load_tile(ptr, offs, real, inside, d, QKVB, qkvb_off, D: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_QKVB: tl.constexpr):
    """(BLOCK, BLOCK_D) tile; pad tokens of the image layout take the qkv bias."""
    dm = d < D
    t = tl.load(ptr + offs[:, None] + d[None, :], mask=real[:, None] & dm[None, :], other=0.0)
    if HAS_QKVB:
        bias = tl.load(QKVB + qkvb_off + d, mask=dm, other=0.0).to(t.dtype)
        pad = inside & (real == 0)
        t = tl.where(pad[:, None], bias[None, :], t)
    return t


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
    """Dropout keep-mask of (window b_, head hh, i, j): Philox keyed by the element's flat index."""
    base = (b_.to(tl.int64) * HEADS + hh) * N
    return tl.rand(seed, (base + i[:, None]) * N + j[None, :]) >= dropout_p


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


@triton.jit
def window_attention_fwd_kernel(
        Q, K, V, O, LSE, TABLE, MASK, QKVB, seed,
        sq_b, sq_h, sq_y, sq_x, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x, so_b, so_h, so_y, so_x,
        stt, sth, smw, smi, smj,
        HEADS, nW, nWw, H, W, sy, sx, scale, mask_value, dropout_p,
        N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr, NT: tl.constexpr, WPP: tl.constexpr, IMAGE: tl.constexpr,
        PAD_THEN_ROLL: tl.constexpr, HAS_TABLE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_QKVB: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    g = tl.program_id(0)
    hh = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    keep_scale = 1.0 / (1.0 - dropout_p)
    for wi in range(WPP):
        b_ = g * WPP + wi
        for qt in range(NT):
            i = qt * BLOCK + r
            img, y, x, pyi, pxi, real_i = _tokens(b_, i, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE, PAD_THEN_ROLL)
            q = _load_tile(Q, _offsets(img, y, x, hh, sq_b, sq_h, sq_y, sq_x), real_i, i < N, d, QKVB, hh * D,
                           D, BLOCK_D, HAS_QKVB)
            m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK,), tl.float32)
            acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
            for kt in range(NT):
                j = kt * BLOCK + r
                imgj, yj, xj, pyj, pxj, real_j = _tokens(b_, j, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE,
                                                         PAD_THEN_ROLL)
                k = _load_tile(K, _offsets(imgj, yj, xj, hh, sk_b, sk_h, sk_y, sk_x), real_j, j < N, d, QKVB,
                               HEADS * D + hh * D, D, BLOCK_D, HAS_QKVB)
                v = _load_tile(V, _offsets(imgj, yj, xj, hh, sv_b, sv_h, sv_y, sv_x), real_j, j < N, d, QKVB,
                               2 * HEADS * D + hh * D, D, BLOCK_D, HAS_QKVB)
                s = _logits(q, k, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt, sth, MASK, smw, smi, smj, nW, nWw,
                            sy, sx, scale, mask_value, N, WH, WW, HAS_TABLE, MASK_MODE, DOT_FP32)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if DROPOUT:
                    p = tl.where(_keep(seed, b_, hh, HEADS, i, j, N, dropout_p), p * keep_scale, 0.0)
                acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_FP32)
                m_i = m_new
            out = acc / l_i[:, None]
            dm = d < D
            tl.store(O + _offsets(img, y, x, hh, so_b, so_h, so_y, so_x)[:, None] + d[None, :],
                     out.to(O.dtype.element_ty), mask=real_i[:, None] & dm[None, :])
            lse_off = (b_.to(tl.int64) * HEADS + hh) * N + i
            tl.store(LSE + lse_off, m_i + tl.log(l_i), mask=i < N)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


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
    if DROPOUT:
        keep = _keep(seed, b_, hh, HEADS, i, j, N, dropout_p)
        keep_scale = 1.0 / (1.0 - dropout_p)
        p_drop = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    else:
        p_drop = p
    ds = p * (dp - o_delta[:, None])
    ds = tl.where((i[:, None] < N) & (j[None, :] < N), ds, 0.0)
    return p_drop, ds


@triton.jit
def window_attention_bwd_kernel(
        Q, K, V, O, DO, LSE, DQ, DK, DV, DT_PART, DB_PART, TABLE, MASK, QKVB, seed,
        sq_b, sq_h, sq_y, sq_x, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x, so_b, so_h, so_y, so_x,
        sdo_b, sdo_h, sdo_y, sdo_x, sdq_b, sdq_h, sdq_y, sdq_x, sdk_b, sdk_h, sdk_y, sdk_x, sdv_b, sdv_h, sdv_y,
        sdv_x, stt, sth, smw, smi, smj,
        HEADS, nW, nWw, H, W, sy, sx, scale, mask_value, dropout_p,
        N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr, NT: tl.constexpr, WPP: tl.constexpr, IMAGE: tl.constexpr,
        PAD_THEN_ROLL: tl.constexpr, HAS_TABLE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_QKVB: tl.constexpr,
        DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    g = tl.program_id(0)
    hh = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
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
            imgj, yj, xj, pyj, pxj, real_j = _tokens(b_, j, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE, PAD_THEN_ROLL)
            k = _load_tile(K, _offsets(imgj, yj, xj, hh, sk_b, sk_h, sk_y, sk_x), real_j, j < N, d, QKVB,
                           HEADS * D + hh * D, D, BLOCK_D, HAS_QKVB)
            v = _load_tile(V, _offsets(imgj, yj, xj, hh, sv_b, sv_h, sv_y, sv_x), real_j, j < N, d, QKVB,
                           2 * HEADS * D + hh * D, D, BLOCK_D, HAS_QKVB)
            dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)
            dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
            for qt in range(NT):
                i = qt * BLOCK + r
                img, y, x, pyi, pxi, real_i = _tokens(b_, i, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE,
                                                      PAD_THEN_ROLL)
                q = _load_tile(Q, _offsets(img, y, x, hh, sq_b, sq_h, sq_y, sq_x), real_i, i < N, d, QKVB,
                               hh * D, D, BLOCK_D, HAS_QKVB)
                io = _offsets(img, y, x, hh, sdo_b, sdo_h, sdo_y, sdo_x)
                do = tl.load(DO + io[:, None] + d[None, :], mask=real_i[:, None] & dm[None, :], other=0.0)
                oo = _offsets(img, y, x, hh, so_b, so_h, so_y, so_x)
                o = tl.load(O + oo[:, None] + d[None, :], mask=real_i[:, None] & dm[None, :], other=0.0)
                o_delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                lse = tl.load(LSE + (b_.to(tl.int64) * HEADS + hh) * N + i, mask=i < N, other=0.0)
                p_drop, ds = _grad_scores(q, k, v, do, o_delta, lse, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE, stt,
                                          sth, MASK, smw, smi, smj, nW, nWw, sy, sx, scale, mask_value, seed, HEADS,
                                          dropout_p, N, WH, WW, HAS_TABLE, MASK_MODE, DROPOUT, DOT_FP32)
                dv += mm(tl.trans(p_drop.to(do.dtype)), do, DOT_FP32)
                dk += mm(tl.trans(ds.to(q.dtype)), q, DOT_FP32)
                if NT == 1:
                    dq = mm(ds.to(k.dtype), k, DOT_FP32) * scale
                    tl.store(DQ + _offsets(img, y, x, hh, sdq_b, sdq_h, sdq_y, sdq_x)[:, None] + d[None, :],
                             dq.to(DQ.dtype.element_ty), mask=real_i[:, None] & dm[None, :])
                    if HAS_QKVB:
                        dbq += tl.sum(tl.where(((i < N) & (real_i == 0))[:, None], dq, 0.0), 0)
                    if HAS_TABLE:
                        ds_acc += ds
                else:
                    if HAS_TABLE:
                        # Read-modify-write of this program's own slice: deterministic, no atomics.  The
                        # first window stores without reading, so the buffer needs no zero fill.
                        # Only the N x N real pairs are stored (the reduction reads no others).
                        pp = part + i[:, None] * (NT * BLOCK) + j[None, :]
                        real_pair = (i[:, None] < N) & (j[None, :] < N)
                        later = tl.full((BLOCK, BLOCK), wi, tl.int32) > 0
                        tl.store(pp, tl.load(pp, mask=later & real_pair, other=0.0) + ds, mask=real_pair)
                        tl.debug_barrier()
            dk = dk * scale
            pad_j = ((j < N) & (real_j == 0))[:, None]
            tl.store(DK + _offsets(imgj, yj, xj, hh, sdk_b, sdk_h, sdk_y, sdk_x)[:, None] + d[None, :],
                     dk.to(DK.dtype.element_ty), mask=real_j[:, None] & dm[None, :])
            tl.store(DV + _offsets(imgj, yj, xj, hh, sdv_b, sdv_h, sdv_y, sdv_x)[:, None] + d[None, :],
                     dv.to(DV.dtype.element_ty), mask=real_j[:, None] & dm[None, :])
            if HAS_QKVB:
                dbk += tl.sum(tl.where(pad_j, dk, 0.0), 0)
                dbv += tl.sum(tl.where(pad_j, dv, 0.0), 0)
        if NT > 1:
            # dq of each query tile, looping over the key tiles (recomputes P).
            for qt in range(NT):
                i = qt * BLOCK + r
                img, y, x, pyi, pxi, real_i = _tokens(b_, i, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE,
                                                      PAD_THEN_ROLL)
                q = _load_tile(Q, _offsets(img, y, x, hh, sq_b, sq_h, sq_y, sq_x), real_i, i < N, d, QKVB,
                               hh * D, D, BLOCK_D, HAS_QKVB)
                io = _offsets(img, y, x, hh, sdo_b, sdo_h, sdo_y, sdo_x)
                do = tl.load(DO + io[:, None] + d[None, :], mask=real_i[:, None] & dm[None, :], other=0.0)
                oo = _offsets(img, y, x, hh, so_b, so_h, so_y, so_x)
                o = tl.load(O + oo[:, None] + d[None, :], mask=real_i[:, None] & dm[None, :], other=0.0)
                o_delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                lse = tl.load(LSE + (b_.to(tl.int64) * HEADS + hh) * N + i, mask=i < N, other=0.0)
                dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
                for kt in range(NT):
                    j = kt * BLOCK + r
                    imgj, yj, xj, pyj, pxj, real_j = _tokens(b_, j, nW, nWw, H, W, sy, sx, WH, WW, N, IMAGE,
                                                             PAD_THEN_ROLL)
                    k = _load_tile(K, _offsets(imgj, yj, xj, hh, sk_b, sk_h, sk_y, sk_x), real_j, j < N, d, QKVB,
                                   HEADS * D + hh * D, D, BLOCK_D, HAS_QKVB)
                    v = _load_tile(V, _offsets(imgj, yj, xj, hh, sv_b, sv_h, sv_y, sv_x), real_j, j < N, d, QKVB,
                                   2 * HEADS * D + hh * D, D, BLOCK_D, HAS_QKVB)
                    p_drop, ds = _grad_scores(q, k, v, do, o_delta, lse, b_, hh, i, j, pyi, pxi, pyj, pxj, TABLE,
                                              stt, sth, MASK, smw, smi, smj, nW, nWw, sy, sx, scale, mask_value,
                                              seed, HEADS, dropout_p, N, WH, WW, HAS_TABLE, MASK_MODE, DROPOUT,
                                              DOT_FP32)
                    dq += mm(ds.to(k.dtype), k, DOT_FP32)
                dq = dq * scale
                tl.store(DQ + _offsets(img, y, x, hh, sdq_b, sdq_h, sdq_y, sdq_x)[:, None] + d[None, :],
                         dq.to(DQ.dtype.element_ty), mask=real_i[:, None] & dm[None, :])
                if HAS_QKVB:
                    dbq += tl.sum(tl.where(((i < N) & (real_i == 0))[:, None], dq, 0.0), 0)
    if NT == 1:
        if HAS_TABLE:
            tl.store(part + r[:, None] * BLOCK + r[None, :], ds_acc, mask=(r[:, None] < N) & (r[None, :] < N))
    if HAS_QKVB:
        # (G, 3, HEADS, D) partial sums, reduced on the host in a fixed order.
        db = DB_PART + g.to(tl.int64) * 3 * HEADS * D + hh * D + d
        tl.store(db, dbq, mask=dm)
        tl.store(db + HEADS * D, dbk, mask=dm)
        tl.store(db + 2 * HEADS * D, dbv, mask=dm)


@triton.jit
def window_attention_table_grad_kernel(
        DT_PART, DT, G, HEADS, R, sdt_r, sdt_h,
        N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr):
    """dT[r, h] = sum over groups g (in order) and pairs (i, j) with idx[i, j] == r of partial[g, h, i, j].

    Table row r = (dy, dx) collects the pairs j = i - (dy - Wh + 1) * Ww - (dx - Ww + 1)
    whose coordinates stay inside the window: a gather, no colliding scatter.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    hh = tl.program_id(1)
    i = tl.arange(0, BLOCK_I)
    ddy = rows // (2 * WW - 1) - (WH - 1)
    ddx = rows % (2 * WW - 1) - (WW - 1)
    yj = (i // WW)[None, :] - ddy[:, None]
    xj = (i % WW)[None, :] - ddx[:, None]
    ok = (rows[:, None] < R) & (i[None, :] < N) & (yj >= 0) & (yj < WH) & (xj >= 0) & (xj < WW)
    j = yj * WW + xj
    pair = i[None, :] * NP + j
    acc = tl.zeros((BLOCK_R, BLOCK_I), tl.float32)
    for g in range(G):
        base = (hh + g * HEADS).to(tl.int64) * NP * NP
        acc += tl.load(DT_PART + base + pair, mask=ok, other=0.0)
    tl.store(DT + rows * sdt_r + hh * sdt_h, tl.sum(acc, 1).to(DT.dtype.element_ty), mask=rows < R)


@triton.jit
def window_attention_keep_kernel(KEEP, seed, HEADS, dropout_p, N: tl.constexpr, BLOCK: tl.constexpr):
    """Materialises the dropout keep-mask of window program_id(0), head program_id(1) (tests replay it)."""
    b_ = tl.program_id(0)
    hh = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    keep = _keep(seed, b_, hh, HEADS, i, i, N, dropout_p)
    base = (b_.to(tl.int64) * HEADS + hh) * N * N
    tl.store(KEEP + base + i[:, None] * N + i[None, :], keep.to(tl.int8), mask=(i[:, None] < N) & (i[None, :] < N))


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #

#: Largest window (and head dim) the forward handles as one tile; beyond it, tiles of MULTI_TILE tokens.
SINGLE_TILE_MAX = 64
#: 16-token tiles on GPUs.  Triton's interpreter (CPU tests) costs per tile operation: there the same
#: kernel code runs with 32-token tiles, 4x fewer tile pairs; the tests also run GPU_MULTI_TILE.
GPU_MULTI_TILE = 16
MULTI_TILE = 32 if INTERPRETED else GPU_MULTI_TILE
MAX_HEAD_DIM = 128


def tiling(n: int, head_dim: int, backward: bool = False, fp32: bool = False,
           multi_tile: Optional[int] = None) -> Tuple[int, int, int]:
    """(BLOCK, BLOCK_D, NT): token tile, padded head dim, tiles per window.

    The half-precision forward takes a window of up to 64 tokens as one tile.  The
    backward (five live score tiles, dk/dv accumulators, per-row addressing), fp32
    (no tensor-core operands in ieee mode) and larger windows use 16-token tiles:
    32-token tiles still spill a few bytes in backward on sm_80/sm_90, 16 do not (see
    benchmarks/results/resources.md), and 16 divides N = 144 exactly.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    block = max(16, triton.next_power_of_2(n))
    if backward or fp32 or n > SINGLE_TILE_MAX or block_d > 64:
        block = min(block, multi_tile or MULTI_TILE)
    return block, block_d, triton.cdiv(n, block)


def windows_per_program(num_windows: int, heads: int, min_programs: int) -> int:
    """Windows one program owns: the most of 16, 8, 4, 2 that divides B*nW and still leaves
    ``min_programs`` programs.  Packing amortises the launch and the per-tile index math
    and, in backward, divides the table-gradient partials (one N x N fp32 tile per program).
    A function of the shape only, so the table-gradient summation order is reproducible."""
    for wpp in (16, 8, 4, 2):
        if num_windows % wpp == 0 and (num_windows // wpp) * heads >= min_programs:
            return wpp
    return 1


#: Programs to keep: forward about 4 per SM of a large GPU; backward about one wave
#: (heavier programs, and fewer partials: table-gradient traffic stays < 10% of the minimum).
FWD_MIN_PROGRAMS = 512
BWD_MIN_PROGRAMS = 128


#: Per-thread register cap handed to ptxas.  The score tiles and accumulators live in registers;
#: left to itself ptxas capped some configurations (2-warp fp32 forward, 8-warp fp32 backward on
#: sm_80) at 128 registers and spilled.  Shared memory, not registers, bounds occupancy here.
MAXNREG = 255


def launch_options(block: int, backward: bool) -> dict:
    """num_warps / num_stages / maxnreg of the attention kernels; chosen from the AOT table
    (benchmarks/results/resources.md): no configuration spills on sm_80 or sm_90."""
    warps = 8 if backward or block >= 64 else 4 if block == 32 else 2
    return dict(num_warps=warps, num_stages=1, maxnreg=MAXNREG)


def draw_seed() -> int:
    """Dropout seed from torch's default generator (``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int64).item())


def dropout_keep_mask(seed: int, num_windows: int, heads: int, n: int, dropout_p: float,
                      device=None) -> torch.Tensor:
    """(B*nW, h, N, N) bool keep-mask the kernels use for ``seed`` (for exact replay in tests)."""
    keep = torch.empty((num_windows, heads, n, n), dtype=torch.int8, device=device)
    block = max(16, triton.next_power_of_2(n))
    window_attention_keep_kernel[(num_windows, heads)](keep, seed, heads, dropout_p, N=n, BLOCK=block)
    return keep.bool()


def _strides4(t: torch.Tensor, image: bool, head_dim: int):
    """(s_b, s_h, s_y, s_x) of a tensor as the kernel addresses it."""
    if image:  # (B, H, W, C), heads are channel blocks
        return t.stride(0), head_dim, t.stride(1), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), 0


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


def _common_args(geo: Geometry, table, mask):
    stt, sth = (table.stride(0), table.stride(1)) if table is not None else (0, 0)
    smw, smi, smj = mask.stride() if mask is not None else (0, 0, 0)
    nw = mask.shape[0] if mask is not None else geo.nw
    return (stt, sth, smw, smi, smj, geo.heads, nw, geo.grid[1], geo.hw[0], geo.hw[1], geo.shift[0], geo.shift[1])


def _constexprs(geo: Geometry, table, mask, qkv_bias, dropout_p, dtype, wpp, backward=False):
    block, block_d, nt = tiling(geo.n, geo.head_dim, backward, dtype == torch.float32)
    return dict(N=geo.n, WH=geo.window_size[0], WW=geo.window_size[1], D=geo.head_dim, BLOCK=block,
                BLOCK_D=block_d, NT=nt, WPP=wpp, IMAGE=geo.image, PAD_THEN_ROLL=geo.pad_then_roll,
                HAS_TABLE=table is not None,
                MASK_MODE=1 if mask is not None else (2 if any(geo.shift) else 0),
                HAS_QKVB=qkv_bias is not None, DROPOUT=dropout_p > 0.0, DOT_FP32=dot_fp32(dtype))


def window_attention_forward(q, k, v, out, geo: Geometry, table=None, mask=None, qkv_bias=None, *, scale: float,
                             mask_value: float = -100.0, dropout_p: float = 0.0, seed: int = 0,
                             wpp: Optional[int] = None) -> torch.Tensor:
    """Runs the forward kernel, writing ``out``; returns the (B*nW, h, N) fp32 logsumexp.

    Window layout: q, k, v, out (B*nW, h, N, d).  Image layout: q, k, v are the three
    channel blocks of the qkv image (views), out (B, H, W, h*d).  ``wpp`` overrides
    :func:`windows_per_program` (it must divide B*nW).
    """
    wpp = wpp or windows_per_program(geo.num_windows, geo.heads, FWD_MIN_PROGRAMS)
    lse = torch.empty((geo.num_windows, geo.heads, geo.n), dtype=torch.float32, device=q.device)
    c = _constexprs(geo, table, mask, qkv_bias, dropout_p, q.dtype, wpp)
    dummy = lse
    window_attention_fwd_kernel[(geo.num_windows // wpp, geo.heads)](
        q, k, v, out, lse, table if table is not None else dummy, mask if mask is not None else dummy,
        qkv_bias if qkv_bias is not None else dummy, seed,
        *_strides4(q, geo.image, geo.head_dim), *_strides4(k, geo.image, geo.head_dim),
        *_strides4(v, geo.image, geo.head_dim), *_strides4(out, geo.image, geo.head_dim),
        *_common_args(geo, table, mask), scale, mask_value, dropout_p,
        **launch_options(c["BLOCK"], False), **c)
    return lse


def window_attention_backward(q, k, v, out, dout, lse, dq, dk, dv, geo: Geometry, table=None, mask=None,
                              qkv_bias=None, *, scale: float, mask_value: float = -100.0, dropout_p: float = 0.0,
                              seed: int = 0, wpp: Optional[int] = None):
    """Writes dq, dk, dv (same layouts as q, k, v); returns (d_table or None, d_qkv_bias or None).

    The table gradient is bitwise reproducible: per-program partials reduced in a fixed order.
    """
    wpp = wpp or windows_per_program(geo.num_windows, geo.heads, BWD_MIN_PROGRAMS)
    groups = geo.num_windows // wpp
    c = _constexprs(geo, table, mask, qkv_bias, dropout_p, q.dtype, wpp, backward=True)
    np_ = c["NT"] * c["BLOCK"]
    want_table = table is not None
    part = torch.empty((groups, geo.heads, np_, np_) if want_table else (1,), dtype=torch.float32,
                       device=q.device)
    db_part = torch.empty((groups, 3, geo.heads * geo.head_dim) if qkv_bias is not None else (1,),
                          dtype=torch.float32, device=q.device)
    dummy = lse
    window_attention_bwd_kernel[(groups, geo.heads)](
        q, k, v, out, dout, lse, dq, dk, dv, part, db_part, table if table is not None else dummy,
        mask if mask is not None else dummy, qkv_bias if qkv_bias is not None else dummy, seed,
        *_strides4(q, geo.image, geo.head_dim), *_strides4(k, geo.image, geo.head_dim),
        *_strides4(v, geo.image, geo.head_dim), *_strides4(out, geo.image, geo.head_dim),
        *_strides4(dout, geo.image, geo.head_dim), *_strides4(dq, geo.image, geo.head_dim),
        *_strides4(dk, geo.image, geo.head_dim), *_strides4(dv, geo.image, geo.head_dim),
        *_common_args(geo, table, mask), scale, mask_value, dropout_p,
        **launch_options(c["BLOCK"], True), **c)
    d_table = None
    if want_table:
        d_table = torch.empty_like(table)
        rows = table.shape[0]
        block_r = 16
        window_attention_table_grad_kernel[(triton.cdiv(rows, block_r), geo.heads)](
            part, d_table, groups, geo.heads, rows, d_table.stride(0), d_table.stride(1),
            N=geo.n, WH=geo.window_size[0], WW=geo.window_size[1], NP=np_, BLOCK_R=block_r,
            BLOCK_I=triton.next_power_of_2(geo.n))
    d_qkv_bias = None
    if qkv_bias is not None:
        d_qkv_bias = db_part.sum(0).reshape(-1).to(qkv_bias.dtype)
    return d_table, d_qkv_bias


# --------------------------------------------------------------------------- #
# Shipped configurations, compiled ahead of time by benchmarks/aot_compile.py
# --------------------------------------------------------------------------- #


def _aot_signature(kernel, dtype: str, table_dtype: str):
    import inspect

    sig = {}
    # The interpreter wraps kernels differently, so read the Python signature itself.
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        elif name in ("LSE", "DT_PART", "DB_PART"):
            sig[name] = "*fp32"
        elif name == "TABLE":
            sig[name] = f"*{table_dtype}"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "MASK", "QKVB"):
            sig[name] = f"*{dtype}"
        elif name in ("scale", "mask_value", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
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
        for dtype in ("fp16", "bf16", "fp32") if label in ("w7", "w12", "img-w7") else ("fp16",):
            n = ws[0] * ws[1]
            for kernel, kind in ((window_attention_fwd_kernel, "fwd"), (window_attention_bwd_kernel, "bwd")):
                block, block_d, nt = tiling(n, hd, kind == "bwd", dtype == "fp32", GPU_MULTI_TILE)
                base = dict(N=n, WH=ws[0], WW=ws[1], D=hd, BLOCK=block, BLOCK_D=block_d, NT=nt,
                            WPP=8, IMAGE=image, PAD_THEN_ROLL=True, HAS_TABLE=True,
                            MASK_MODE=mask_mode, HAS_QKVB=image, DROPOUT=drop, DOT_FP32=False)
                configs.append(AOTConfig(kernel, f"window_attention_{kind}[{label},d={hd},{dtype}]",
                                         _aot_signature(kernel, dtype, "fp32"), base,
                                         **launch_options(block, kind == "bwd")))
    for ws in ((7, 7), (12, 12)):
        n = ws[0] * ws[1]
        block, _, nt = tiling(n, 32, backward=True, multi_tile=GPU_MULTI_TILE)
        configs.append(AOTConfig(
            window_attention_table_grad_kernel, f"window_attention_table_grad[{ws[0]}x{ws[1]}]",
            {"DT_PART": "*fp32", "DT": "*fp32", "G": "i32", "HEADS": "i32", "R": "i32", "sdt_r": "i32",
             "sdt_h": "i32", "N": "constexpr", "WH": "constexpr", "WW": "constexpr", "NP": "constexpr",
             "BLOCK_R": "constexpr", "BLOCK_I": "constexpr"},
            dict(N=n, WH=ws[0], WW=ws[1], NP=nt * block, BLOCK_R=16, BLOCK_I=triton.next_power_of_2(n))))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["window_attention_forward", "window_attention_backward", "dropout_keep_mask", "draw_seed", "Geometry",
           "tiling", "windows_per_program", "AOT_CONFIGS"]
