"""The math of every op, in plain PyTorch, exactly as the official code computes it.

This module is the ground truth of semask_fast (see SPEC.md): every kernel is
tested against it.  Functions here do no input validation (the public ops in
:mod:`semask_fast.ops` validate) and are differentiable through autograd.
Where the official code has a quirk (the -100 shift mask, SeMask's missing
scale, ATM's head-sum-then-divide logits) the quirk is reproduced.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Pair = Tuple[int, int]

__all__ = [
    "relative_position_index",
    "shift_region_ids",
    "shift_mask",
    "window_attention",
    "window_partition",
    "window_merge",
    "shifted_window_attention",
    "semantic_attention",
    "atm_attention",
    "mask_similarity",
]


# --------------------------------------------------------------------------- #
# Swin window attention
# --------------------------------------------------------------------------- #
def relative_position_index(window_size: Pair, device=None) -> torch.Tensor:
    """(N, N) int64 index into the bias table: idx[i, j] for tokens i, j of a window.

    idx = (yi - yj + Wh - 1) * (2 Ww - 1) + (xi - xj + Ww - 1), tokens row-major.
    """
    wh, ww = window_size
    ys = torch.arange(wh, device=device).repeat_interleave(ww)
    xs = torch.arange(ww, device=device).repeat(wh)
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def _axis_regions(length: int, window: int, shift: int, device) -> torch.Tensor:
    # Official slices (0, -ws), (-ws, -s), (-s, None) in the rolled frame.  With
    # s == 0 the last slice covers the whole axis, i.e. one region.
    c = torch.arange(length, device=device)
    if shift == 0:
        return torch.zeros_like(c)
    return (c >= length - window).long() + (c >= length - shift).long()


def shift_region_ids(grid: Pair, window_size: Pair, shift_size: Pair, device=None) -> torch.Tensor:
    """(nW, N) region id (0..8) of every token of every window, windows row-major."""
    (nwh, nww), (wh, ww) = grid, window_size
    ry = _axis_regions(nwh * wh, wh, shift_size[0], device)
    rx = _axis_regions(nww * ww, ww, shift_size[1], device)
    ids = ry[:, None] * 3 + rx[None, :]  # (Hp, Wp)
    return ids.view(nwh, wh, nww, ww).permute(0, 2, 1, 3).reshape(nwh * nww, wh * ww)


def shift_mask(grid: Pair, window_size: Pair, shift_size: Pair, mask_value: float = -100.0,
               device=None, dtype=torch.float32) -> torch.Tensor:
    """(nW, N, N) additive SW-MSA mask: 0 inside a region, ``mask_value`` across regions."""
    ids = shift_region_ids(grid, window_size, shift_size, device)
    same = ids[:, :, None] == ids[:, None, :]
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.where(same, zero, torch.full((), mask_value, device=device, dtype=dtype))


def _apply_dropout(attn: torch.Tensor, p: float, keep: Optional[torch.Tensor]) -> torch.Tensor:
    if p == 0.0:
        return attn
    if keep is None:
        return F.dropout(attn, p=p, training=True)
    return attn * keep.to(attn.dtype) / (1.0 - p)


def window_attention(q, k, v, bias_table=None, *, window_size: Pair, shift_size: Pair = (0, 0),
                     grid: Optional[Pair] = None, mask=None, scale: Optional[float] = None,
                     mask_value: float = -100.0, dropout_p: float = 0.0, dropout_keep=None):
    """softmax(scale q k^T + bias + mask) v on (B_, h, N, d); see SPEC.md section 1.

    ``dropout_keep`` is an optional boolean keep-mask broadcastable to (B_, h, N, N),
    used to replay a kernel's dropout pattern exactly.
    """
    b_, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias_table is not None:
        idx = relative_position_index(window_size, q.device)
        attn = attn + bias_table[idx.view(-1)].view(n, n, h).permute(2, 0, 1).unsqueeze(0)
    if mask is None and grid is not None and any(shift_size):
        mask = shift_mask(grid, window_size, shift_size, mask_value, q.device, attn.dtype)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(b_ // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(b_, h, n, n)
    attn = torch.softmax(attn, dim=-1)
    attn = _apply_dropout(attn, dropout_p, dropout_keep)
    # An fp32 bias table or mask promotes the logits, as under autocast.
    return attn.to(v.dtype) @ v


def _padding(h: int, w: int, window_size: Pair) -> Pair:
    return (-h) % window_size[0], (-w) % window_size[1]


def window_partition(x, window_size: Pair, shift_size: Pair = (0, 0), pad_then_roll: bool = True,
                     pad_value=None):
    """(B, H, W, C) -> (B*nW, Wh, Wh, C): pad to window multiples, roll by -shift, partition.

    ``pad_then_roll`` picks the order: True is the segmentation Swin (SeMask), False is
    timm.  Padded positions hold zeros, or ``pad_value`` (a (C,) tensor) when given.
    """
    b, h, w, c = x.shape
    ph, pw = _padding(h, w, window_size)
    shifts, dims = (-shift_size[0], -shift_size[1]), (1, 2)
    if not pad_then_roll and any(shift_size):
        x = torch.roll(x, shifts, dims)
    if ph or pw:
        if pad_value is None:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        else:
            # Concatenated, not assigned into a filled tensor: exported graphs are functional.
            fill = pad_value.to(x.dtype)
            x = torch.cat([x, fill.expand(b, h, pw, c)], dim=2)
            x = torch.cat([x, fill.expand(b, ph, w + pw, c)], dim=1)
    if pad_then_roll and any(shift_size):
        x = torch.roll(x, shifts, dims)
    hp, wp = h + ph, w + pw
    wh, ww = window_size
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh, ww, c)


def window_merge(windows, window_size: Pair, shift_size: Pair, H: int, W: int, pad_then_roll: bool = True):
    """Exact inverse of :func:`window_partition`: (B*nW, Wh, Ww, C) or (B*nW, N, C) -> (B, H, W, C)."""
    wh, ww = window_size
    ph, pw = _padding(H, W, window_size)
    hp, wp = H + ph, W + pw
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
    shifts, dims = (shift_size[0], shift_size[1]), (1, 2)
    if pad_then_roll and any(shift_size):
        x = torch.roll(x, shifts, dims)
    x = x[:, :H, :W]
    if not pad_then_roll and any(shift_size):
        x = torch.roll(x, shifts, dims)
    return x.contiguous()


def shifted_window_attention(qkv, bias_table=None, *, num_heads: int, window_size: Pair,
                             shift_size: Pair = (0, 0), pad_then_roll: bool = True, qkv_bias=None,
                             scale: Optional[float] = None, mask_value: float = -100.0,
                             dropout_p: float = 0.0, dropout_keep=None):
    """Swin's (S)W-MSA core on the image layout: (B, H, W, 3*h*d) -> (B, H, W, h*d).

    The composition pad/roll -> partition -> window attention with the shift mask ->
    merge -> un-roll/crop.  Padded tokens take the value the qkv projection gives a
    zero token, i.e. ``qkv_bias`` (3*h*d,) or zero, as in the models.
    """
    b, h, w, c3 = qkv.shape
    d = c3 // (3 * num_heads)
    wins = window_partition(qkv, window_size, shift_size, pad_then_roll, pad_value=qkv_bias)
    b_, n = wins.shape[0], window_size[0] * window_size[1]
    q, k, v = wins.reshape(b_, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    ph, pw = _padding(h, w, window_size)
    grid = ((h + ph) // window_size[0], (w + pw) // window_size[1])
    out = window_attention(q, k, v, bias_table, window_size=window_size, shift_size=shift_size,
                           grid=grid, scale=scale, mask_value=mask_value, dropout_p=dropout_p,
                           dropout_keep=dropout_keep)
    out = out.transpose(1, 2).reshape(b_, window_size[0], window_size[1], num_heads * d)
    return window_merge(out, window_size, shift_size, h, w, pad_then_roll)


# --------------------------------------------------------------------------- #
# SeMask semantic attention
# --------------------------------------------------------------------------- #
def semantic_attention(sq, sk, yv):
    """softmax(Sq Sk^T) Yv with no scale: (B_, N, K), (B_, N, K), (B_, N, C) -> (B_, N, C)."""
    attn = torch.softmax(sq @ sk.transpose(-2, -1), dim=-1)
    return attn @ yv


# --------------------------------------------------------------------------- #
# SegViT ATM cross-attention
# --------------------------------------------------------------------------- #
def atm_attention(q, k, v, *, scale: Optional[float] = None, dropout_p: float = 0.0, dropout_keep=None):
    """ATM cross-attention: q (B, h, Nq, d), k, v (B, h, Nk, d) -> (out (B, h, Nq, d), M (B, Nq, Nk)).

    As the official code: S = (q k^T) * scale; M = S.sum(heads) / h before softmax
    and dropout; out = dropout(softmax(S)) v.
    """
    h, d = q.shape[1], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    mask_logits = s.sum(dim=1) / h
    attn = _apply_dropout(torch.softmax(s, dim=-1), dropout_p, dropout_keep)
    return attn @ v, mask_logits


# --------------------------------------------------------------------------- #
# Segmenter mask head
# --------------------------------------------------------------------------- #
def mask_similarity(patches, classes, *, norm_weight=None, norm_bias=None, norm: bool = False,
                    norm_eps: float = 1e-5):
    """Segmenter's masks: (p/|p|) (c/|c|)^T, (B, Np, D), (B, K, D) -> (B, Np, K).

    No epsilon in the normalisation (official code).  With ``norm=True`` the
    ``mask_norm`` LayerNorm over K follows (weight/bias (K,) optional).
    """
    p = patches / patches.norm(dim=-1, keepdim=True)
    c = classes / classes.norm(dim=-1, keepdim=True)
    s = p @ c.transpose(-2, -1)
    if norm:
        s = F.layer_norm(s, (s.shape[-1],), norm_weight, norm_bias, norm_eps)
    return s
