"""Segmenter's mask transformer head built on :func:`~semask_fast.mask_similarity` (SPEC.md section 4).

Joint pre-norm self-attention over [patches; class embeddings] (class tokens
last), then ``masks = mask_norm(normalise(P W_p) normalise(C W_c)^T)``.  The
blocks are timm ViT blocks, whose parameter names (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) are the official ones.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..ops import mask_similarity

__all__ = ["MaskTransformerHead"]


class MaskTransformerHead(nn.Module):
    """``forward(x, grid) -> masks``: x (B, Np, d_encoder) patch tokens, grid (Hp, Wp) with
    Hp*Wp = Np -> masks (B, K, Hp, Wp).  Needs timm (``pip install semask_fast[timm]``)."""

    def __init__(self, num_classes: int, d_encoder: int, d_model: int, n_layers: int = 2, n_heads=None,
                 drop_path_rate: float = 0.0, dropout: float = 0.0, backend: str = "auto"):
        from timm.models.vision_transformer import Block

        super().__init__()
        n_heads = n_heads or d_model // 64
        self.n_cls = num_classes
        self.backend = backend
        self.scale = d_model ** -0.5
        dpr = torch.linspace(0, drop_path_rate, n_layers).tolist()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout,
                                          drop_path=dpr[i]) for i in range(n_layers))
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        b, n_p, _ = x.shape
        if n_p != grid[0] * grid[1]:
            raise ValueError(f"x must have Hp*Wp = {grid[0] * grid[1]} patches for grid={grid}, got {n_p}")
        x = torch.cat((self.proj_dec(x), self.cls_emb.expand(b, -1, -1)), 1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, :-self.n_cls] @ self.proj_patch, x[:, -self.n_cls:] @ self.proj_classes
        masks = mask_similarity(patches, classes, norm=True, norm_weight=self.mask_norm.weight,
                                norm_bias=self.mask_norm.bias, norm_eps=self.mask_norm.eps, backend=self.backend)
        return masks.transpose(1, 2).reshape(b, self.n_cls, *grid)
