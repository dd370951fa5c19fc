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

import torch
import triton
import triton.language as tl

from . import INTERPRETED, AOTConfig, dot_fp32
from ._common import mm
from .semantic_attention import row_dot

#: Supported head dims and head counts (the pass-1 statistics hold all heads in registers).
MIN_HEAD_DIM, MAX_HEAD_DIM, MAX_HEADS = 16, 128, 64

#: Triton's interpreter costs per operation, not per element: under it the launchers use the
#: largest tiles so the tests stay fast.  Compiled kernels always use the register-budgeted tiles
#: of ``forward_config``/``backward_config`` (the AOT_CONFIGS); tests set this to False on small
#: shapes to run those tiles too.
INTERPRETER_TILES = INTERPRETED


@triton.jit
def _keep(seed, bh, offs_m, offs_n, NQ, NK, dropout_p):
    return tl.rand(seed, (bh * NQ + offs_m[:, None]) * NK + offs_n[None, :]) >= dropout_p


@triton.jit
def _atm_fwd_kernel(Q, K, V, OUT, M, LSE, seed, H, NQ, NK, D, scale, dropout_p,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.arange(0, BLOCK_H)
    m_ok = offs_m < NQ
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]

    # Pass 1: head-mean logits and every head's softmax statistics.
    row_max = tl.full([BLOCK_M, BLOCK_H], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        s_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for hh in range(0, H):
            bh = b * H + hh
            q = tl.load(Q + (bh * NQ + offs_m[:, None]) * D + offs_d[None, :], mask=q_mask, other=0.0)
            kt = tl.load(K + (bh * NK + offs_n[None, :]) * D + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                         other=0.0)
            s = mm(q, kt, DOT_FP32) * scale
            s_sum += s
            s = tl.where(n_ok[None, :], s, float("-inf"))
            this = heads[None, :] == hh
            m_old = tl.max(tl.where(this, row_max, float("-inf")), 1)
            l_old = tl.sum(tl.where(this, row_sum, 0.0), 1)
            m_new = tl.maximum(m_old, tl.max(s, 1))
            l_new = l_old * tl.exp(m_old - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            row_max = tl.where(this, m_new[:, None], row_max)
            row_sum = tl.where(this, l_new[:, None], row_sum)
        tl.store(M + (b * NQ + offs_m[:, None]) * NK + offs_n[None, :], (s_sum / H).to(M.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    # Padding heads (>= H) have no statistics: log(1) keeps them finite; they are never selected.
    lse_all = row_max + tl.log(tl.where(heads[None, :] < H, row_sum, 1.0))

    # Pass 2: each head's output with the final statistics.
    keep_scale = 1.0 / (1.0 - dropout_p)
    for hh in range(0, H):
        bh = b * H + hh
        lse = tl.max(tl.where(heads[None, :] == hh, lse_all, float("-inf")), 1)
        q = tl.load(Q + (bh * NQ + offs_m[:, None]) * D + offs_d[None, :], mask=q_mask, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, NK, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < NK
            kt = tl.load(K + (bh * NK + offs_n[None, :]) * D + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                         other=0.0)
            s = mm(q, kt, DOT_FP32) * scale
            p = tl.where(n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            if DROPOUT:
                p = tl.where(_keep(seed, bh, offs_m, offs_n, NQ, NK, dropout_p), p * keep_scale, 0.0)
            v = tl.load(V + (bh * NK + offs_n[:, None]) * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc += mm(p.to(v.dtype), v, DOT_FP32)
        tl.store(OUT + (bh * NQ + offs_m[:, None]) * D + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=q_mask)
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
def _query_rows(Q, DO, LSE, DELTA, bh, g_ok, offs_m, offs_d, NQ, D):
    """q, dO tiles and the lse, delta rows of query rows offs_m for a group of heads, with the
    (heads, rows, d) and (heads, rows) masks they were loaded with."""
    m_ok = offs_m < NQ
    q_ok = g_ok[:, None, None] & m_ok[None, :, None] & (offs_d < D)[None, None, :]
    row_ok = g_ok[:, None] & m_ok[None, :]
    q = _head_tile(Q, bh, offs_m, offs_d, NQ, D, q_ok)
    do = _head_tile(DO, bh, offs_m, offs_d, NQ, D, q_ok)
    lse = tl.load(LSE + bh[:, None] * NQ + offs_m[None, :], mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh[:, None] * NQ + offs_m[None, :], mask=row_ok, other=0.0)
    return q, do, lse, delta, q_ok, row_ok


@triton.jit
def _key_rows(K, V, bh, g_ok, offs_n, offs_d, NK, D):
    """k, v tiles of keys offs_n for a group of heads, with their (heads, keys, d) mask."""
    kv_ok = g_ok[:, None, None] & (offs_n < NK)[None, :, None] & (offs_d < D)[None, None, :]
    return _head_tile(K, bh, offs_n, offs_d, NK, D, kv_ok), _head_tile(V, bh, offs_n, offs_d, NK, D, kv_ok), kv_ok


@triton.jit
def _dmask_tile(DM, b, offs_m, offs_n, NQ, NK):
    """The (BLOCK_M, BLOCK_N) tile of d(mask logits), shared by every head."""
    ok = (offs_m < NQ)[:, None] & (offs_n < NK)[None, :]
    return tl.load(DM + (b * NQ + offs_m[:, None]) * NK + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _grad_logits(q, k, v, do, lse, delta, dm, valid, bh, offs_m, offs_n, seed, NQ, NK, scale, dropout_p, H,
                 DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """(P*Z, dS) for one (query block, key block) tile of a group of heads, all (heads, BLOCK_M, BLOCK_N).

    dm is the (BLOCK_M, BLOCK_N) tile of d(mask logits), loaded once for every head of the group.
    """
    s = mm(q, _t(k), DOT_FP32) * scale
    p = tl.where(valid, tl.exp(s - lse[:, :, None]), 0.0)
    dp = mm(do, _t(v), DOT_FP32)
    pz = p
    if DROPOUT:
        keep = tl.rand(seed, (bh[:, None, None] * NQ + offs_m[None, :, None]) * NK + offs_n[None, None, :]) >= dropout_p
        keep_scale = 1.0 / (1.0 - dropout_p)
        pz = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    ds = tl.where(valid, p * (dp - delta[:, :, None]) + dm[None, :, :] / H, 0.0)
    return pz, ds


@triton.jit
def _atm_bwd_kv_kernel(Q, K, V, DO, DM, LSE, DELTA, DK, DV, seed, H, NQ, NK, D, scale, dropout_p,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                       DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """dk, dv for one key block and a group of BLOCK_G heads (batched tiles): each d(mask logits) tile
    is read once per group, not once per head."""
    b = tl.program_id(1).to(tl.int64)
    heads = tl.program_id(2) * BLOCK_G + tl.arange(0, BLOCK_G)
    bh = b * H + heads
    g_ok = heads < H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v, kv_ok = _key_rows(K, V, bh, g_ok, offs_n, offs_d, NK, D)
    dk = tl.zeros([BLOCK_G, BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_G, BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, NQ, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q, do, lse, delta, q_ok, row_ok = _query_rows(Q, DO, LSE, DELTA, bh, g_ok, offs_m, offs_d, NQ, D)
        dm = _dmask_tile(DM, b, offs_m, offs_n, NQ, NK)
        valid = row_ok[:, :, None] & (offs_n < NK)[None, None, :]
        pz, ds = _grad_logits(q, k, v, do, lse, delta, dm, valid, bh, offs_m, offs_n, seed, NQ, NK, scale,
                              dropout_p, H, DROPOUT, DOT_FP32)
        dv += mm(_t(pz.to(do.dtype)), do, DOT_FP32)
        dk += mm(_t(ds.to(q.dtype)), q, DOT_FP32)
    ptrs = (bh[:, None, None] * NK + offs_n[None, :, None]) * D + offs_d[None, None, :]
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _atm_bwd_q_kernel(Q, K, V, DO, DM, LSE, DELTA, DQ, seed, H, NQ, NK, D, scale, dropout_p,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                      DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """dq for one query block and a group of BLOCK_G heads; each d(mask logits) tile is read once per group."""
    b = tl.program_id(1).to(tl.int64)
    heads = tl.program_id(2) * BLOCK_G + tl.arange(0, BLOCK_G)
    bh = b * H + heads
    g_ok = heads < H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse, delta, q_ok, row_ok = _query_rows(Q, DO, LSE, DELTA, bh, g_ok, offs_m, offs_d, NQ, D)
    dq = tl.zeros([BLOCK_G, BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v, _ = _key_rows(K, V, bh, g_ok, offs_n, offs_d, NK, D)
        dm = _dmask_tile(DM, b, offs_m, offs_n, NQ, NK)
        valid = row_ok[:, :, None] & (offs_n < NK)[None, None, :]
        _, ds = _grad_logits(q, k, v, do, lse, delta, dm, valid, bh, offs_m, offs_n, seed, NQ, NK, scale,
                             dropout_p, H, DROPOUT, DOT_FP32)
        dq += mm(ds.to(k.dtype), k, DOT_FP32)
    ptrs = (bh[:, None, None] * NQ + offs_m[None, :, None]) * D + offs_d[None, None, :]
    tl.store(DQ + ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)


@triton.jit
def _atm_keep_kernel(KEEP, seed, NQ, NK, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, bh, offs_m, offs_n, NQ, NK, dropout_p)
    tl.store(KEEP + (bh * NQ + offs_m[:, None]) * NK + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m < NQ)[:, None] & (offs_n < NK)[None, :])


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def _p2(x: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def forward_config(heads: int, nq: int, nk: int, d: int, dtype) -> dict:
    """Block sizes and warps; chosen so every shipped configuration compiles without spills on sm_80
    and sm_90 (AOT table).  fp32 tiles take twice the registers and use FMA dots (ieee)."""
    if dtype == torch.float32:
        bm, bn = (16, 16) if d > 64 else (16, 32)
    else:
        bm, bn = (32, 32) if d > 64 else (64, 32)
    return dict(BLOCK_M=_p2(nq, hi=bm), BLOCK_N=_p2(nk, hi=bn), BLOCK_D=_p2(d), BLOCK_H=_p2(heads, lo=1),
                num_warps=8, num_stages=2)


#: Elements of one (heads, rows, d) register tile of the backward kernels, by (fp32, d > 32); larger
#: spill on sm_80/sm_90 (AOT table).
TILE_BUDGET = {(False, False): 4096, (False, True): 2048, (True, False): 2048, (True, True): 2048}


def _group(heads: int, budget: int) -> int:
    """Heads per program: a power of two within the budget, with at most 25% padding heads
    (12 heads: 3 groups of 4, not 2 of 8)."""
    group = max(1, min(_p2(heads, lo=1), budget))
    while group > 1 and 4 * triton.cdiv(heads, group) * group > 5 * heads:
        group //= 2
    return group


def backward_config(heads: int, nq: int, nk: int, d: int, dtype) -> dict:
    """Tiles and launch options of the two backward kernels, ``{"q": ..., "kv": ...}``.

    Each program holds BLOCK_G heads of its own rows (keys for kv, queries for q) as batched
    tiles: each d(mask logits) tile is read ceil(h / BLOCK_G) times instead of h times.  The rows
    it holds are the long side (32), the rows it streams 16: fewer programs re-read the streamed
    tensors (q and dO for kv, k and v for q).
    """
    wide = dtype == torch.float32
    block_d = _p2(d)
    budget = TILE_BUDGET[(wide, block_d > 32)]
    held = min(32, budget // block_d)
    kv_rows, q_rows = _p2(nk, hi=held), _p2(nq, hi=held)
    kv = dict(BLOCK_M=_p2(nq, hi=16), BLOCK_N=kv_rows, BLOCK_D=block_d,
              BLOCK_G=_group(heads, budget // (kv_rows * block_d)), num_warps=8,
              num_stages=2 if wide and block_d > 64 else 1)
    q = dict(BLOCK_M=q_rows, BLOCK_N=_p2(nk, hi=16), BLOCK_D=block_d,
             BLOCK_G=_group(heads, budget // (q_rows * block_d)), num_warps=8, num_stages=1)
    return dict(q=q, kv=kv)


def _tiles(cfg: dict, nq: int, nk: int) -> dict:
    return dict(cfg, BLOCK_M=_p2(nq, hi=64), BLOCK_N=_p2(nk, hi=64)) if INTERPRETER_TILES else cfg


def draw_seed() -> int:
    """Dropout seed from torch's default generator (``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int64).item())


def atm_attention_forward(q, k, v, *, scale: float, dropout_p: float = 0.0, seed: int = 0):
    """(out, mask_logits, lse) for contiguous q (B, h, Nq, d), k, v (B, h, Nk, d)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    out = torch.empty_like(q)
    mask_logits = torch.empty((B, NQ, NK), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    cfg = _tiles(forward_config(H, NQ, NK, D, q.dtype), NQ, NK)
    _atm_fwd_kernel[(triton.cdiv(NQ, cfg["BLOCK_M"]), B)](
        q, k, v, out, mask_logits, lse, seed, H, NQ, NK, D, scale, dropout_p,
        DROPOUT=dropout_p > 0, DOT_FP32=dot_fp32(q.dtype), **cfg)
    return out, mask_logits, lse


def atm_attention_backward(q, k, v, out, lse, dout, dmask, *, scale: float, dropout_p: float = 0.0, seed: int = 0):
    """(dq, dk, dv) from the gradients of both outputs (all contiguous)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    delta = row_dot(dout, out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = backward_config(H, NQ, NK, D, q.dtype)
    args = (seed, H, NQ, NK, D, scale, dropout_p)
    flags = dict(DROPOUT=dropout_p > 0, DOT_FP32=dot_fp32(q.dtype))
    kv = _tiles(cfg["kv"], NQ, NK)
    _atm_bwd_kv_kernel[(triton.cdiv(NK, kv["BLOCK_N"]), B, triton.cdiv(H, kv["BLOCK_G"]))](
        q, k, v, dout, dmask, lse, delta, dk, dv, *args, **flags, **kv)
    qc = _tiles(cfg["q"], NQ, NK)
    _atm_bwd_q_kernel[(triton.cdiv(NQ, qc["BLOCK_M"]), B, triton.cdiv(H, qc["BLOCK_G"]))](
        q, k, v, dout, dmask, lse, delta, dq, *args, **flags, **qc)
    return dq, dk, dv


def dropout_keep_mask(seed: int, batch: int, heads: int, nq: int, nk: int, dropout_p: float,
                      device=None) -> torch.Tensor:
    """(B, h, Nq, Nk) bool keep-mask the kernels draw for ``seed`` (replay it in the reference)."""
    keep = torch.empty((batch, heads, nq, nk), device=device, dtype=torch.int8)
    grid = (triton.cdiv(nq, 32), triton.cdiv(nk, 32), batch * heads)
    _atm_keep_kernel[grid](keep, seed, nq, nk, dropout_p, BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
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
    ptrs = ("Q", "K", "V")
    scalars = dict(seed="i32", H="i32", NQ="i32", NK="i32", D="i32", scale="fp32", dropout_p="fp32")
    for dtype, ty in _TY.items():
        for name, H, NQ, NK, D in SHIPPED_SHAPES:
            for dropout in (False, True):
                tag = f"{name},{ty}{',dropout' if dropout else ''}"
                fcfg = dict(forward_config(H, NQ, NK, D, dtype), DROPOUT=dropout, DOT_FP32=False)
                fopts = dict(num_warps=fcfg.pop("num_warps"), num_stages=fcfg.pop("num_stages"))
                sig = {p: f"*{ty}" for p in ptrs + ("OUT", "M")}
                sig.update(LSE="*fp32", **scalars, **{c: "constexpr" for c in fcfg})
                configs.append(AOTConfig(_atm_fwd_kernel, f"atm_attention_fwd[{tag}]", sig, fcfg, **fopts))
                base = {p: f"*{ty}" for p in ptrs + ("DO", "DM")}
                base.update(LSE="*fp32", DELTA="*fp32")
                for part, kernel, outs in (("kv", _atm_bwd_kv_kernel, ("DK", "DV")),
                                           ("q", _atm_bwd_q_kernel, ("DQ",))):
                    bcfg = dict(backward_config(H, NQ, NK, D, dtype)[part], DROPOUT=dropout, DOT_FP32=False)
                    bopts = dict(num_warps=bcfg.pop("num_warps"), num_stages=bcfg.pop("num_stages"))
                    sig = dict(base, **{o: f"*{ty}" for o in outs}, **scalars, **{c: "constexpr" for c in bcfg})
                    configs.append(AOTConfig(kernel, f"atm_attention_bwd_{part}[{tag}]", sig, bcfg, **bopts))
    configs.append(AOTConfig(_atm_keep_kernel, "atm_attention_keep",
                             dict(KEEP="*i8", seed="i32", NQ="i32", NK="i32", dropout_p="fp32", BLOCK_M="constexpr",
                                  BLOCK_N="constexpr"), dict(BLOCK_M=32, BLOCK_N=32)))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["atm_attention_forward", "atm_attention_backward", "dropout_keep_mask", "draw_seed", "forward_config",
           "backward_config", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "MAX_HEADS", "INTERPRETER_TILES",
           "AOT_CONFIGS"]
