"""SeMask pieces around the semantic attention layer (SPEC.md section 2).

* :class:`SemanticLayer` is the ``SWSeMaskBlock`` wrapper: LayerNorm, pad to
  window multiples (padded tokens are zeros and are NOT masked: they take part
  in the softmax, as in the official code), window partition without shift,
  ``num_blocks`` :class:`~semask_fast.nn.SemanticAttention` blocks, reverse of
  both the features and the prior, crop.  ``window_size=None`` is the global
  variant (one window per image).
* :func:`semantic_prior_logits` is the lightweight semantic decoder: each
  stage's prior upsampled x2 repeatedly to stride 4 and summed.
* :func:`semask_loss`: CE(main) + 0.4 CE(prior upsampled to the label size).
* :func:`reinit_linears` is what the FPN model does after building the
  backbone (trunc_normal(0.02) on every Linear): without it, the class's own
  init leaves the semantic branch with zero gradient.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.semantic_attention import SemanticAttention
from ..ops import window_merge, window_partition

__all__ = ["SemanticLayer", "semantic_prior_logits", "semask_loss", "reinit_linears"]


class SemanticLayer(nn.Module):
    """LayerNorm -> (windowed) semantic attention blocks -> features and class prior.

    ``forward(x, H, W)``: x (B, H*W, C) -> (out (B, H*W, C), prior (B, K, H, W)).
    The residual of each block lands on the normalised features, as in SeMask.
    """

    def __init__(self, dim: int, num_classes: int, window_size: Optional[int] = 7, num_blocks: int = 1,
                 backend: str = "auto"):
        super().__init__()
        self.window_size = window_size
        self.backend = backend
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(SemanticAttention(dim, num_classes, backend=backend) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        if n != H * W:
            raise ValueError(f"x must have H*W = {H * W} tokens, got shape {tuple(x.shape)}")
        x = self.norm(x).view(b, H, W, c)
        ws = self.window_size
        if ws is None:
            windows = x.reshape(b, H * W, c)
        else:
            windows = window_partition(x, ws, 0, backend=self.backend).flatten(1, 2)
        prior = None
        for block in self.blocks:
            prior, windows = block(windows)
        k = prior.shape[-1]
        if ws is None:
            out, prior = windows, prior.view(b, H, W, k)
        else:
            out = window_merge(windows, ws, 0, H, W, backend=self.backend).reshape(b, H * W, c)
            prior = window_merge(prior, ws, 0, H, W, backend=self.backend)
        return out, prior.permute(0, 3, 1, 2)


def semantic_prior_logits(priors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the stage priors (B, K, Hi, Wi), each upsampled x2 (bilinear) until stride 4.

    ``priors[0]`` is at stride 4; stage i at stride 4 * 2**i is upsampled i times.
    """
    total = None
    for i, p in enumerate(priors):
        for _ in range(i):
            p = F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=False)
        total = p if total is None else total + p
    return total


def semask_loss(main_logits: torch.Tensor, prior_logits: torch.Tensor, labels: torch.Tensor,
                prior_weight: float = 0.4, ignore_index: int = 255) -> torch.Tensor:
    """CE(main) + 0.4 * CE(prior), both upsampled (bilinear) to the label size (B, H, W)."""
    size = labels.shape[-2:]

    def ce(logits):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)

    return ce(main_logits) + prior_weight * ce(prior_logits)


def reinit_linears(model: nn.Module, std: float = 0.02) -> int:
    """trunc_normal(std) weights and zero biases on every Linear, as SeMask's FPN model does; returns the count."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            count += 1
    return count
