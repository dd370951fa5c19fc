"""Plain ViT encoders on timm's ``VisionTransformer``, run as the segmentation codebases run theirs.

SegViT (mmseg's ``VisionTransformer``) and Segmenter (its own ``segm.model.vit``) both pad the
image at the bottom and right to a multiple of the patch size, project the patches, add a
position embedding learnt at the training size (resized for any other grid) and run pre-norm
ViT blocks.  They differ in the resize mode, in whether the class token enters the blocks and
in the final norm.  timm's blocks compute what both official blocks compute (LN -> MHSA ->
residual, LN -> MLP(GELU) -> residual); its parameter names are Segmenter's, mmseg's map one to
one (:mod:`semask_fast.models.segvit`).  Imported only when a ViT model is built: needs timm
(``pip install semask_fast[timm]``).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence, Tuple

import torch
from torch import nn

try:
    from timm.models.vision_transformer import VisionTransformer
except ModuleNotFoundError as e:  # pragma: no cover - exercised only without timm
    raise ModuleNotFoundError("the ViT models need timm: pip install 'semask_fast[timm]'", name="timm") from e

from ._patches import pad_to_patch_multiple, resize_pos_embed

__all__ = ["PlainViT", "MmsegViT", "SegmenterViT"]


class PlainViT(VisionTransformer):
    """timm ``VisionTransformer`` (class token, learnt position embedding with a class row) with
    :meth:`embed`: pad, project, add the position embedding resized to the input's grid."""

    def __init__(self, *, img_size, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 norm_eps: float, final_norm: bool, num_classes: int, pos_resize_mode: str,
                 dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes,
                         global_pool="token" if num_classes else "", final_norm=final_norm,
                         norm_layer=partial(nn.LayerNorm, eps=norm_eps), pos_drop_rate=dropout,
                         attn_drop_rate=dropout, proj_drop_rate=dropout, drop_path_rate=drop_path_rate)
        self.pos_resize_mode = pos_resize_mode
        self.train_grid = tuple(self.patch_embed.grid_size)

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, 3, H, W) -> tokens (B, 1 + Hp*Wp, C) with the class token first, and (Hp, Wp)."""
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        x = self.patch_embed.proj(pad_to_patch_multiple(images, self.patch_embed.patch_size[0]))
        grid = (x.shape[2], x.shape[3])
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)), 1)
        pos = self.pos_embed
        # Resized whenever the grid differs (the official code compares token counts, which misses
        # a different grid with as many patches).
        if grid != self.train_grid:
            pos = resize_pos_embed(pos, 1, self.train_grid, grid, self.pos_resize_mode)
        return self.pos_drop(x + pos), grid


class MmsegViT(PlainViT):
    """mmseg's ``VisionTransformer`` as SegViT configures it: ``with_cls_token=False`` (the class
    token is dropped before the layers), ``final_norm=False``, LayerNorm eps 1e-6, bicubic resize.

    ``forward(images) -> tuple`` of (B, C, Hp, Wp) token maps after the layers ``out_indices``.
    """

    def __init__(self, *, img_size, embed_dims: int, num_layers: int, num_heads: int,
                 out_indices: Sequence[int], patch_size: int = 16, drop_path_rate: float = 0.0):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dims, depth=num_layers,
                         num_heads=num_heads, norm_eps=1e-6, final_norm=False, num_classes=0,
                         pos_resize_mode="bicubic", drop_path_rate=drop_path_rate)
        self.out_indices = tuple(out_indices)
        if not self.out_indices or any(not 0 <= i < num_layers for i in self.out_indices):
            raise ValueError(f"out_indices must be layer indices in [0, {num_layers}), got {out_indices}")
        # Unused (with_cls_token=False) but part of the checkpoint layout; frozen so that
        # DistributedDataParallel needs no find_unused_parameters.
        self.cls_token.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x, grid = self.embed(images)
        x = x[:, 1:]
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_indices:
                outs.append(x.transpose(1, 2).reshape(x.shape[0], -1, *grid))
        return tuple(outs)


class SegmenterViT(PlainViT):
    """Segmenter's ``segm.model.vit.VisionTransformer`` (not distilled): class token through the
    blocks, final LayerNorm, eps 1e-5, bilinear resize, the unused 1000-class ``head`` kept for
    the checkpoint layout.

    ``forward(images) -> (B, 1 + Hp*Wp, C)``: the tokens after the final norm (``return_features``).
    """

    def __init__(self, *, image_size, patch_size: int, d_model: int, n_layers: int, n_heads: int,
                 dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(img_size=image_size, patch_size=patch_size, embed_dim=d_model, depth=n_layers,
                         num_heads=n_heads, norm_eps=1e-5, final_norm=True, num_classes=1000,
                         pos_resize_mode="bilinear", dropout=dropout, drop_path_rate=drop_path_rate)
        # The classification head is unused by segmentation: frozen, as for MmsegViT's class token.
        self.head.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
