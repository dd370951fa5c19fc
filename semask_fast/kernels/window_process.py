"""Fused pad + roll + window partition, and merge + un-roll + crop, in Triton.

Both are pure gathers, so they are bitwise exact and each is the other's
backward: the gradient of a partition is the merge of the window gradients
(gradients of zero-padded positions are simply not read, i.e. dropped), and the
gradient of a merge is the partition of the image gradient (pad positions get 0).

Geometry (SPEC.md section 1): the image (B, H, W, C) is padded to (Hp, Wp),
window multiples, and rolled by -shift, in the order ``pad_then_roll`` says.
Window token (b_, ty, tx), b_ = b * nW + wy * nWw + wx, sits at (py, px) =
(wy * Wh + ty, wx * Ww + tx) of the padded, rolled grid, which holds image pixel

* pad then roll: (y, x) = ((py + sy) mod Hp, (px + sx) mod Wp), a pad if y >= H or x >= W;
* roll then pad: a pad if py >= H or px >= W, else ((py + sy) mod H, (px + sx) mod W).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AOTConfig, Plan, p2


@triton.jit
def window_partition_kernel(X, OUT, total, H, W, nWh, nWw, sy, sx, sxb, sxy, sxx,
                            C: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, PAD_THEN_ROLL: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT (B*nW*Wh*Ww, C) contiguous <- X (B, H, W, C) with unit channel stride."""
    # Token indices fit in int32 (2^31 tokens would be terabytes); element offsets are int64.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # window token, flat
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = t % (WH * WW)
    b_ = t // (WH * WW)
    nw = nWh * nWw
    w = b_ % nw
    b = b_ // nw
    py = (w // nWw) * WH + n // WW
    px = (w % nWw) * WW + n % WW
    if PAD_THEN_ROLL:
        y = (py + sy) % (nWh * WH)
        x = (px + sx) % (nWw * WW)
        real = (y < H) & (x < W)
    else:
        real = (py < H) & (px < W)
        y = (py + sy) % H
        x = (px + sx) % W
    tok = t < total
    cm = c < C
    src = b.to(tl.int64) * sxb + y.to(tl.int64) * sxy + x.to(tl.int64) * sxx
    vals = tl.load(X + src[:, None] + c[None, :], mask=(tok & real)[:, None] & cm[None, :], other=0.0)
    tl.store(OUT + t.to(tl.int64)[:, None] * C + c[None, :], vals, mask=tok[:, None] & cm[None, :])


@triton.jit
def window_merge_kernel(WIN, OUT, total, H, W, nWh, nWw, sy, sx, swb, swn,
                        C: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, PAD_THEN_ROLL: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT (B, H, W, C) contiguous <- WIN (B*nW, Wh*Ww, C) with unit channel stride."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # image pixel, flat (int32, as above)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x = t % W
    y = (t // W) % H
    b = t // (W * H)
    if PAD_THEN_ROLL:
        hp = nWh * WH
        wp = nWw * WW
        py = (y - sy + hp) % hp
        px = (x - sx + wp) % wp
    else:
        py = (y - sy + H) % H
        px = (x - sx + W) % W
    b_ = b * (nWh * nWw) + (py // WH) * nWw + px // WW
    n = (py % WH) * WW + px % WW
    tok = t < total
    m = tok[:, None] & (c < C)[None, :]
    vals = tl.load(WIN + (b_.to(tl.int64) * swb + n.to(tl.int64) * swn)[:, None] + c[None, :], mask=m, other=0.0)
    tl.store(OUT + t.to(tl.int64)[:, None] * C + c[None, :], vals, mask=m)


def plan(c: int) -> Plan:
    """(tokens, channels) tiles of 4096 elements; 8 warps: with 4, such a tile needs ~255 registers
    and spills on sm_80."""
    block_c = p2(c, lo=1, hi=128)
    return Plan(dict(BLOCK_T=max(16, 4096 // block_c), BLOCK_C=block_c), num_warps=8)


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _roll(shift_size, h: int, w: int, pad_then_roll: bool):
    """The roll the kernels apply: rolling before padding rolls the unpadded image, where a
    shift may exceed H or W (tiny images), and a roll by s is a roll by s mod the length."""
    return tuple(shift_size) if pad_then_roll else (shift_size[0] % h, shift_size[1] % w)


def window_partition(x: torch.Tensor, window_size, shift_size, pad_then_roll: bool) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, Wh, Ww, C); see the module docstring."""
    x = _unit_channel_stride(x)
    b, h, w, c = x.shape
    wh, ww = window_size
    nwh, nww = -(-h // wh), -(-w // ww)
    out = torch.empty((b * nwh * nww, wh, ww, c), dtype=x.dtype, device=x.device)
    total = out.numel() // max(c, 1)
    tiles = plan(c)
    window_partition_kernel[(triton.cdiv(total, tiles["BLOCK_T"]), triton.cdiv(c, tiles["BLOCK_C"]))](
        x, out, total, h, w, nwh, nww, *_roll(shift_size, h, w, pad_then_roll), x.stride(0), x.stride(1), x.stride(2),
        C=c, WH=wh, WW=ww, PAD_THEN_ROLL=pad_then_roll, **tiles.launch())
    return out


def window_merge(windows: torch.Tensor, window_size, shift_size, H: int, W: int,
                 pad_then_roll: bool) -> torch.Tensor:
    """(B*nW, Wh, Ww, C) -> (B, H, W, C); see the module docstring."""
    wh, ww = window_size
    nwh, nww = -(-H // wh), -(-W // ww)
    win = _unit_channel_stride(windows)
    c = win.shape[-1]
    b = win.shape[0] // (nwh * nww)
    # Flat (B*nW, N, C) addressing needs the two window axes to merge into one stride.
    if win.stride(1) != ww * win.stride(2):
        win = win.contiguous()
    out = torch.empty((b, H, W, c), dtype=win.dtype, device=win.device)
    total = b * H * W
    tiles = plan(c)
    window_merge_kernel[(triton.cdiv(total, tiles["BLOCK_T"]), triton.cdiv(c, tiles["BLOCK_C"]))](
        win, out, total, H, W, nwh, nww, *_roll(shift_size, H, W, pad_then_roll), win.stride(0), win.stride(2),
        C=c, WH=wh, WW=ww, PAD_THEN_ROLL=pad_then_roll, **tiles.launch())
    return out


def _aot_configs():
    configs = []
    ints = dict(total="i32", H="i32", W="i32", nWh="i32", nWw="i32", sy="i32", sx="i32")
    for dtype in ("fp16", "bf16", "fp32"):
        for c, ws in ((96, (7, 7)), (128, (12, 12)), (512, (7, 7))):
            flags = dict(C=c, WH=ws[0], WW=ws[1], PAD_THEN_ROLL=True)
            tag = f"[C={c},{ws[0]}x{ws[1]},{dtype}]"
            configs.append(AOTConfig.from_plan(
                window_partition_kernel, "window_partition" + tag,
                dict(X=f"*{dtype}", OUT=f"*{dtype}", **ints, sxb="i64", sxy="i64", sxx="i64"), plan(c), **flags))
            configs.append(AOTConfig.from_plan(
                window_merge_kernel, "window_merge" + tag,
                dict(WIN=f"*{dtype}", OUT=f"*{dtype}", **ints, swb="i64", swn="i64"), plan(c), **flags))
    return configs


AOT_CONFIGS = _aot_configs()

__all__ = ["window_partition", "window_merge", "plan", "AOT_CONFIGS"]
