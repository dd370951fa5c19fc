"""Drop-in replacement of SeMask's ``SemanticAttention``."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import semantic_attention

__all__ = ["SemanticAttention"]


class SemanticAttention(nn.Module):
    """SeMask's semantic attention layer (``SemanticAttention(dim, n_cls)`` of the official code).

    ``forward(x) -> (prior, out)``: x (B_, N, C) layer-normed windows (or whole
    images); prior = Sq (B_, N, K) raw class logits; out = gamma * Dropout(mlp_res(
    softmax(Sq Sk^T) Yv)) + x, (B_, N, C).  No scale on the scores (as the official code).

    Same parameters and state_dict names as the official class, computed with fewer passes:

    * one GEMM for the three projections (``mlp_cls_q``, ``mlp_cls_k``, ``mlp_v`` weights
      concatenated, (2K + C) x C); Sq, Sk and Yv are column views of its output, which the
      kernels read in place (row-strided), and ``prior`` is the Sq view;
    * when the dropout is inactive (eval, or p = 0), ``gamma * mlp_res(a) + x`` is one
      ``addmm`` with the residual as its input and gamma folded into the C x C weight, plus
      the bias (gamma * b) added in place.

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
        lins = (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v)
        # The concatenated weights are (2K + C) x C, small next to the activations.
        qkv = F.linear(x, torch.cat([m.weight for m in lins]), torch.cat([m.bias for m in lins]))
        sq, sk, yv = qkv.split([self.nc, self.nc, self.dim], dim=-1)
        a = semantic_attention(sq, sk, yv, backend=self.backend)
        if (self.training and self.proj_drop.p > 0) or torch.is_autocast_enabled(x.device.type):
            # Under autocast the official layer adds the residual in fp32 (gamma is fp32): the fused
            # addmm below would run, and return, in the autocast dtype.
            return sq, self.gamma * self.proj_drop(self.mlp_res(a)) + x
        c = self.dim
        out = torch.addmm(x.reshape(-1, c), a.reshape(-1, c), (self.gamma * self.mlp_res.weight).t())
        return sq, out.add_(self.gamma * self.mlp_res.bias).view(x.shape)
