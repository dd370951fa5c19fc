"""SegViT ATM cross-attention: Triton kernels and launchers.

Layout (contiguous): q, out (B, h, Nq, d); k, v (B, h, Nk, d); mask logits
M (B, Nq, Nk); lse (B, h, Nq) fp32.  Official semantics (SPEC.md section 3):
S_h = (q_h k_h^T) * scale, M = sum_h S_h / h (before softmax and dropout),
out_h = dropout(softmax(S_h)) v_h.

Forward, one program per (class-token block, image), all heads inside it so the
(B, h, Nq, Nk) logits never exist:
  pass 1, key tiles outer / heads inner: sum S_h over heads into the M tile
          (stored once) and update each head's running row max and sum of
          exponentials, kept as (BLOCK_M, heads) register tiles;
  pass 2, heads outer / key tiles inner: P = exp(S - lse) with the final
          logsumexp, out_h = P v (no rescaling), lse stored for backward.
S is computed twice (q k^T is d/(d+d) of the FLOPs); k is read twice, v once.

Dropout: Philox ``tl.rand(seed, ((b*h + head)*Nq + i)*Nk + j) >= p`` keeps an
element, identical in forward and backward; ``dropout_keep_mask`` materialises
it for a seed so tests can replay it in the reference.

Backward takes dO and dM: D = rowsum(dO * O) (also right with dropout), then
  dP = (dO v^T) * Z,  dS_h = P * (dP - D) + dM / h,  Z = keep / (1 - p),
  dq = scale dS k,  dk = scale dS^T q,  dv = (P * Z)^T dO,
key-major for (dk, dv) and query-major for dq, one (block, image, group of
BLOCK_G heads) each: the heads of a group are a batch dim of the register tiles
(batched tl.dot), so each dM tile is read once per group instead of once per
head (fp16/bf16, d = 32: groups of 4 heads, 4 reads for SegViT-L's 16 heads
instead of 16).  Register budget: a program holds 32 rows of its heads and
streams 16 (``backward_config``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import AOTConfig, Plan, dot_fp32, interpreter_tiles, p2
from ._common import (dropout_keep, dropped, load_cols, load_rows, load_seed, mm, row_dot, row_dot_kernel,
                      row_dot_plan, seed_tensor, softmax_step, store_rows)

#: Supported head dims and head counts (the pass-1 statistics hold all heads in registers).
MIN_HEAD_DIM, MAX_HEAD_DIM, MAX_HEADS = 16, 128, 64


@triton.jit
def _head_scores(Q, K, bh, offs_m, offs_n, offs_d, m_ok, n_ok, d_ok, NQ, NK, D, scale, DOT_FP32: tl.constexpr):
    """q k^T * scale of one head: (BLOCK_M, BLOCK_N) fp32."""
    q = load_rows(Q + bh * NQ * D, offs_m, offs_d, D, m_ok, d_ok)
    return mm(q, load_cols(K + bh * NK * D, offs_n, offs_d, D, n_ok, d_ok), DOT_FP32) * scale


@triton.jit
def _atm_fwd_kernel(Q, K, V, OUT, M, LSE, SEED, H, NQ, NK, D, scale, dropout_p,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.arange(0, BLOCK_H)
    m_ok = offs_m < NQ
    d_ok = offs_d < D

    # Pass 1: head-mean logits and every head's softmax statistics.
    row_max = tl.full([BLOCK_M, BLOCK_H], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        s_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for hh in range(0, H):
            s = _head_scores(Q, K, b * H + hh, offs_m, offs_n, offs_d, m_ok, n_ok, d_ok, NQ, NK, D, scale, DOT_FP32)
            s_sum += s
            this = heads[None, :] == hh
            m_new, _, _, l_new = softmax_step(tl.max(tl.where(this, row_max, float("-inf")), 1),
                                              tl.sum(tl.where(this, row_sum, 0.0), 1),
                                              tl.where(n_ok[None, :], s, float("-inf")))
            row_max = tl.where(this, m_new[:, None], row_max)
            row_sum = tl.where(this, l_new[:, None], row_sum)
        store_rows(M + b * NQ * NK, offs_m, offs_n, NK, m_ok, n_ok, s_sum / H)
    # Padding heads (>= H) have no statistics: log(1) keeps them finite; they are never selected.
    lse_all = row_max + tl.log(tl.where(heads[None, :] < H, row_sum, 1.0))

    # Pass 2: each head's output with the final statistics.
    for hh in range(0, H):
        bh = b * H + hh
        lse = tl.max(tl.where(heads[None, :] == hh, lse_all, float("-inf")), 1)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, NK, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < NK
            s = _head_scores(Q, K, bh, offs_m, offs_n, offs_d, m_ok, n_ok, d_ok, NQ, NK, D, scale, DOT_FP32)
            p = tl.where(n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            if DROPOUT:
                seed = load_seed(SEED, DROPOUT)  # at its use: held across the loops it spills fp32 tiles
                p = dropped(p, dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], NQ, NK, dropout_p), dropout_p)
            v = load_rows(V + bh * NK * D, offs_n, offs_d, D, n_ok, d_ok)
            acc += mm(p.to(v.dtype), v, DOT_FP32)
        store_rows(OUT + bh * NQ * D, offs_m, offs_d, D, m_ok, d_ok, acc)
        tl.store(LSE + bh * NQ + offs_m, lse, mask=m_ok)


@triton.jit
def _t(x):
    """Swap the last two dims of a (heads, rows, cols) tile."""
    return tl.permute(x, (0, 2, 1))


@triton.jit
def _head_tile(base, bh, offs_r, offs_d, R, D, ok):
    """(BLOCK_G, rows, BLOCK_D) tile of a (B, h, R, D) tensor: heads bh, rows offs_r."""
    ptrs = base + ((bh[:, None, None] * R + offs_r[None, :, None]) * D + offs_d[None, None, :])
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _rows_mask(g_ok, offs_r, offs_d, R, D):
    """(heads, rows, d) mask of rows offs_r of a group of heads."""
    return g_ok[:, None, None] & (offs_r < R)[None, :, None] & (offs_d < D)[None, None, :]


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, bh, g_ok, offs_m, offs_d, NQ, D):
    """q, dO tiles and the lse, delta rows of query rows offs_m for a group of heads, with the
    (heads, rows) mask they were loaded with."""
    q_ok = _rows_mask(g_ok, offs_m, offs_d, NQ, D)
    row_ok = g_ok[:, None] & (offs_m < NQ)[None, :]
    q = _head_tile(Q, bh, offs_m, offs_d, NQ, D, q_ok)
    do = _head_tile(DO, bh, offs_m, offs_d, NQ, D, q_ok)
    lse = tl.load(LSE + bh[:, None] * NQ + offs_m[None, :], mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh[:, None] * NQ + offs_m[None, :], mask=row_ok, other=0.0)
    return q, do, lse, delta, row_ok


@triton.jit
def _key_rows(K, V, bh, g_ok, offs_n, offs_d, NK, D):
    """k, v tiles of keys offs_n for a group of heads."""
    kv_ok = _rows_mask(g_ok, offs_n, offs_d, NK, D)
    return _head_tile(K, bh, offs_n, offs_d, NK, D, kv_ok), _head_tile(V, bh, offs_n, offs_d, NK, D, kv_ok)


@triton.jit
def _store_head_rows(base, x, bh, g_ok, offs_r, offs_d, R, D):
    ptrs = (bh[:, None, None] * R + offs_r[None, :, None]) * D + offs_d[None, None, :]
    tl.store(base + ptrs, x.to(base.dtype.element_ty), mask=_rows_mask(g_ok, offs_r, offs_d, R, D))


@triton.jit
def _grad_logits(q, k, v, do, lse, delta, row_ok, DM, b, bh, offs_m, offs_n, seed, NQ, NK, scale, dropout_p, H,
                 DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """(P*Z, dS) for one (query block, key block) tile of a group of heads, all (heads, BLOCK_M, BLOCK_N).

    The (BLOCK_M, BLOCK_N) tile of d(mask logits) is loaded once for every head of the group.
    """
    dm = load_rows(DM + b * NQ * NK, offs_m, offs_n, NK, offs_m < NQ, offs_n < NK).to(tl.float32)
    valid = row_ok[:, :, None] & (offs_n < NK)[None, None, :]
    p = tl.where(valid, tl.exp(mm(q, _t(k), DOT_FP32) * scale - lse[:, :, None]), 0.0)
    dp = mm(do, _t(v), DOT_FP32)
    pz = p
    if DROPOUT:
        keep = dropout_keep(seed, bh[:, None, None], offs_m[None, :, None], offs_n[None, None, :], NQ, NK, dropout_p)
        pz = dropped(p, keep, dropout_p)
        dp = dropped(dp, keep, dropout_p)
    ds = tl.where(valid, p * (dp - delta[:, :, None]) + dm[None, :, :] / H, 0.0)
    return pz, ds


@triton.jit
def _atm_bwd_kv_kernel(Q, K, V, DO, DM, LSE, DELTA, DK, DV, SEED, H, NQ, NK, D, scale, dropout_p,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                       DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """dk, dv for one key block and a group of BLOCK_G heads (batched tiles): each d(mask logits) tile
    is read once per group, not once per head."""
    seed = load_seed(SEED, DROPOUT)
    b = tl.program_id(1).to(tl.int64)
    heads = tl.program_id(2) * BLOCK_G + tl.arange(0, BLOCK_G)
    bh = b * H + heads
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v = _key_rows(K, V, bh, heads < H, offs_n, offs_d, NK, D)
    dk = tl.zeros([BLOCK_G, BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_G, BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, NQ, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q, do, lse, delta, row_ok = _query_rows(Q, DO, LSE, DELTA, bh, heads < H, offs_m, offs_d, NQ, D)
        pz, ds = _grad_logits(q, k, v, do, lse, delta, row_ok, DM, b, bh, offs_m, offs_n, seed, NQ, NK, scale,
                              dropout_p, H, DROPOUT, DOT_FP32)
        dv += mm(_t(pz.to(do.dtype)), do, DOT_FP32)
        dk += mm(_t(ds.to(q.dtype)), q, DOT_FP32)
    _store_head_rows(DK, dk * scale, bh, heads < H, offs_n, offs_d, NK, D)
    _store_head_rows(DV, dv, bh, heads < H, offs_n, offs_d, NK, D)


@triton.jit
def _atm_bwd_q_kernel(Q, K, V, DO, DM, LSE, DELTA, DQ, SEED, H, NQ, NK, D, scale, dropout_p,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                      DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """dq for one query block and a group of BLOCK_G heads; each d(mask logits) tile is read once per group."""
    seed = load_seed(SEED, DROPOUT)
    b = tl.program_id(1).to(tl.int64)
    heads = tl.program_id(2) * BLOCK_G + tl.arange(0, BLOCK_G)
    bh = b * H + heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse, delta, row_ok = _query_rows(Q, DO, LSE, DELTA, bh, heads < H, offs_m, offs_d, NQ, D)
    dq = tl.zeros([BLOCK_G, BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _key_rows(K, V, bh, heads < H, offs_n, offs_d, NK, D)
        _, ds = _grad_logits(q, k, v, do, lse, delta, row_ok, DM, b, bh, offs_m, offs_n, seed, NQ, NK, scale,
                             dropout_p, H, DROPOUT, DOT_FP32)
        dq += mm(ds.to(k.dtype), k, DOT_FP32)
    _store_head_rows(DQ, dq * scale, bh, heads < H, offs_m, offs_d, NQ, D)


@triton.jit
def _atm_keep_kernel(KEEP, SEED, NQ, NK, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = load_seed(SEED, True)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], NQ, NK, dropout_p)
    store_rows(KEEP + bh * NQ * NK, offs_m, offs_n, NK, offs_m < NQ, offs_n < NK, keep)


# --------------------------------------------------------------------------- #
# Plans
# --------------------------------------------------------------------------- #
#: Elements of one (heads, rows, d) register tile of the backward kernels, by (fp32, d > 32); larger
#: spill on sm_80/sm_90 (AOT table).
TILE_BUDGET = {(False, False): 4096, (False, True): 2048, (True, False): 2048, (True, True): 2048}

#: Triton's interpreter costs per operation, not per element: there the row tiles are this large.
INTERPRETER_ROWS = 64


def forward_plan(heads: int, nq: int, nk: int, d: int, dtype, *, dropout: bool = False,
                 interpreter: Optional[bool] = None) -> Plan:
    """Tiles chosen so every shipped configuration compiles without spills on sm_80 and sm_90 (AOT
    table).  fp32 tiles take twice the registers and use FMA dots (ieee); with d > 64 and dropout
    (its seed and Philox state) one pipeline stage."""
    interpreter = interpreter_tiles(interpreter)
    if interpreter:
        bm = bn = INTERPRETER_ROWS
    elif dtype == torch.float32:
        bm, bn = (16, 16) if d > 64 else (16, 32)
    else:
        bm, bn = (32, 32) if d > 64 else (64, 32)
    stages = 1 if dtype == torch.float32 and d > 64 and dropout else 2
    return Plan(dict(BLOCK_M=p2(nq, hi=bm), BLOCK_N=p2(nk, hi=bn), BLOCK_D=p2(d), BLOCK_H=p2(heads, lo=1)),
                num_warps=8, num_stages=stages)


def _group(heads: int, budget: int) -> int:
    """Heads per program: a power of two within the budget, with at most 25% padding heads
    (12 heads: 3 groups of 4, not 2 of 8)."""
    group = max(1, min(p2(heads, lo=1), budget))
    while group > 1 and 4 * triton.cdiv(heads, group) * group > 5 * heads:
        group //= 2
    return group


def backward_plan(heads: int, nq: int, nk: int, d: int, dtype, *, interpreter: Optional[bool] = None) -> dict:
    """Plans of the two backward kernels, ``{"q": ..., "kv": ...}``.

    Each program holds BLOCK_G heads of its own rows (keys for kv, queries for q) as batched
    tiles: each d(mask logits) tile is read ceil(h / BLOCK_G) times instead of h times.  The rows
    it holds are the long side (32), the rows it streams 16: fewer programs re-read the streamed
    tensors (q and dO for kv, k and v for q).  The head groups follow the register budget also
    under the interpreter; only the row tiles grow there.
    """
    interpreter = interpreter_tiles(interpreter)
    wide = dtype == torch.float32
    block_d = p2(d)
    budget = TILE_BUDGET[(wide, block_d > 32)]
    held = min(32, budget // block_d)
    kv_rows, q_rows = p2(nk, hi=held), p2(nq, hi=held)
    streamed = INTERPRETER_ROWS if interpreter else 16
    kv = Plan(dict(BLOCK_M=p2(nq, hi=streamed), BLOCK_N=kv_rows, BLOCK_D=block_d,
                   BLOCK_G=_group(heads, budget // (kv_rows * block_d))), num_warps=8,
              num_stages=2 if wide and block_d > 64 else 1)
    q = Plan(dict(BLOCK_M=q_rows, BLOCK_N=p2(nk, hi=streamed), BLOCK_D=block_d,
                  BLOCK_G=_group(heads, budget // (q_rows * block_d))), num_warps=8, num_stages=1)
    if interpreter:
        kv = kv.with_tiles(BLOCK_N=p2(nk, hi=INTERPRETER_ROWS))
        q = q.with_tiles(BLOCK_M=p2(nq, hi=INTERPRETER_ROWS))
    return dict(q=q, kv=kv)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def atm_attention_forward(q, k, v, *, scale: float, dropout_p: float = 0.0, seed: Union[int, torch.Tensor] = 0,
                          plan: Plan = None):
    """(out, mask_logits, lse) for contiguous q (B, h, Nq, d), k, v (B, h, Nk, d)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    plan = plan or forward_plan(H, NQ, NK, D, q.dtype, dropout=dropout_p > 0.0)
    out = torch.empty_like(q)
    mask_logits = torch.empty((B, NQ, NK), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    _atm_fwd_kernel[(triton.cdiv(NQ, plan["BLOCK_M"]), B)](
        q, k, v, out, mask_logits, lse, seed_tensor(seed, q.device), H, NQ, NK, D, scale, dropout_p,
        DROPOUT=dropout_p > 0, DOT_FP32=dot_fp32(q.dtype), **plan.launch())
    return out, mask_logits, lse


def atm_attention_backward(q, k, v, out, lse, dout, dmask, *, scale: float, dropout_p: float = 0.0,
                           seed: Union[int, torch.Tensor] = 0, plan: dict = None,
                           needs: Tuple[bool, bool] = (True, True)):
    """(dq, dk, dv) from the gradients of both outputs (all contiguous).  ``needs`` says whether dq and
    (dk, dv) are wanted: each comes from its own kernel, launched only then (None otherwise).
    ``plan``: as :func:`backward_plan`."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    plan = plan or backward_plan(H, NQ, NK, D, q.dtype)
    delta = row_dot(dout, out)
    dq = dk = dv = None
    args = (seed_tensor(seed, q.device), H, NQ, NK, D, scale, dropout_p)
    flags = dict(DROPOUT=dropout_p > 0, DOT_FP32=dot_fp32(q.dtype))
    kv, qp = plan["kv"], plan["q"]
    if needs[1]:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _atm_bwd_kv_kernel[(triton.cdiv(NK, kv["BLOCK_N"]), B, triton.cdiv(H, kv["BLOCK_G"]))](
            q, k, v, dout, dmask, lse, delta, dk, dv, *args, **flags, **kv.launch())
    if needs[0]:
        dq = torch.empty_like(q)
        _atm_bwd_q_kernel[(triton.cdiv(NQ, qp["BLOCK_M"]), B, triton.cdiv(H, qp["BLOCK_G"]))](
            q, k, v, dout, dmask, lse, delta, dq, *args, **flags, **qp.launch())
    return dq, dk, dv


#: The keep-mask kernel's launch (tests only).
KEEP_PLAN = Plan(dict(BLOCK_M=32, BLOCK_N=32), num_warps=4, num_stages=2)


def dropout_keep_mask(seed: Union[int, torch.Tensor], batch: int, heads: int, nq: int, nk: int, dropout_p: float,
                      device=None) -> torch.Tensor:
    """(B, h, Nq, Nk) bool keep-mask the kernels draw for ``seed`` (replay it in the reference)."""
    keep = torch.empty((batch, heads, nq, nk), device=device, dtype=torch.int8)
    grid = (triton.cdiv(nq, KEEP_PLAN["BLOCK_M"]), triton.cdiv(nk, KEEP_PLAN["BLOCK_N"]), batch * heads)
    _atm_keep_kernel[grid](keep, seed_tensor(seed, keep.device), nq, nk, dropout_p, **KEEP_PLAN.launch())
    return keep.bool()


# --------------------------------------------------------------------------- #
# Shipped configurations (compiled ahead of time by benchmarks/aot_compile.py)
# --------------------------------------------------------------------------- #
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

#: (name, heads, Nq, Nk, d): SegViT ViT-L (dim 512, h 16) and ViT-B (dim 384, h 12) at ADE20K; d 64/128 variants.
SHIPPED_SHAPES = [("vitl", 16, 150, 1600, 32), ("vitb", 12, 150, 1024, 32), ("d64", 8, 150, 1024, 64),
                  ("d128", 4, 150, 1024, 128), ("d16", 8, 150, 1024, 16)]


def _aot_configs():
    configs = []
    scalars = dict(SEED="*i64", H="i32", NQ="i32", NK="i32", D="i32", scale="fp32", dropout_p="fp32")
    kernels = (("fwd", _atm_fwd_kernel, ("OUT", "M")), ("bwd_kv", _atm_bwd_kv_kernel, ("DO", "DM", "DK", "DV")),
               ("bwd_q", _atm_bwd_q_kernel, ("DO", "DM", "DQ")))
    for dtype, ty in _TY.items():
        for name, H, NQ, NK, D in SHIPPED_SHAPES:
            bwd = backward_plan(H, NQ, NK, D, dtype, interpreter=False)
            for dropout in (False, True):
                plans = dict(fwd=forward_plan(H, NQ, NK, D, dtype, dropout=dropout, interpreter=False),
                             bwd_kv=bwd["kv"], bwd_q=bwd["q"])
                tag = f"{name},{ty}{',dropout' if dropout else ''}"
                for part, kernel, ptrs in kernels:
                    sig = {p: f"*{ty}" for p in ("Q", "K", "V") + ptrs}
                    sig.update(LSE="*fp32", DELTA="*fp32", **scalars)
                    sig = {a: t for a, t in sig.items() if a in kernel.arg_names}
                    configs.append(AOTConfig.from_plan(kernel, f"atm_attention_{part}[{tag}]", sig, plans[part],
                                                       DROPOUT=dropout, DOT_FP32=False))
        # The backward's D = rowsum(dO * O) uses the row width (d), capped at 128.
        for d in (16, 32, 64, 128):
            configs.append(AOTConfig.from_plan(row_dot_kernel, f"row_dot[C<={d},{ty}]",
                                               dict(A=f"*{ty}", B=f"*{ty}", OUT="*fp32", R="i32", C="i32"),
                                               row_dot_plan(d)))
    configs.append(AOTConfig.from_plan(_atm_keep_kernel, "atm_attention_keep",
                                       dict(KEEP="*i8", SEED="*i64", NQ="i32", NK="i32", dropout_p="fp32"), KEEP_PLAN))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["atm_attention_forward", "atm_attention_backward", "dropout_keep_mask", "forward_plan", "backward_plan",
           "MIN_HEAD_DIM", "MAX_HEAD_DIM", "MAX_HEADS", "AOT_CONFIGS"]
