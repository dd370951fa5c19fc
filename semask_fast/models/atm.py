"""SegViT's ATM decoder layer built on :class:`~semask_fast.nn.ATMAttention` (SPEC.md section 3).

Post-norm, sequence-first like the official ``TPN_DecoderLayer``:
``t = LN1(t + SelfAttn(t)); t = LN2(t + Cross(t, mem)); t = LN3(t + FFN(t))``,
FFN 4*dim with dropout 0.1; the cross-attention returns the mask logits
(head-mean pre-softmax logits) the ATM head turns into masks.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..nn.atm_attention import ATMAttention

__all__ = ["ATMDecoderLayer"]


class ATMDecoderLayer(nn.Module):
    """``forward(tgt, memory) -> (tgt, mask_logits)``: tgt (Nq, B, C), memory (Nk, B, C) sequence-first;
    mask_logits (B, Nq, Nk)."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: int = 4, dropout: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.multihead_attn = ATMAttention(dim, num_heads=num_heads, qkv_bias=True, attn_drop=0.1, backend=backend)
        self.linear1 = nn.Linear(dim, dim * ffn_ratio)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim * ffn_ratio, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = nn.ReLU()

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        t2 = self.self_attn(tgt, tgt, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(t2))
        mem = memory.transpose(0, 1)
        t2, mask_logits = self.multihead_attn(tgt.transpose(0, 1), mem, mem)
        tgt = self.norm2(tgt + self.dropout2(t2))
        t2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout3(t2))
        return tgt, mask_logits
