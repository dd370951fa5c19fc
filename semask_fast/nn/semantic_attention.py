"""Drop-in replacement of SeMask's ``SemanticAttention``."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..ops import semantic_attention

__all__ = ["SemanticAttention"]


class SemanticAttention(nn.Module):
    """SeMask's semantic attention layer (``SemanticAttention(dim, n_cls)`` of the official code).

    ``forward(x) -> (prior, out)``: x (B_, N, C) layer-normed windows (or whole
    images); prior = Sq (B_, N, K) raw class logits; out = gamma * Dropout(mlp_res(
    softmax(Sq Sk^T) Yv)) + x, (B_, N, C).  No scale on the scores (as the official code).

    Init as the class itself does: Linears kaiming-normal with zero bias, then
    ``mlp_res`` and ``gamma`` zeroed (the FPN model re-initialises; see
    :mod:`semask_fast.models`).
    """

    def __init__(self, dim: int, num_classes: int, proj_drop: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.nc = num_classes
        self.backend = backend
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v):
            nn.init.kaiming_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.mlp_res.weight)
        nn.init.zeros_(self.mlp_res.bias)
        nn.init.zeros_(self.gamma)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        sq = self.mlp_cls_q(x)
        sk = self.mlp_cls_k(x)
        yv = self.mlp_v(x)
        f = self.proj_drop(self.mlp_res(semantic_attention(sq, sk, yv, backend=self.backend)))
        return sq, self.gamma * f + x
