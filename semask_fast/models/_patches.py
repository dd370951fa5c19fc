"""Patch-grid geometry shared by the ViT models: padding to patch multiples, position-embedding
resize, patch-grid maps back to image size.  No timm needed here."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["pad_to_patch_multiple", "resize_pos_embed", "masks_to_image"]


def pad_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right to multiples of ``patch_size``
    (mmseg's ``AdaptivePadding(padding='corner')``, Segmenter's ``padding``)."""
    pad_h, pad_w = -images.shape[2] % patch_size, -images.shape[3] % patch_size
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def resize_pos_embed(pos_embed: torch.Tensor, num_prefix: int, old_grid: Tuple[int, int],
                     new_grid: Tuple[int, int], mode: str) -> torch.Tensor:
    """(1, prefix + Ho*Wo, C) -> (1, prefix + Hn*Wn, C): prefix rows kept, the grid interpolated
    with ``align_corners=False`` (mmseg: bicubic, Segmenter: bilinear)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    return torch.cat((prefix, grid.flatten(2).transpose(1, 2)), 1)


def masks_to_image(masks: torch.Tensor, image_size: Tuple[int, int], patch_size: int) -> torch.Tensor:
    """(..., Hp, Wp) patch-grid maps -> (..., H, W): bilinear to the padded image, then cropped
    (Segmenter's interpolate + ``unpadding``)."""
    lead, grid = masks.shape[:-2], masks.shape[-2:]
    up = F.interpolate(masks.reshape(-1, 1, *grid), size=(grid[0] * patch_size, grid[1] * patch_size),
                       mode="bilinear", align_corners=False)
    return up[..., :image_size[0], :image_size[1]].reshape(*lead, *image_size)
