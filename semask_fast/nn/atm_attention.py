"""Drop-in replacement of SegViT's ATM ``Attention``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import atm_attention

__all__ = ["ATMAttention"]


class ATMAttention(nn.Module):
    """SegViT's ATM ``Attention``: class tokens attend over spatial tokens.

    Official defaults and names (``q``, ``k``, ``v``, ``proj``); its decoder layer
    builds it with ``qkv_bias=True, attn_drop=0.1``.

    ``forward(xq, xk, xv) -> (out, mask_logits)``: xq (B, Nq, C), xk and xv
    (B, Nk, C); out (Nq, B, C) sequence-first as the official code returns it;
    mask_logits (B, Nq, Nk) = head-mean of the scaled pre-softmax logits.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, nq, c = xq.shape
        out, mask_logits = atm_attention(self._heads(self.q(xq)), self._heads(self.k(xk)), self._heads(self.v(xv)),
                                         scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                                         backend=self.backend)
        x = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, nq, c)))
        return x.transpose(0, 1), mask_logits
