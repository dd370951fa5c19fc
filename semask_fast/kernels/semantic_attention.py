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

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import AOTConfig, Plan, dot_fp32, interpreter_tiles, p2
from ._common import chunked_dot, load_rows, mm, row_dots, softmax_step, store_rows

#: Largest class count K the backward accumulators hold (K padded to a power of two).
MAX_K = 256


@triton.jit
def _row_and_c_tiles(C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """program_id(0) as (row block, C tile): the rows, the C columns and their mask, and the C tile."""
    num_c = tl.cdiv(C, BLOCK_C)
    pid_c = tl.program_id(0) % num_c
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return (tl.program_id(0) // num_c) * BLOCK_R + tl.arange(0, BLOCK_R), offs_c, offs_c < C, pid_c


@triton.jit
def _sem_fwd_kernel(SQ, SK, YV, OUT, LSE, B, N, K, C, WPP, sq_b, sq_n, sk_b, sk_n, yv_b, yv_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    offs_m, offs_c, c_ok, pid_c = _row_and_c_tiles(C, BLOCK_M, BLOCK_C)
    for w in range(0, WPP):
        b = tl.program_id(1).to(tl.int64) * WPP + w
        m_ok = (offs_m < N) & (b < B)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < N) & (b < B)
            s = chunked_dot(SQ + b * sq_b, SK + b * sk_b, offs_m, offs_n, m_ok, n_ok, K, sq_n, sk_n, BLOCK_K,
                            DOT_FP32)
            m_i, alpha, p, l_i = softmax_step(m_i, l_i, tl.where((offs_n < N)[None, :], s, float("-inf")))
            v = load_rows(YV + b * yv_b, offs_n, offs_c, yv_n, n_ok, c_ok)
            acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_FP32)
        store_rows(OUT + b * N * C, offs_m, offs_c, C, m_ok, c_ok, acc / l_i[:, None])
        # Every C tile computes the same statistics; the first one stores them.
        tl.store(LSE + b * N + offs_m, m_i + tl.log(l_i), mask=m_ok & (pid_c == 0))


@triton.jit
def _k_pieces(base, offs_r, sr, r_ok, K, BLOCK_KA: tl.constexpr, BLOCK_KB: tl.constexpr):
    """The (rows, K) operand as two register pieces: columns [0, BLOCK_KA) and [BLOCK_KA, BLOCK_KA +
    BLOCK_KB) (BLOCK_KB = 0: one piece, returned twice; the second is then never used)."""
    ka = tl.arange(0, BLOCK_KA)
    a = load_rows(base, offs_r, ka, sr, r_ok, ka < K)
    if BLOCK_KB > 0:
        kb = BLOCK_KA + tl.arange(0, BLOCK_KB)
        b = load_rows(base, offs_r, kb, sr, r_ok, kb < K)
    else:
        b = a
    return a, b


@triton.jit
def _store_k_pieces(base, offs_r, r_ok, K, a, b, BLOCK_KA: tl.constexpr, BLOCK_KB: tl.constexpr):
    ka = tl.arange(0, BLOCK_KA)
    store_rows(base, offs_r, ka, K, r_ok, ka < K, a)
    if BLOCK_KB > 0:
        kb = BLOCK_KA + tl.arange(0, BLOCK_KB)
        store_rows(base, offs_r, kb, K, r_ok, kb < K, b)


@triton.jit
def _pieces_scores(xa, xb, ya, yb, BLOCK_KB: tl.constexpr, DOT_FP32: tl.constexpr):
    """x y^T over K held as two pieces."""
    s = mm(xa, tl.trans(ya), DOT_FP32)
    if BLOCK_KB > 0:
        s += mm(xb, tl.trans(yb), DOT_FP32)
    return s


@triton.jit
def _add_ds_products(acc_a, acc_b, p, dp, delta, ya, yb, TRANSPOSE: tl.constexpr, BLOCK_KB: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """acc += dS y (dSq) or dS^T y (dSk, TRANSPOSE) with dS = P * (dP - D), y in two K pieces."""
    ds = p * (dp - delta[:, None])
    if TRANSPOSE:
        ds = tl.trans(ds)
    ds = ds.to(ya.dtype)
    acc_a += mm(ds, ya, DOT_FP32)
    if BLOCK_KB > 0:
        acc_b += mm(ds, yb, DOT_FP32)
    return acc_a, acc_b


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
        delta = row_dots(OUT + b * N * C, DO + b * N * C, offs_m, m_ok, C, BLOCK_M, BLOCK_C)
        tl.store(DELTA + b * N + offs_m, delta, mask=m_ok)
        qa, qb = _k_pieces(SQ + b * sq_b, offs_m, sq_n, m_ok, K, BLOCK_KA, BLOCK_KB)
        dsq_a = tl.zeros(qa.shape, dtype=tl.float32)
        dsq_b = tl.zeros(qb.shape, dtype=tl.float32)
        lse = tl.load(LSE + b * N + offs_m, mask=m_ok, other=0.0)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < N) & (b < B)
            ka, kb = _k_pieces(SK + b * sk_b, offs_n, sk_n, n_ok, K, BLOCK_KA, BLOCK_KB)
            s = _pieces_scores(qa, qb, ka, kb, BLOCK_KB, DOT_FP32)
            p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            # dO Yv^T over all of C
            dp = chunked_dot(DO + b * N * C, YV + b * yv_b, offs_m, offs_n, m_ok, n_ok, C, C, yv_n, BLOCK_C, DOT_FP32)
            dsq_a, dsq_b = _add_ds_products(dsq_a, dsq_b, p, dp, delta, ka, kb, False, BLOCK_KB, DOT_FP32)
        _store_k_pieces(DSQ + b * N * K, offs_m, m_ok, K, dsq_a, dsq_b, BLOCK_KA, BLOCK_KB)


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
    offs_n, offs_c, c_ok, pid_c = _row_and_c_tiles(C, BLOCK_N, BLOCK_C)
    for w in range(0, WPP):
        b = tl.program_id(1).to(tl.int64) * WPP + w
        n_ok = (offs_n < N) & (b < B)
        ka, kb = _k_pieces(SK + b * sk_b, offs_n, sk_n, n_ok, K, BLOCK_KA, BLOCK_KB)
        dsk_a = tl.zeros(ka.shape, dtype=tl.float32)
        dsk_b = tl.zeros(kb.shape, dtype=tl.float32)
        if SINGLE_C:
            yv = load_rows(YV + b * yv_b, offs_n, offs_c, yv_n, n_ok, c_ok)
        dyv = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for m0 in range(0, N, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = (offs_m < N) & (b < B)
            qa, qb = _k_pieces(SQ + b * sq_b, offs_m, sq_n, m_ok, K, BLOCK_KA, BLOCK_KB)
            s = _pieces_scores(qa, qb, ka, kb, BLOCK_KB, DOT_FP32)
            lse = tl.load(LSE + b * N + offs_m, mask=m_ok, other=0.0)
            p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            do = load_rows(DO + b * N * C, offs_m, offs_c, C, m_ok, c_ok)
            dyv += mm(tl.trans(p.to(do.dtype)), do, DOT_FP32)
            delta = tl.load(DELTA + b * N + offs_m, mask=m_ok, other=0.0)
            if SINGLE_C:
                dsk_a, dsk_b = _add_ds_products(dsk_a, dsk_b, p, mm(do, tl.trans(yv), DOT_FP32), delta, qa, qb, True,
                                                BLOCK_KB, DOT_FP32)
            elif pid_c == 0:
                dp = chunked_dot(DO + b * N * C, YV + b * yv_b, offs_m, offs_n, m_ok, n_ok, C, C, yv_n, BLOCK_CD,
                                 DOT_FP32)
                dsk_a, dsk_b = _add_ds_products(dsk_a, dsk_b, p, dp, delta, qa, qb, True, BLOCK_KB, DOT_FP32)
        store_rows(DYV + b * N * C, offs_n, offs_c, C, n_ok, c_ok, dyv)
        _store_k_pieces(DSK + b * N * K, offs_n, n_ok & (pid_c == 0), K, dsk_a, dsk_b, BLOCK_KA, BLOCK_KB)


# --------------------------------------------------------------------------- #
# Plans
# --------------------------------------------------------------------------- #
def k_pieces(K: int) -> tuple:
    """(BLOCK_KA, BLOCK_KB): K held in registers as two power-of-two pieces when that pads less than
    one (150 -> 128 + 32, not 256); BLOCK_KB = 0 when one piece is as small."""
    whole = p2(K)
    half = whole // 2
    rest = p2(K - half) if K > half else 0
    return (half, rest) if half >= 16 and 0 < rest and half + rest < whole else (whole, 0)


#: Widest C tile of the key-major backward (dYv accumulator + Yv and dO tiles in registers), by fp32-ness.
KV_MAX_C = {False: 256, True: 128}


def windows_per_program(B: int, blocks_per_window: int) -> int:
    """Windows one program loops over: >1 only when there are far more blocks than a GPU's
    resident programs, so packing cuts launch granularity without idling SMs."""
    return max(1, min(8, (B * blocks_per_window) // 2048))


def _packed(plan: Plan, B: int, blocks: int) -> Plan:
    return Plan(plan.tiles, plan.num_warps, plan.num_stages, per_program=windows_per_program(B, blocks))


def forward_plan(B: int, N: int, K: int, C: int, dtype, *, interpreter: Optional[bool] = None) -> Plan:
    """Tiles chosen so every shipped configuration compiles without spills (AOT table).  Triton's
    interpreter costs per operation, not per element: there the largest tiles keep tests fast."""
    interpreter = interpreter_tiles(interpreter)
    wide = dtype == torch.float32  # fp32 tiles take twice the registers and use FMA dots (ieee)
    rows = p2(N, hi=64 if interpreter or not wide else 32)
    plan = Plan(dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_K=p2(K, hi=32), BLOCK_C=p2(C, hi=128)), num_warps=8)
    return _packed(plan, B, triton.cdiv(N, rows) * triton.cdiv(C, plan["BLOCK_C"]))


def backward_plan(B: int, N: int, K: int, C: int, dtype, *, interpreter: Optional[bool] = None) -> dict:
    """Plans of the two backward kernels: ``{"q": ..., "kv": ...}``.

    The key-major kernel holds dYv for a C tile as wide as registers allow (``KV_MAX_C``; all of C at
    SeMask-T stage 1) so S and P are computed once per tile pair and C tile, and dP once per tile
    pair; the query-major kernel streams C in BLOCK_C chunks.  The (block x K) dSq/dSk accumulators
    live in registers: smaller blocks for large K.  fp32 tiles take twice the registers and use FMA
    dots (ieee): narrower C tiles.  One pipeline stage where two spill.  Every shipped configuration
    compiles without spills (AOT table).
    """
    interpreter = interpreter_tiles(interpreter)
    wide = dtype == torch.float32
    big_k = p2(K) > 64
    if wide:
        block, block_c, warps = 16, 16, (8 if big_k else 4)
    elif big_k:
        block, block_c, warps = 16, 32, 8
    else:
        block, block_c, warps = 32, 64, 8
    if interpreter:
        block, block_c = 64, 64
    ka, kb = k_pieces(K)
    q = Plan(dict(BLOCK_M=p2(N, hi=block), BLOCK_N=p2(N, hi=block), BLOCK_KA=ka, BLOCK_KB=kb,
                  BLOCK_C=p2(C, hi=block_c)), num_warps=warps, num_stages=1 if wide else 2)
    kv_c = p2(C, hi=KV_MAX_C[wide])
    kv_rows = p2(N, hi=64 if interpreter else 16)
    kv = Plan(dict(BLOCK_M=kv_rows, BLOCK_N=kv_rows, BLOCK_KA=ka, BLOCK_KB=kb, BLOCK_C=kv_c, SINGLE_C=C <= kv_c,
                   BLOCK_CD=p2(C, hi=32 if wide else 64)), num_warps=4 if wide and not big_k else 8, num_stages=1)
    return dict(q=_packed(q, B, triton.cdiv(N, q["BLOCK_M"])),
                kv=_packed(kv, B, triton.cdiv(N, kv_rows) * triton.cdiv(C, kv_c)))


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def row_strides(t: torch.Tensor) -> tuple:
    """(batch stride, row stride) of a (B_, N, X) tensor whose last dim is contiguous (the kernels' input layout)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"the last dim must be contiguous, got strides {t.stride()}")
    return t.stride(0), t.stride(1)


def semantic_attention_forward(sq, sk, yv, *, plan: Plan = None):
    """(out (B_, N, C) contiguous, lse (B_, N) fp32) for sq, sk (B_, N, K), yv (B_, N, C).

    The inputs may be row-strided views (last dim contiguous), e.g. column slices of one fused
    projection output: they are read in place.
    """
    B, N, K = sq.shape
    C = yv.shape[-1]
    plan = plan or forward_plan(B, N, K, C, sq.dtype)
    out = torch.empty((B, N, C), device=yv.device, dtype=yv.dtype)
    lse = torch.empty((B, N), device=sq.device, dtype=torch.float32)
    wpp = plan.per_program
    grid = (triton.cdiv(N, plan["BLOCK_M"]) * triton.cdiv(C, plan["BLOCK_C"]), triton.cdiv(B, wpp))
    _sem_fwd_kernel[grid](sq, sk, yv, out, lse, B, N, K, C, wpp, *row_strides(sq), *row_strides(sk),
                          *row_strides(yv), DOT_FP32=dot_fp32(sq.dtype), **plan.launch())
    return out, lse


def semantic_attention_backward(sq, sk, yv, out, lse, dout, *, plan: dict = None,
                                needs: Tuple[bool, bool] = (True, True)):
    """(dSq, dSk, dYv), contiguous, given the forward's out and lse and the output gradient (out and
    dout contiguous; sq, sk, yv as the forward took them).  ``needs`` says whether dSq and (dSk, dYv)
    are wanted: each comes from its own kernel, launched only then (None otherwise).  ``plan``: as
    :func:`backward_plan`."""
    B, N, K = sq.shape
    C = yv.shape[-1]
    plan = plan or backward_plan(B, N, K, C, sq.dtype)
    dsq = dsk = dyv = None
    args = (B, N, K, C)
    strides = (*row_strides(sq), *row_strides(sk), *row_strides(yv))
    flag = dot_fp32(sq.dtype)
    q, kv = plan["q"], plan["kv"]
    if needs[0]:
        # The query-major kernel first: it also computes D = rowsum(dO * O), which the key-major
        # kernel reads.
        delta = torch.empty((B, N), device=sq.device, dtype=torch.float32)
        dsq = torch.empty((B, N, K), device=sq.device, dtype=sq.dtype)
        _sem_bwd_q_kernel[(triton.cdiv(N, q["BLOCK_M"]), triton.cdiv(B, q.per_program))](
            sq, sk, yv, out, dout, lse, delta, dsq, *args, q.per_program, *strides, DOT_FP32=flag, **q.launch())
    else:
        delta = (dout.float() * out.float()).sum(-1)
    if needs[1]:
        dsk = torch.empty((B, N, K), device=sq.device, dtype=sq.dtype)
        dyv = torch.empty_like(out)
        kv_grid = (triton.cdiv(N, kv["BLOCK_N"]) * triton.cdiv(C, kv["BLOCK_C"]), triton.cdiv(B, kv.per_program))
        _sem_bwd_kv_kernel[kv_grid](sq, sk, yv, dout, lse, delta, dsk, dyv, *args, kv.per_program, *strides,
                                    DOT_FP32=flag, **kv.launch())
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
    scalars = dict(B="i32", N="i32", K="i32", C="i32", WPP="i32", sq_b="i32", sq_n="i32", sk_b="i32", sk_n="i32",
                   yv_b="i32", yv_n="i32")
    kernels = (("fwd", _sem_fwd_kernel, ("SQ", "SK", "YV", "OUT", "LSE")),
               ("bwd_q", _sem_bwd_q_kernel, ("SQ", "SK", "YV", "OUT", "DO", "LSE", "DELTA", "DSQ")),
               ("bwd_kv", _sem_bwd_kv_kernel, ("SQ", "SK", "YV", "DO", "LSE", "DELTA", "DSK", "DYV")))
    for dtype, ty in _TY.items():
        for name, N, K, C in SHIPPED_SHAPES:
            bwd = backward_plan(1, N, K, C, dtype, interpreter=False)
            plans = dict(fwd=forward_plan(1, N, K, C, dtype, interpreter=False), bwd_q=bwd["q"], bwd_kv=bwd["kv"])
            for part, kernel, ptrs in kernels:
                sig = {p: ("*fp32" if p in ("LSE", "DELTA") else f"*{ty}") for p in ptrs}
                configs.append(AOTConfig.from_plan(kernel, f"semantic_attention_{part}[{name},{ty}]",
                                                   dict(sig, **scalars), plans[part], DOT_FP32=False))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["semantic_attention_forward", "semantic_attention_backward", "forward_plan", "backward_plan", "k_pieces",
           "windows_per_program", "row_strides", "MAX_K", "KV_MAX_C", "AOT_CONFIGS"]
