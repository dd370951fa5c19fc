"""Segmenter's normalised patch-class similarity: Triton kernels and launchers.

Layout (contiguous): patches P (B, Np, D), classes C (B, K, D), out (B, Np, K).
S = (P / |P|) (C / |C|)^T, no epsilon (official code); optionally the
``mask_norm`` LayerNorm over K as the epilogue.

Forward, one program per (patch block, image) holding all K columns (K padded
to a power of two in registers, K <= 256): one pass over D accumulates the raw
product P C^T and both sums of squares, so the norms are computed once, inside
the product loop, and applied to the (BLOCK_M, K) tile; no normalised copy of P
or C is written.  The inverse norms (fp32) are saved for backward.

Backward, with dS the gradient before the LayerNorm (computed in-register from
the recomputed S), r_i = sum_j dS_ij S_ij and t_j = sum_i dS_ij S_ij:
  dP_i = rp_i sum_j dS_ij rc_j C_j - rp_i^2 r_i P_i
  dC_j = rc_j sum_i dS_ij rp_i P_i - rc_j^2 t_j C_j
A patch-major kernel writes dP, dS (fp32, the size of the output) and per-block
partial sums (t, d weight, d bias); a class-major kernel reduces dS^T P over
patches for dC.  Partial sums are reduced in a fixed order: deterministic.
Only the gradients autograd needs are computed: without dP the patch-major
kernel skips its D loop, without dC it writes neither dS nor t and the
class-major kernel is not launched.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import AOTConfig, Plan, dot_fp32, interpreter_tiles, p2, triton_version
from ._common import load_cols, load_rows, mm, store_rows

#: Largest class count: a program holds all K columns (LayerNorm over K) in registers.
MAX_K = 256
#: The narrowest fp32 (ieee) dot the installed Triton compiles (seen on a GPU: 3.6 rejects 8).
FP32_DOT_MIN_K = 8 if triton_version() >= (3, 8) else 16


@triton.jit
def _scores(P, C, b, NP, K, D, BLOCK_M: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_D: tl.constexpr,
            DOT_FP32: tl.constexpr):
    """The patch block of program_id(0) against all K classes, one pass over D: the raw product
    P C^T (BLOCK_M, BLOCK_KP) and the squared norms of those patches and classes."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_KP)
    m_ok = offs_m < NP
    k_ok = offs_k < K
    acc = tl.zeros([BLOCK_M, BLOCK_KP], dtype=tl.float32)
    sp = tl.zeros([BLOCK_M], dtype=tl.float32)
    sc = tl.zeros([BLOCK_KP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        p = load_rows(P + b * NP * D, offs_m, dd, D, m_ok, d_ok)
        ct = load_cols(C + b * K * D, offs_k, dd, D, k_ok, d_ok)
        acc += mm(p, ct, DOT_FP32)
        pf = p.to(tl.float32)
        cf = ct.to(tl.float32)
        sp += tl.sum(pf * pf, 1)
        sc += tl.sum(cf * cf, 0)
    return offs_m, offs_k, m_ok, k_ok, acc, sp, sc


@triton.jit
def _layer_norm_stats(s, k_ok, K, eps):
    """Centred values (0 outside K) and 1/std of each row of s over its K columns."""
    mean = tl.sum(tl.where(k_ok[None, :], s, 0.0), 1) / K
    xc = tl.where(k_ok[None, :], s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / K + eps)
    return xc, rstd


@triton.jit
def _mask_sim_fwd_kernel(P, C, W, BIAS, OUT, RP, RC, NP, K, D, eps,
                         BLOCK_M: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, DOT_FP32: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_m, offs_k, m_ok, k_ok, acc, sp, sc = _scores(P, C, b, NP, K, D, BLOCK_M, BLOCK_KP, BLOCK_D, DOT_FP32)
    # No epsilon (official): a zero row gives inf/NaN as the reference does.  Padding rows/columns use 1.
    rp = 1.0 / tl.sqrt(tl.where(m_ok, sp, 1.0))
    rc = 1.0 / tl.sqrt(tl.where(k_ok, sc, 1.0))
    s = acc * rp[:, None] * rc[None, :]
    if NORM:
        xc, rstd = _layer_norm_stats(s, k_ok, K, eps)
        s = xc * rstd[:, None]
        if HAS_W:
            s = s * tl.load(W + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            s = s + tl.load(BIAS + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    store_rows(OUT + b * NP * K, offs_m, offs_k, K, m_ok, k_ok, s)
    tl.store(RP + b * NP + offs_m, rp, mask=m_ok)
    tl.store(RC + b * K + offs_k, rc, mask=k_ok & (tl.program_id(0) == 0))


@triton.jit
def _mask_sim_bwd_rows_kernel(P, C, W, DY, RP, RC, DP, DS, PART, NP, K, D, eps,
                              BLOCK_M: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_D: tl.constexpr,
                              NORM: tl.constexpr, HAS_W: tl.constexpr, DOT_FP32: tl.constexpr,
                              WANT_DP: tl.constexpr, WANT_DC: tl.constexpr):
    """dP, dS and per-block partials PART[b, block, {t, d weight, d bias}, K] for one patch block.
    WANT_DP: dP is written; WANT_DC: dS and t (what the dC kernel reads) are written.  The LayerNorm
    partials are always written (they are sums over the tile the block holds anyway)."""
    b = tl.program_id(1).to(tl.int64)
    offs_m, offs_k, m_ok, k_ok, acc, _, _ = _scores(P, C, b, NP, K, D, BLOCK_M, BLOCK_KP, BLOCK_D, DOT_FP32)
    rp = tl.load(RP + b * NP + offs_m, mask=m_ok, other=0.0)
    rc = tl.load(RC + b * K + offs_k, mask=k_ok, other=0.0)
    s = acc * rp[:, None] * rc[None, :]
    g = load_rows(DY + b * NP * K, offs_m, offs_k, K, m_ok, k_ok).to(tl.float32)
    part = PART + (b * tl.num_programs(0) + tl.program_id(0)) * 3 * K
    if NORM:
        xc, rstd = _layer_norm_stats(s, k_ok, K, eps)
        xhat = xc * rstd[:, None]
        tl.store(part + K + offs_k, tl.sum(g * xhat, 0), mask=k_ok)
        tl.store(part + 2 * K + offs_k, tl.sum(g, 0), mask=k_ok)
        if HAS_W:
            g = g * tl.load(W + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        ds = rstd[:, None] * (g - (tl.sum(g, 1) / K)[:, None] - xhat * (tl.sum(g * xhat, 1) / K)[:, None])
        ds = tl.where(m_ok[:, None] & k_ok[None, :], ds, 0.0)
    else:
        ds = g
    if WANT_DC:
        store_rows(DS + b * NP * K, offs_m, offs_k, K, m_ok, k_ok, ds)
        tl.store(part + offs_k, tl.sum(ds * s, 0), mask=k_ok)
    if WANT_DP:
        r = tl.sum(ds * s, 1)
        dsc = ds * rc[None, :]
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            c = load_rows(C + b * K * D, offs_k, dd, D, k_ok, d_ok)
            p = load_rows(P + b * NP * D, offs_m, dd, D, m_ok, d_ok).to(tl.float32)
            store_rows(DP + b * NP * D, offs_m, dd, D, m_ok, d_ok,
                       rp[:, None] * mm(dsc.to(c.dtype), c, DOT_FP32) - (rp * rp * r)[:, None] * p)


@triton.jit
def _mask_sim_bwd_cols_kernel(P, C, DS, RP, RC, PART, DC, NP, K, D, M_BLOCKS,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                              DOT_FP32: tl.constexpr):
    """dC for one (class block, D tile, image): dS^T (rp P) over all patches, then the norm term."""
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = offs_k < K
    d_ok = dd < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, NP, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NP
        dst = load_cols(DS + b * NP * K, offs_m, offs_k, K, m_ok, k_ok)
        rp = tl.load(RP + b * NP + offs_m, mask=m_ok, other=0.0)
        p = load_rows(P + b * NP * D, offs_m, dd, D, m_ok, d_ok)
        acc += mm((dst * rp[None, :]).to(p.dtype), p, DOT_FP32)
    t = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, M_BLOCKS):
        t += tl.load(PART + ((b * M_BLOCKS + i) * 3) * K + offs_k, mask=k_ok, other=0.0)
    rc = tl.load(RC + b * K + offs_k, mask=k_ok, other=0.0)
    c = load_rows(C + b * K * D, offs_k, dd, D, k_ok, d_ok).to(tl.float32)
    store_rows(DC + b * K * D, offs_k, dd, D, k_ok, d_ok, rc[:, None] * acc - (rc * rc * t)[:, None] * c)


# --------------------------------------------------------------------------- #
# Plans
# --------------------------------------------------------------------------- #
def _interpreted(plan: Plan, np_: int, d: int, interpreter: bool) -> Plan:
    """Triton's interpreter costs per operation, not per element: there the row and D tiles are larger."""
    return plan.with_tiles(BLOCK_M=p2(np_, hi=64), BLOCK_D=p2(d, hi=32)) if interpreter else plan


def forward_plan(np_: int, k: int, d: int, dtype, *, interpreter: Optional[bool] = None) -> Plan:
    """Tiles chosen so every shipped configuration compiles without spills on sm_80 and sm_90 (AOT
    table).  The (BLOCK_M, K) tile lives in registers: fewer rows for large K."""
    interpreter = interpreter_tiles(interpreter)
    kp = p2(k)
    if kp > 64:
        plan = Plan(dict(BLOCK_M=p2(np_, hi=32), BLOCK_KP=kp, BLOCK_D=p2(d, hi=16)), num_warps=8)
    elif dtype == torch.float32:
        plan = Plan(dict(BLOCK_M=p2(np_, hi=32), BLOCK_KP=kp, BLOCK_D=p2(d, hi=16)))
    else:
        plan = Plan(dict(BLOCK_M=p2(np_, hi=64), BLOCK_KP=kp, BLOCK_D=p2(d, hi=32)))
    return _interpreted(plan, np_, d, interpreter)


def backward_plan(np_: int, k: int, d: int, dtype, *, interpreter: Optional[bool] = None) -> dict:
    """Plans of the two backward kernels, ``{"rows": ..., "cols": ...}``."""
    interpreter = interpreter_tiles(interpreter)
    kp = p2(k)
    if kp > 64:
        # fp32 dots run on FMAs (ieee), where a narrow D chunk keeps the tiles in registers: 8 wide
        # where Triton compiles it (3.8; 3.6 rejects a dot narrower than 16).
        block_d = FP32_DOT_MIN_K if dtype == torch.float32 else 16
        rows = Plan(dict(BLOCK_M=p2(np_, hi=16), BLOCK_KP=kp, BLOCK_D=p2(d, lo=block_d, hi=block_d)), num_warps=8)
    else:
        rows = forward_plan(np_, k, d, dtype, interpreter=False)
    cols = Plan(dict(BLOCK_M=p2(np_, hi=32), BLOCK_K=p2(k, hi=64), BLOCK_D=p2(d, hi=64)))
    return dict(rows=_interpreted(rows, np_, d, interpreter), cols=cols)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def mask_similarity_forward(patches, classes, weight=None, bias=None, *, norm: bool = False, eps: float = 1e-5,
                            plan: Plan = None):
    """(out (B, Np, K), rp (B, Np) fp32, rc (B, K) fp32) for contiguous patches, classes."""
    B, NP, D = patches.shape
    K = classes.shape[1]
    plan = plan or forward_plan(NP, K, D, patches.dtype)
    out = torch.empty((B, NP, K), device=patches.device, dtype=patches.dtype)
    rp = torch.empty((B, NP), device=patches.device, dtype=torch.float32)
    rc = torch.empty((B, K), device=patches.device, dtype=torch.float32)
    _mask_sim_fwd_kernel[(triton.cdiv(NP, plan["BLOCK_M"]), B)](
        patches, classes, weight if weight is not None else rp, bias if bias is not None else rp, out, rp, rc,
        NP, K, D, eps, NORM=norm, HAS_W=weight is not None, HAS_B=bias is not None,
        DOT_FP32=dot_fp32(patches.dtype), **plan.launch())
    return out, rp, rc


def mask_similarity_backward(patches, classes, weight, rp, rc, dout, *, norm: bool = False, eps: float = 1e-5,
                             plan: dict = None, needs: Tuple[bool, bool] = (True, True)):
    """(d patches, d classes, d weight or None, d bias or None); ``dout`` contiguous (B, Np, K).
    ``needs`` says whether d patches and d classes are wanted (None otherwise, their work skipped);
    with ``norm`` the LayerNorm parameters' gradients are always returned.
    ``plan``: as :func:`backward_plan`."""
    B, NP, D = patches.shape
    K = classes.shape[1]
    plan = plan or backward_plan(NP, K, D, patches.dtype)
    flag = dot_fp32(patches.dtype)
    rows, cols = plan["rows"], plan["cols"]
    m_blocks = triton.cdiv(NP, rows["BLOCK_M"])
    dpatches = torch.empty_like(patches) if needs[0] else None
    ds = torch.empty((B, NP, K), device=patches.device, dtype=torch.float32) if needs[1] else None
    part = torch.zeros((B, m_blocks, 3, K), device=patches.device, dtype=torch.float32)
    _mask_sim_bwd_rows_kernel[(m_blocks, B)](
        patches, classes, weight if weight is not None else rp, dout, rp, rc,
        dpatches if needs[0] else patches, ds if needs[1] else part, part, NP, K, D, eps,  # stand-ins never written
        NORM=norm, HAS_W=weight is not None, DOT_FP32=flag, WANT_DP=needs[0], WANT_DC=needs[1], **rows.launch())
    dclasses = None
    if needs[1]:
        dclasses = torch.empty_like(classes)
        grid = (triton.cdiv(K, cols["BLOCK_K"]), triton.cdiv(D, cols["BLOCK_D"]), B)
        _mask_sim_bwd_cols_kernel[grid](patches, classes, ds, rp, rc, part, dclasses, NP, K, D, m_blocks,
                                        DOT_FP32=flag, **cols.launch())
    dweight = dbias = None
    if norm:
        sums = part.sum(dim=(0, 1))  # fixed-order reduction of the per-block partials: deterministic
        dweight, dbias = sums[1], sums[2]
    return dpatches, dclasses, dweight, dbias


# --------------------------------------------------------------------------- #
# Shipped configurations (compiled ahead of time by benchmarks/aot_compile.py)
# --------------------------------------------------------------------------- #
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

#: (name, Np, K, D): Segmenter ViT-B/16 and ViT-L/16 at ADE20K (K 150), Cityscapes (K 19).
SHIPPED_SHAPES = [("vitb-ade", 1024, 150, 768), ("vitl-ade", 1600, 150, 1024), ("vitb-city", 1024, 19, 768)]


def _aot_configs():
    configs = []
    for dtype, ty in _TY.items():
        for name, NP, K, D in SHIPPED_SHAPES:
            fwd = forward_plan(NP, K, D, dtype, interpreter=False)
            bwd = backward_plan(NP, K, D, dtype, interpreter=False)
            for norm, has_w in ((False, False), (True, True), (True, False)):
                tag = f"{name},{ty}{',norm' if norm else ''}{'' if has_w or not norm else ',no-affine'}"
                wty = ty if has_w else "fp32"  # without affine the launcher passes an fp32 dummy
                sig = dict(P=f"*{ty}", C=f"*{ty}", W=f"*{wty}", BIAS=f"*{wty}", OUT=f"*{ty}", RP="*fp32", RC="*fp32",
                           NP="i32", K="i32", D="i32", eps="fp32")
                configs.append(AOTConfig.from_plan(_mask_sim_fwd_kernel, f"mask_similarity_fwd[{tag}]", sig, fwd,
                                                   NORM=norm, HAS_W=has_w, HAS_B=has_w, DOT_FP32=False))
                sig = dict(P=f"*{ty}", C=f"*{ty}", W=f"*{wty}", DY=f"*{ty}", RP="*fp32", RC="*fp32", DP=f"*{ty}",
                           DS="*fp32", PART="*fp32", NP="i32", K="i32", D="i32", eps="fp32")
                configs.append(AOTConfig.from_plan(_mask_sim_bwd_rows_kernel, f"mask_similarity_bwd_rows[{tag}]", sig,
                                                   bwd["rows"], NORM=norm, HAS_W=has_w, DOT_FP32=False,
                                                   WANT_DP=True, WANT_DC=True))  # every gradient
            sig = dict(P=f"*{ty}", C=f"*{ty}", DS="*fp32", RP="*fp32", RC="*fp32", PART="*fp32", DC=f"*{ty}",
                       NP="i32", K="i32", D="i32", M_BLOCKS="i32")
            configs.append(AOTConfig.from_plan(_mask_sim_bwd_cols_kernel, f"mask_similarity_bwd_cols[{name},{ty}]",
                                               sig, bwd["cols"], DOT_FP32=False))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["mask_similarity_forward", "mask_similarity_backward", "forward_plan", "backward_plan", "MAX_K",
           "AOT_CONFIGS"]
