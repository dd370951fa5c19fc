"""SeMask pieces around the semantic attention layer (SPEC.md section 2).

* :class:`SemanticLayer` is the ``SWSeMaskBlock`` wrapper: LayerNorm, pad to
  window multiples (padded tokens are zeros and are NOT masked: they take part
  in the softmax, as in the official code), window partition without shift,
  ``num_blocks`` :class:`~semask_fast.nn.SemanticAttention` blocks, reverse of
  both the features and the prior, crop.  ``window_size=None`` is the global
  variant (one window per image).
* :func:`semantic_prior_logits` is the lightweight semantic decoder: each
  stage's prior upsampled x2 repeatedly to stride 4 and summed.
* :func:`semask_loss`: CE(main) + 0.4 CE(prior upsampled to the label size),
  with mmseg 0.x's cross-entropy (:func:`mmseg_cross_entropy`).
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

__all__ = ["SemanticLayer", "semantic_prior_logits", "mmseg_cross_entropy", "semask_loss", "reinit_linears"]


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
        # Official names (``SWSeMaskBlock`` / ``SeMaskBlock``), so released checkpoints load as they are.
        self.norm1 = nn.LayerNorm(dim)
        self.class_injection = nn.ModuleList(SemanticAttention(dim, num_classes, backend=backend)
                                             for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        if n != H * W:
            raise ValueError(f"x must have H*W = {H * W} tokens, got shape {tuple(x.shape)}")
        x = self.norm1(x).view(b, H, W, c)
        ws = self.window_size
        if ws is None:
            windows = x.reshape(b, H * W, c)
        else:
            windows = window_partition(x, ws, 0, backend=self.backend).flatten(1, 2)
        prior = None
        for block in self.class_injection:
            prior, windows = block(windows)
        k = prior.shape[-1]
        if ws is None:
            out, prior = windows, prior.view(b, H, W, k)
        else:
            out = window_merge(windows, ws, 0, H, W, backend=self.backend).reshape(b, H * W, c)
            prior = window_merge(prior, ws, 0, H, W, backend=self.backend)
        return out, prior.permute(0, 3, 1, 2)


def semantic_prior_logits(priors: Sequence[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
    """The semantic decoder of ``BranchFPNHead``: the stage priors (B, K, Hi, Wi) summed at stride 4.

    ``priors[0]`` is at stride 4; stage i is upsampled x2 (bilinear) i times, then resized to
    ``priors[0]``'s size (they differ when the token grid had odd sizes), as the official head does.
    """
    total = priors[0]
    for i, p in enumerate(priors[1:], 1):
        for _ in range(i):
            p = F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=align_corners)
        total = total + F.interpolate(p, size=total.shape[2:], mode="bilinear", align_corners=align_corners)
    return total


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() != 3 or labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"labels must be an integer tensor (B, H, W), got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have the batch size of the images ({logits.shape[0]}), "
                         f"got {tuple(labels.shape)}")


def mmseg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                        ohem_min_kept: Optional[int] = None, align_corners: bool = False) -> torch.Tensor:
    """mmseg 0.x ``CrossEntropyLoss`` after resizing the logits (bilinear) to the label size.

    The mean is over ALL pixels, ignored ones counting as zero (mmseg 0.x, which SeMask pins; PyTorch's
    ``cross_entropy`` would divide by the non-ignored count).  ``ohem_min_kept``: mmseg's
    ``OHEMPixelSampler(min_kept=...)`` without threshold: only the ``min_kept * B`` valid pixels with
    the largest loss get weight 1 (SeMask-L's config).  Half-precision logits are computed in float32
    (mmseg's ``force_fp32``).
    """
    _check_labels(logits, labels)
    labels = labels.long()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if ohem_min_kept is not None:
        with torch.no_grad():
            valid = labels != ignore_index
            order = loss.detach()[valid].sort(descending=True).indices
            kept = torch.zeros(order.numel(), dtype=loss.dtype, device=loss.device)
            kept[order[:ohem_min_kept * labels.shape[0]]] = 1.0
            weight = torch.zeros_like(loss)
            weight[valid] = kept
        loss = loss * weight
    return loss.mean()


def semask_loss(main_logits: torch.Tensor, prior_logits: torch.Tensor, labels: torch.Tensor,
                prior_weight: float = 0.4, ignore_index: int = 255, ohem_min_kept: Optional[int] = None,
                align_corners: bool = False) -> torch.Tensor:
    """SeMask's training loss: CE(main) + 0.4 CE(prior), each :func:`mmseg_cross_entropy` at the label size.

    ``labels`` (B, H, W), ``ignore_index`` pixels ignored.  The OHEM sampler, when configured, weights
    the main term only (mmseg samples ``seg_logit``; the prior term has ``weight=None``).
    """
    ce = mmseg_cross_entropy(main_logits, labels, ignore_index, ohem_min_kept, align_corners)
    return ce + prior_weight * mmseg_cross_entropy(prior_logits, labels, ignore_index, None, align_corners)


def reinit_linears(model: nn.Module, std: float = 0.02, layer_norms: bool = False) -> int:
    """trunc_normal(std) weights and zero biases on every Linear, as SeMask's FPN model does (and,
    with ``layer_norms``, unit weight and zero bias on every LayerNorm, the official Swin and ATM
    ``init_weights``); returns the count of Linears."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            count += 1
        elif layer_norms and isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return count
