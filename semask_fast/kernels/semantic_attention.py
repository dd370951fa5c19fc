"""SeMask semantic attention ``softmax(Sq Sk^T) Yv`` (no scale): Triton kernels and launchers.

Layout: sq, sk (B_, N, K), yv (B_, N, C) with a contiguous last dim and any batch
and row strides (e.g. column views of one fused (B_, N, 2K + C) projection
output, read in place); out, dO, the gradients (contiguous) and lse (B_, N) fp32.
B_ is windows x batch (windowed stages, N = 49 or 144) or batch (global stages,
N up to ~1600).  K is the class count (150, 19): the forward's score product
runs over K in chunks of ``BLOCK_K`` masked in registers, so K is never padded
in memory.  C (up to 1536, one head) is tiled over the grid in the forward;
every C tile recomputes the scores, which costs K / BLOCK_C of the P.Yv FLOPs
per extra tile.

Flash-style: online softmax over key tiles, no N x N tensor in memory, fp32 row
logsumexp saved for backward.  Small windows: one program loops over
``WPP`` windows (several windows per program) so launches stay large-grained.

Backward (dO given): dS = P * (dO Yv^T - D) with D = rowsum(dO * O),
  dSq = dS Sk,  dSk = dS^T Sq,  dYv = P^T dO,
P recomputed from the saved logsumexp, in two kernels:
  query-major (first): D for its rows (stored), then dSq, streaming C for dP;
  key-major: dYv and dSk.  It holds a C tile of dYv as wide as registers allow
  (all of C up to 256 in fp16/bf16, 128 in fp32): S and P are computed once per (query
  block, key block, C tile) and dP = dO Yv^T once per (query block, key block),
  with no extra pass over C.
The dSq/dSk accumulators hold all of K in registers (K <= 256), as two power-of-two
pieces where that pads less (K = 150: 128 + 32 columns, not 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, AOTConfig, dot_fp32
from ._common import mm

#: Largest class count K the backward accumulators hold (K padded to a power of two).
MAX_K = 256

#: Triton's interpreter costs per operation, not per element: under it the launchers use the
#: largest tiles (fewer programs and loop trips) so the tests stay fast.  Compiled kernels always
#: use the register-budgeted tiles of ``forward_config``/``backward_config`` (the AOT_CONFIGS);
#: tests set this to False on small shapes to run those tiles too.
INTERPRETER_TILES = INTERPRETED


@triton.jit
def _scores(q_base, k_base, offs_m, offs_n, m_ok, n_ok, K, q_sn, k_sn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of Sq Sk^T, summed over K in BLOCK_K chunks (q_sn, k_sn: row strides)."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        q = tl.load(q_base + offs_m[:, None] * q_sn + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        kt = tl.load(k_base + offs_n[None, :] * k_sn + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        s += mm(q, kt, DOT_FP32)
    return s


@triton.jit
def _sem_fwd_kernel(SQ, SK, YV, OUT, LSE, B, N, K, C, WPP, sq_b, sq_n, sk_b, sk_n, yv_b, yv_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    num_c = tl.cdiv(C, BLOCK_C)
    pid_m = tl.program_id(0) // num_c
    pid_c = tl.program_id(0) % num_c
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    for w in range(0, WPP):
        b = tl.program_id(1).to(tl.int64) * WPP + w
        m_ok = (offs_m < N) & (b < B)
        q_base = SQ + b * sq_b
        k_base = SK + b * sk_b
        v_base = YV + b * yv_b
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < N) & (b < B)
            s = _scores(q_base, k_base, offs_m, offs_n, m_ok, n_ok, K, sq_n, sk_n, BLOCK_M, BLOCK_N, BLOCK_K,
                        DOT_FP32)
            s = tl.where((offs_n < N)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * yv_n + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :],
                        other=0.0)
            acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_FP32)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(OUT + b * N * C + offs_m[:, None] * C + offs_c[None, :], acc.to(OUT.dtype.element_ty),
                 mask=m_ok[:, None] & c_ok[None, :])
        # Every C tile computes the same statistics; the first one stores them.
        tl.store(LSE + b * N + offs_m, m_i + tl.log(l_i), mask=m_ok & (pid_c == 0))


@triton.jit
def _row_dot_kernel(A, B, OUT, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[r] = sum_c A[r, c] * B[r, c] in fp32 (the backward's D = rowsum(dO * O); used by the ATM backward)."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = r_ok[:, None] & (offs_c < C)[None, :]
        a = tl.load(A + offs_r[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        bb = tl.load(B + offs_r[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * bb, 1)
    tl.store(OUT + offs_r, acc, mask=r_ok)


@triton.jit
def _dp_tile(do_base, v_base, offs_m, offs_n, m_ok, n_ok, C, v_sn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_C: tl.constexpr, DOT_FP32: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of dO Yv^T, summed over all of C (dO rows contiguous, Yv row stride v_sn)."""
    dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        do = tl.load(do_base + offs_m[:, None] * C + cc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * v_sn + cc[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        dp += mm(do, vt, DOT_FP32)
    return dp


@triton.jit
def _k_ptrs(base, offs_r, sr, k0, BLOCK_K: tl.constexpr):
    """Pointers to the (rows, BLOCK_K) tile of a row-major (rows, K) matrix at columns k0.. (row stride sr)."""
    return base + offs_r[:, None] * sr + (k0 + tl.arange(0, BLOCK_K))[None, :]


@triton.jit
def _k_mask(r_ok, k0, K, BLOCK_K: tl.constexpr):
    return r_ok[:, None] & ((k0 + tl.arange(0, BLOCK_K)) < K)[None, :]


@triton.jit
def _sem_bwd_q_kernel(SQ, SK, YV, OUT, DO, LSE, DELTA, DSQ, B, N, K, C, WPP, sq_b, sq_n, sk_b, sk_n, yv_b, yv_n,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_KB: tl.constexpr,
                      BLOCK_C: tl.constexpr, DOT_FP32: tl.constexpr):
    """Query-major, launched first: D = rowsum(dO * O) (stored for the key-major kernel) and dSq = dS Sk.

    K is held as two register pieces, columns [0, BLOCK_KA) and [BLOCK_KA, BLOCK_KA + BLOCK_KB)
    (BLOCK_KB = 0: one piece), e.g. 128 + 32 for K = 150 instead of 256.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for w in range(0, WPP):
        b = tl.program_id(1).to(tl.int64) * WPP + w
        m_ok = (offs_m < N) & (b < B)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            mask = m_ok[:, None] & (cc < C)[None, :]
            rows = b * N * C + offs_m[:, None] * C + cc[None, :]
            o = tl.load(OUT + rows, mask=mask, other=0.0).to(tl.float32)
            do = tl.load(DO + rows, mask=mask, other=0.0).to(tl.float32)
            delta += tl.sum(o * do, 1)
        tl.store(DELTA + b * N + offs_m, delta, mask=m_ok)
        q_base = SQ + b * sq_b
        k_base = SK + b * sk_b
        qa = tl.load(_k_ptrs(q_base, offs_m, sq_n, 0, BLOCK_KA), mask=_k_mask(m_ok, 0, K, BLOCK_KA), other=0.0)
        dsq_a = tl.zeros([BLOCK_M, BLOCK_KA], dtype=tl.float32)
        if BLOCK_KB > 0:
            qb = tl.load(_k_ptrs(q_base, offs_m, sq_n, BLOCK_KA, BLOCK_KB),
                         mask=_k_mask(m_ok, BLOCK_KA, K, BLOCK_KB), other=0.0)
            dsq_b = tl.zeros([BLOCK_M, BLOCK_KB], dtype=tl.float32)
        lse = tl.load(LSE + b * N + offs_m, mask=m_ok, other=0.0)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < N) & (b < B)
            ka = tl.load(_k_ptrs(k_base, offs_n, sk_n, 0, BLOCK_KA), mask=_k_mask(n_ok, 0, K, BLOCK_KA), other=0.0)
            s = mm(qa, tl.trans(ka), DOT_FP32)
            if BLOCK_KB > 0:
                kb = tl.load(_k_ptrs(k_base, offs_n, sk_n, BLOCK_KA, BLOCK_KB),
                             mask=_k_mask(n_ok, BLOCK_KA, K, BLOCK_KB), other=0.0)
                s += mm(qb, tl.trans(kb), DOT_FP32)
            p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = _dp_tile(DO + b * N * C, YV + b * yv_b, offs_m, offs_n, m_ok, n_ok, C, yv_n, BLOCK_M, BLOCK_N,
                          BLOCK_C, DOT_FP32)
            ds = (p * (dp - delta[:, None])).to(ka.dtype)
            dsq_a += mm(ds, ka, DOT_FP32)
            if BLOCK_KB > 0:
                dsq_b += mm(ds, kb, DOT_FP32)
        out_base = DSQ + b * N * K
        tl.store(_k_ptrs(out_base, offs_m, K, 0, BLOCK_KA), dsq_a.to(DSQ.dtype.element_ty),
                 mask=_k_mask(m_ok, 0, K, BLOCK_KA))
        if BLOCK_KB > 0:
            tl.store(_k_ptrs(out_base, offs_m, K, BLOCK_KA, BLOCK_KB), dsq_b.to(DSQ.dtype.element_ty),
                     mask=_k_mask(m_ok, BLOCK_KA, K, BLOCK_KB))


@triton.jit
def _sem_bwd_kv_kernel(SQ, SK, YV, DO, LSE, DELTA, DSK, DYV, B, N, K, C, WPP, sq_b, sq_n, sk_b, sk_n, yv_b, yv_n,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_KB: tl.constexpr,
                       BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr, BLOCK_CD: tl.constexpr, DOT_FP32: tl.constexpr):
    """Key-major: dYv and dSk for one key block (K in two register pieces as in the query-major kernel).

    SINGLE_C (C <= BLOCK_C, e.g. SeMask-T stage 1): one program holds all of C, so S, P,
    dP = dO Yv^T and dS are computed once per (query block, key block) and dO is loaded once for
    both dP and dYv.  Otherwise the program owns one C tile of dYv (S recomputed per tile) and the
    tile-0 program also accumulates dP over all of C, in BLOCK_CD chunks, for dSk.
    """
    num_c = tl.cdiv(C, BLOCK_C)
    pid_n = tl.program_id(0) // num_c
    pid_c = tl.program_id(0) % num_c
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    for w in range(0, WPP):
        b = tl.program_id(1).to(tl.int64) * WPP + w
        n_ok = (offs_n < N) & (b < B)
        q_base = SQ + b * sq_b
        k_base = SK + b * sk_b
        ka = tl.load(_k_ptrs(k_base, offs_n, sk_n, 0, BLOCK_KA), mask=_k_mask(n_ok, 0, K, BLOCK_KA), other=0.0)
        dsk_a = tl.zeros([BLOCK_N, BLOCK_KA], dtype=tl.float32)
        if BLOCK_KB > 0:
            kb = tl.load(_k_ptrs(k_base, offs_n, sk_n, BLOCK_KA, BLOCK_KB),
                         mask=_k_mask(n_ok, BLOCK_KA, K, BLOCK_KB), other=0.0)
            dsk_b = tl.zeros([BLOCK_N, BLOCK_KB], dtype=tl.float32)
        if SINGLE_C:
            yv = tl.load(YV + b * yv_b + offs_n[:, None] * yv_n + offs_c[None, :],
                         mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        dyv = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for m0 in range(0, N, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = (offs_m < N) & (b < B)
            qa = tl.load(_k_ptrs(q_base, offs_m, sq_n, 0, BLOCK_KA), mask=_k_mask(m_ok, 0, K, BLOCK_KA), other=0.0)
            s = mm(qa, tl.trans(ka), DOT_FP32)
            if BLOCK_KB > 0:
                qb = tl.load(_k_ptrs(q_base, offs_m, sq_n, BLOCK_KA, BLOCK_KB),
                             mask=_k_mask(m_ok, BLOCK_KA, K, BLOCK_KB), other=0.0)
                s += mm(qb, tl.trans(kb), DOT_FP32)
            lse = tl.load(LSE + b * N + offs_m, mask=m_ok, other=0.0)
            p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            do = tl.load(DO + b * N * C + offs_m[:, None] * C + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :],
                         other=0.0)
            dyv += mm(tl.trans(p.to(do.dtype)), do, DOT_FP32)
            if SINGLE_C:
                delta = tl.load(DELTA + b * N + offs_m, mask=m_ok, other=0.0)
                ds_t = tl.trans((p * (mm(do, tl.trans(yv), DOT_FP32) - delta[:, None])).to(qa.dtype))
                dsk_a += mm(ds_t, qa, DOT_FP32)
                if BLOCK_KB > 0:
                    dsk_b += mm(ds_t, qb, DOT_FP32)
            elif pid_c == 0:
                dp = _dp_tile(DO + b * N * C, YV + b * yv_b, offs_m, offs_n, m_ok, n_ok, C, yv_n, BLOCK_M, BLOCK_N,
                              BLOCK_CD, DOT_FP32)
                delta = tl.load(DELTA + b * N + offs_m, mask=m_ok, other=0.0)
                ds_t = tl.trans((p * (dp - delta[:, None])).to(qa.dtype))
                dsk_a += mm(ds_t, qa, DOT_FP32)
                if BLOCK_KB > 0:
                    dsk_b += mm(ds_t, qb, DOT_FP32)
        tl.store(DYV + b * N * C + offs_n[:, None] * C + offs_c[None, :], dyv.to(DYV.dtype.element_ty),
                 mask=n_ok[:, None] & c_ok[None, :])
        out_base = DSK + b * N * K
        tile0 = n_ok & (pid_c == 0)
        tl.store(_k_ptrs(out_base, offs_n, K, 0, BLOCK_KA), dsk_a.to(DSK.dtype.element_ty),
                 mask=_k_mask(tile0, 0, K, BLOCK_KA))
        if BLOCK_KB > 0:
            tl.store(_k_ptrs(out_base, offs_n, K, BLOCK_KA, BLOCK_KB), dsk_b.to(DSK.dtype.element_ty),
                     mask=_k_mask(tile0, BLOCK_KA, K, BLOCK_KB))


# --------------------------------------------------------------------------- #
# Launch configuration
# --------------------------------------------------------------------------- #
def _p2(x: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def forward_config(N: int, K: int, C: int, dtype) -> dict:
    """Block sizes and warps; chosen so every shipped configuration compiles without spills (AOT table)."""
    wide = dtype == torch.float32  # fp32 tiles take twice the registers and use FMA dots (ieee)
    return dict(BLOCK_M=_p2(N, hi=32 if wide else 64), BLOCK_N=_p2(N, hi=32 if wide else 64), BLOCK_K=_p2(K, hi=32),
                BLOCK_C=_p2(C, hi=128), num_warps=8, num_stages=2)


def k_pieces(K: int) -> tuple:
    """(BLOCK_KA, BLOCK_KB): K held in registers as two power-of-two pieces when that pads less than
    one (150 -> 128 + 32, not 256); BLOCK_KB = 0 when one piece is as small."""
    whole = _p2(K)
    half = whole // 2
    rest = _p2(K - half) if K > half else 0
    return (half, rest) if half >= 16 and 0 < rest and half + rest < whole else (whole, 0)


#: Widest C tile of the key-major backward (dYv accumulator + Yv and dO tiles in registers), by fp32-ness.
KV_MAX_C = {False: 256, True: 128}


def backward_config(N: int, K: int, C: int, dtype) -> dict:
    """Tiles and launch options of the two backward kernels: ``{"q": ..., "kv": ...}``.

    The key-major kernel holds dYv for a C tile as wide as registers allow (``KV_MAX_C``; all of C at
    SeMask-T stage 1) so S and P are computed once per tile pair and C tile, and dP once per tile
    pair; the query-major kernel streams C in BLOCK_C chunks.  The
    (block x K) dSq/dSk accumulators live in registers: smaller blocks for large K.  fp32 tiles
    take twice the registers and use FMA dots (ieee): narrower C tiles.  One pipeline stage where
    two spill.
    Every shipped configuration compiles without spills (AOT table).
    """
    wide = dtype == torch.float32
    big_k = _p2(K) > 64
    if wide:
        block, block_c, warps = 16, 16, (8 if big_k else 4)
    elif big_k:
        block, block_c, warps = 16, 32, 8
    else:
        block, block_c, warps = 32, 64, 8
    stages = 1 if wide else 2
    ka, kb = k_pieces(K)
    q = dict(BLOCK_M=_p2(N, hi=block), BLOCK_N=_p2(N, hi=block), BLOCK_KA=ka, BLOCK_KB=kb,
             BLOCK_C=_p2(C, hi=block_c), num_warps=warps, num_stages=stages)
    kv_c = _p2(C, hi=KV_MAX_C[wide])
    kv = dict(BLOCK_M=_p2(N, hi=16), BLOCK_N=_p2(N, hi=16), BLOCK_KA=ka, BLOCK_KB=kb, BLOCK_C=kv_c,
              SINGLE_C=C <= kv_c, BLOCK_CD=_p2(C, hi=32 if wide else 64), num_warps=4 if wide and not big_k else 8,
              num_stages=1)
    return dict(q=q, kv=kv)


def _tiles(cfg: dict, **interpreter) -> dict:
    return dict(cfg, **interpreter) if INTERPRETER_TILES else cfg


def windows_per_program(B: int, blocks_per_window: int) -> int:
    """Windows one program loops over: >1 only when there are far more blocks than a GPU's
    resident programs, so packing cuts launch granularity without idling SMs."""
    return max(1, min(8, (B * blocks_per_window) // 2048))


def _wpp(B: int, blocks: int, override) -> int:
    return windows_per_program(B, blocks) if override is None else int(override)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 sum over the last dim of a * b, both contiguous and of the same shape."""
    cols = a.shape[-1]
    rows = a.numel() // max(cols, 1)
    out = torch.empty(a.shape[:-1], device=a.device, dtype=torch.float32)
    block_c = _p2(cols, hi=128)
    _row_dot_kernel[(triton.cdiv(rows, 16),)](a, b, out, rows, cols, BLOCK_R=16, BLOCK_C=block_c, num_warps=4,
                                              num_stages=2)
    return out


def row_strides(t: torch.Tensor) -> tuple:
    """(batch stride, row stride) of a (B_, N, X) tensor whose last dim is contiguous (the kernels' input layout)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"the last dim must be contiguous, got strides {t.stride()}")
    return t.stride(0), t.stride(1)


def semantic_attention_forward(sq, sk, yv, *, windows_per_program=None):
    """(out (B_, N, C) contiguous, lse (B_, N) fp32) for sq, sk (B_, N, K), yv (B_, N, C).

    The inputs may be row-strided views (last dim contiguous), e.g. column slices of one fused
    projection output: they are read in place.
    """
    B, N, K = sq.shape
    C = yv.shape[-1]
    out = torch.empty((B, N, C), device=yv.device, dtype=yv.dtype)
    lse = torch.empty((B, N), device=sq.device, dtype=torch.float32)
    cfg = _tiles(forward_config(N, K, C, sq.dtype), BLOCK_M=_p2(N, hi=64), BLOCK_N=_p2(N, hi=64),
                 BLOCK_C=_p2(C, hi=128))
    m_blocks = triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_C"])
    wpp = _wpp(B, m_blocks, windows_per_program)
    _sem_fwd_kernel[(m_blocks, triton.cdiv(B, wpp))](sq, sk, yv, out, lse, B, N, K, C, wpp, *row_strides(sq),
                                                     *row_strides(sk), *row_strides(yv),
                                                     DOT_FP32=dot_fp32(sq.dtype), **cfg)
    return out, lse


def semantic_attention_backward(sq, sk, yv, out, lse, dout, *, windows_per_program=None):
    """(dSq, dSk, dYv), contiguous, given the forward's out and lse and the output gradient (out and
    dout contiguous; sq, sk, yv as the forward took them)."""
    B, N, K = sq.shape
    C = yv.shape[-1]
    delta = torch.empty((B, N), device=sq.device, dtype=torch.float32)
    dsq = torch.empty((B, N, K), device=sq.device, dtype=sq.dtype)
    dsk = torch.empty_like(dsq)
    dyv = torch.empty_like(out)
    cfg = backward_config(N, K, C, sq.dtype)
    strides = (*row_strides(sq), *row_strides(sk), *row_strides(yv))
    flag = dot_fp32(sq.dtype)
    q_cfg = _tiles(cfg["q"], BLOCK_M=_p2(N, hi=64), BLOCK_N=_p2(N, hi=64), BLOCK_C=_p2(C, hi=64))
    q_blocks = triton.cdiv(N, q_cfg["BLOCK_M"])
    wpp = _wpp(B, q_blocks, windows_per_program)
    # The query-major kernel first: it also computes D = rowsum(dO * O), which the key-major kernel reads.
    _sem_bwd_q_kernel[(q_blocks, triton.cdiv(B, wpp))](sq, sk, yv, out, dout, lse, delta, dsq, B, N, K, C, wpp,
                                                       *strides, DOT_FP32=flag, **q_cfg)
    kv_cfg = _tiles(cfg["kv"], BLOCK_M=_p2(N, hi=64), BLOCK_N=_p2(N, hi=64))
    kv_blocks = triton.cdiv(N, kv_cfg["BLOCK_N"]) * triton.cdiv(C, kv_cfg["BLOCK_C"])
    wpp = _wpp(B, kv_blocks, windows_per_program)
    _sem_bwd_kv_kernel[(kv_blocks, triton.cdiv(B, wpp))](sq, sk, yv, dout, lse, delta, dsk, dyv, B, N, K, C, wpp,
                                                         *strides, DOT_FP32=flag, **kv_cfg)
    return dsq, dsk, dyv


# --------------------------------------------------------------------------- #
# Shipped configurations (compiled ahead of time by benchmarks/aot_compile.py)
# --------------------------------------------------------------------------- #
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

#: (name, N, K, C): SeMask-T..L windowed (ws 7/12) and global stages, ADE20K (150) and Cityscapes (19).
SHIPPED_SHAPES = [
    ("win7", 49, 150, 96), ("win12", 144, 150, 192), ("global", 1024, 150, 384), ("global-c1536", 400, 150, 1536),
    ("win7-city", 49, 19, 96), ("global-city", 1024, 19, 768),
]


def _aot_configs():
    configs = []
    strides = dict(sq_b="i32", sq_n="i32", sk_b="i32", sk_n="i32", yv_b="i32", yv_n="i32")
    for dtype, ty in _TY.items():
        for name, N, K, C in SHIPPED_SHAPES:
            f = forward_config(N, K, C, dtype)
            fopts = dict(num_warps=f.pop("num_warps"), num_stages=f.pop("num_stages"))
            sig = dict(SQ=f"*{ty}", SK=f"*{ty}", YV=f"*{ty}", OUT=f"*{ty}", LSE="*fp32", B="i32", N="i32",
                       K="i32", C="i32", WPP="i32", **strides, BLOCK_M="constexpr", BLOCK_N="constexpr",
                       BLOCK_K="constexpr", BLOCK_C="constexpr", DOT_FP32="constexpr")
            configs.append(AOTConfig(_sem_fwd_kernel, f"semantic_attention_fwd[{name},{ty}]", sig,
                                     dict(f, DOT_FP32=False), **fopts))
            scalars = dict(B="i32", N="i32", K="i32", C="i32", WPP="i32", **strides)
            for part, kernel, ptrs in (("q", _sem_bwd_q_kernel, ("SQ", "SK", "YV", "OUT", "DO", "LSE", "DELTA", "DSQ")),
                                       ("kv", _sem_bwd_kv_kernel, ("SQ", "SK", "YV", "DO", "LSE", "DELTA", "DSK",
                                                                   "DYV"))):
                cfg = dict(backward_config(N, K, C, dtype)[part], DOT_FP32=False)
                opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                sig = {p: ("*fp32" if p in ("LSE", "DELTA") else f"*{ty}") for p in ptrs}
                sig.update(scalars, **{c: "constexpr" for c in cfg})
                configs.append(AOTConfig(kernel, f"semantic_attention_bwd_{part}[{name},{ty}]", sig, cfg, **opts))
        for block_c in (16, 32, 64, 128):  # row_dot (the ATM backward's D) uses the row width, capped at 128
            configs.append(AOTConfig(_row_dot_kernel, f"row_dot[C<={block_c},{ty}]",
                                     dict(A=f"*{ty}", B=f"*{ty}", OUT="*fp32", R="i32", C="i32", BLOCK_R="constexpr",
                                          BLOCK_C="constexpr"), dict(BLOCK_R=16, BLOCK_C=block_c)))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["semantic_attention_forward", "semantic_attention_backward", "row_dot", "forward_config",
           "backward_config", "k_pieces", "windows_per_program", "row_strides", "MAX_K", "KV_MAX_C",
           "INTERPRETER_TILES", "AOT_CONFIGS"]
