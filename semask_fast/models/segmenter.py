"""Segmenter (rstrudel/segmenter) with its mask transformer head, by name ``segmenter_vit_{small,base,large}``.

Official code: ``segm/model/decoder.py`` (``MaskTransformer``), ``segm/model/segmenter.py``,
``segm/model/vit.py``, ``segm/model/factory.py`` and ``segm/config.yml``; ADE20K models:
Seg-S-Mask/16 and Seg-B-Mask/16 at 512, Seg-L-Mask/16 at 640.  Our parameter names are the
official ones: a released ``checkpoint.pth`` (``{'model': {encoder.*, decoder.*}, ...}``) loads
unchanged; ``backbone`` / ``decode_head`` are aliases of ``encoder`` / ``decoder``.

The head (SPEC.md section 4): joint pre-norm self-attention over [patches; class embeddings]
(class tokens last), then ``masks = mask_norm(normalise(P W_p) normalise(C W_c)^T)`` through
:func:`~semask_fast.mask_similarity`.  Its blocks are timm ViT blocks, whose parameter names
(``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) and math are the
official ones.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import mask_similarity
from ._checkpoint import load_renamed_state_dict, unwrap_checkpoint
from ._patches import masks_to_image
from ._registry import register_model

__all__ = ["MaskTransformerHead", "Segmenter", "VIT_SMALL", "VIT_BASE", "VIT_LARGE"]

#: ``segm/config.yml`` backbones, the ADE20K crop sizes, train.py's encoder defaults (dropout 0,
#: drop path 0.1) and the mask_transformer decoder (2 layers, dropout 0.1, drop path 0).
_TRAINING = dict(patch_size=16, dropout=0.0, drop_path_rate=0.1, decoder_n_layers=2, decoder_dropout=0.1,
                 decoder_drop_path_rate=0.0)
VIT_SMALL = dict(image_size=512, d_model=384, n_layers=12, n_heads=6, **_TRAINING)
VIT_BASE = dict(image_size=512, d_model=768, n_layers=12, n_heads=12, **_TRAINING)
VIT_LARGE = dict(image_size=640, d_model=1024, n_layers=24, n_heads=16, **_TRAINING)


def _init_official(module: nn.Module) -> None:
    """``segm.model.utils.init_weights``: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskTransformerHead(nn.Module):
    """Segmenter's ``MaskTransformer``. ``forward(x, grid) -> masks``: x (B, Np, d_encoder) patch
    tokens, grid (Hp, Wp) with Hp*Wp = Np -> masks (B, K, Hp, Wp).  Needs timm
    (``pip install semask_fast[timm]``)."""

    def __init__(self, num_classes: int, d_encoder: int, d_model: int, n_layers: int = 2, n_heads=None,
                 drop_path_rate: float = 0.0, dropout: float = 0.0, backend: str = "auto"):
        from timm.models.vision_transformer import Block

        super().__init__()
        n_heads = n_heads or d_model // 64
        self.n_cls = num_classes
        self.backend = backend
        self.scale = d_model ** -0.5
        dpr = torch.linspace(0, drop_path_rate, n_layers, device="cpu").tolist()
        # The official Block: torch's LayerNorm (eps 1e-5, timm's default is 1e-6) and `dropout` on
        # the attention probabilities, after the projection and in the MLP.
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio=4.0, qkv_bias=True, attn_drop=dropout,
                                          proj_drop=dropout, drop_path=dpr[i], norm_layer=nn.LayerNorm)
                                    for i in range(n_layers))
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_official)
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


class Segmenter(nn.Module):
    """Segmenter: ``encoder`` (:class:`~semask_fast.models._vit.SegmenterViT`, a timm ViT) and
    ``decoder`` (:class:`MaskTransformerHead`).

    ``forward(images)`` -> ``{"logits": (B, K, H, W)}``: the image is zero-padded at the bottom and
    right to patch multiples, the masks upsampled (bilinear) to the padded size and cropped back,
    as officially.  ``loss(images, labels)``: cross-entropy with ``ignore_index`` 255 (``segm/engine.py``).
    """

    def __init__(self, num_classes: int = 150, *, image_size=512, patch_size: int = 16, d_model: int = 768,
                 n_layers: int = 12, n_heads: int = 12, dropout: float = 0.0, drop_path_rate: float = 0.1,
                 decoder_n_layers: int = 2, decoder_dropout: float = 0.1, decoder_drop_path_rate: float = 0.0,
                 backend: str = "auto"):
        from ._vit import SegmenterViT

        super().__init__()
        self.n_cls = num_classes
        self.patch_size = patch_size
        self.encoder = SegmenterViT(image_size=image_size, patch_size=patch_size, d_model=d_model,
                                    n_layers=n_layers, n_heads=n_heads, dropout=dropout, drop_path_rate=drop_path_rate)
        # factory.create_decoder: the decoder's width is the encoder's, heads = width / 64.
        self.decoder = MaskTransformerHead(num_classes, d_encoder=d_model, d_model=d_model, n_layers=decoder_n_layers,
                                           n_heads=d_model // 64, drop_path_rate=decoder_drop_path_rate,
                                           dropout=decoder_dropout, backend=backend)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    @property
    def decode_head(self) -> nn.Module:
        return self.decoder

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        tokens = self.encoder(images)
        grid = (-(-images.shape[2] // self.patch_size), -(-images.shape[3] // self.patch_size))
        masks = self.decoder(tokens[:, 1:], grid)
        return {"logits": masks_to_image(masks, images.shape[2:], self.patch_size)}

    def loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        if labels.shape[1:] != images.shape[2:] or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape (B, H, W) = ({images.shape[0]}, {images.shape[2]}, "
                             f"{images.shape[3]}) to match images, got {tuple(labels.shape)}")
        logits = self(images)["logits"]
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.long(),
                               ignore_index=ignore_index)

    def load_official_state_dict(self, state_dict: Mapping, strict: bool = True):
        """Load a released Segmenter checkpoint (``encoder.*`` / ``decoder.*``, ``{'model': ...}`` accepted)."""
        return load_renamed_state_dict(self, unwrap_checkpoint(state_dict, ("model",)), lambda k: k, strict)


@register_model("segmenter_vit_small")
def segmenter_vit_small(num_classes: int = 150, backend: str = "auto", **cfg) -> Segmenter:
    """Seg-S-Mask/16, ADE20K 512 (``cfg`` overrides :data:`VIT_SMALL`)."""
    return Segmenter(num_classes, backend=backend, **{**VIT_SMALL, **cfg})


@register_model("segmenter_vit_base")
def segmenter_vit_base(num_classes: int = 150, backend: str = "auto", **cfg) -> Segmenter:
    """Seg-B-Mask/16, ADE20K 512 (``cfg`` overrides :data:`VIT_BASE`)."""
    return Segmenter(num_classes, backend=backend, **{**VIT_BASE, **cfg})


@register_model("segmenter_vit_large")
def segmenter_vit_large(num_classes: int = 150, backend: str = "auto", **cfg) -> Segmenter:
    """Seg-L-Mask/16, ADE20K 640 (``cfg`` overrides :data:`VIT_LARGE`)."""
    return Segmenter(num_classes, backend=backend, **{**VIT_LARGE, **cfg})
