"""SegViT (zbwxp/SegVit): a plain ViT and the ATM head, by name ``segvit_vit_{base,large}``.

Configs: ``configs/_base_/models/seg_vit-b16.py`` (ViT-B/16, ADE20K 512) and
``configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py`` (ViT-L/16, ADE20K 640).  The backbone is
mmseg's ``VisionTransformer`` with ``with_cls_token=False`` (the class token is dropped before the
layers), ``final_norm=False``, LayerNorm eps 1e-6 and a bicubic position-embedding resize; here
it is timm's ``VisionTransformer`` (:class:`~semask_fast.models._vit.MmsegViT`), whose parameters
map one to one (:func:`official_name`):

=====================================  ==================================================
ours (timm)                            official (mmseg)
=====================================  ==================================================
``backbone.patch_embed.proj.*``        ``backbone.patch_embed.projection.*``
``backbone.blocks.{i}.norm1.*``        ``backbone.layers.{i}.ln1.*``
``backbone.blocks.{i}.attn.qkv.*``     ``backbone.layers.{i}.attn.attn.in_proj_{weight,bias}``
``backbone.blocks.{i}.attn.proj.*``    ``backbone.layers.{i}.attn.attn.out_proj.*``
``backbone.blocks.{i}.norm2.*``        ``backbone.layers.{i}.ln2.*``
``backbone.blocks.{i}.mlp.fc1.*``      ``backbone.layers.{i}.ffn.layers.0.0.*``
``backbone.blocks.{i}.mlp.fc2.*``      ``backbone.layers.{i}.ffn.layers.1.*``
``decode_head.loss_decode.empty_weight``  ``decode_head.loss_decode.criterion.empty_weight``
=====================================  ==================================================

Everything else (``backbone.cls_token``, ``backbone.pos_embed``, ``decode_head.*``) has the
official name.  Sizes: the official head sees ``img_size`` squares (training crops, sliding-window
test crops); any other size is padded at the bottom and right to a multiple of 16, the masks are
upsampled to the padded image and cropped (where the official resizes to ``img_size`` then to the
input, which agrees at ``img_size`` squares).
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ._checkpoint import load_renamed_state_dict, unwrap_checkpoint
from ._patches import masks_to_image
from ._registry import register_model
from .atm import ATMHead, atm_semantic_inference

__all__ = ["SegViT", "official_name", "VIT_BASE", "VIT_LARGE"]

#: ``configs/_base_/models/seg_vit-b16.py`` with the ADE20K 512 data config.
VIT_BASE = dict(img_size=512, embed_dims=768, num_layers=12, num_heads=12, out_indices=(5, 7, 11),
                drop_path_rate=0.1, head_embed_dims=384, head_num_heads=12, head_num_layers=3)
#: ``configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py``.
VIT_LARGE = dict(img_size=640, embed_dims=1024, num_layers=24, num_heads=16, out_indices=(7, 15, 23),
                 drop_path_rate=0.3, head_embed_dims=512, head_num_heads=16, head_num_layers=3)


class SegViT(nn.Module):
    """SegViT: ``backbone`` (:class:`~semask_fast.models._vit.MmsegViT`, needs timm) and
    ``decode_head`` (:class:`~semask_fast.models.atm.ATMHead`).

    ``forward(images)`` -> dict: ``logits`` (B, K, H, W), the official ``pred``
    ``softmax(cls)[..., :-1] (x) sigmoid(masks)`` (class scores in [0, 1]; argmax is the
    prediction); ``class_logits`` (S, B, K, K+1) and ``mask_logits`` (S, B, K, Hp, Wp) per stage.
    ``loss(images, labels)``: the ATM loss over every stage (``ignore_index`` 255).
    """

    def __init__(self, num_classes: int = 150, *, img_size=512, embed_dims: int = 768, num_layers: int = 12,
                 num_heads: int = 12, out_indices: Sequence[int] = (5, 7, 11), drop_path_rate: float = 0.0,
                 head_embed_dims: int = 384, head_num_heads: int = 12, head_num_layers: int = 3,
                 use_stages: Optional[int] = None, patch_size: int = 16, backend: str = "auto"):
        from ._vit import MmsegViT

        super().__init__()
        self.patch_size = patch_size
        self.backbone = MmsegViT(img_size=img_size, embed_dims=embed_dims, num_layers=num_layers,
                                       num_heads=num_heads, out_indices=out_indices, patch_size=patch_size,
                                       drop_path_rate=drop_path_rate)
        self.decode_head = ATMHead(num_classes, embed_dims, embed_dims=head_embed_dims, num_layers=head_num_layers,
                                   num_heads=head_num_heads, use_stages=use_stages or len(out_indices),
                                   backend=backend)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        class_logits, mask_logits = self.decode_head(self.backbone(images))
        masks = masks_to_image(mask_logits[-1], images.shape[2:], self.patch_size)
        return {"logits": atm_semantic_inference(class_logits[-1], masks), "class_logits": class_logits,
                "mask_logits": mask_logits}

    def loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        if labels.shape[1:] != images.shape[2:]:
            raise ValueError(f"labels must have shape (B, H, W) = ({images.shape[0]}, {images.shape[2]}, "
                             f"{images.shape[3]}) to match images, got {tuple(labels.shape)}")
        class_logits, mask_logits = self.decode_head(self.backbone(images))
        return self.decode_head.loss_decode(class_logits, mask_logits, labels, self.patch_size, ignore_index)

    def load_official_state_dict(self, state_dict: Mapping, strict: bool = True):
        """Load a released SegViT checkpoint (mmseg layout, ``{'state_dict', 'meta'}`` wrapper accepted)."""
        return load_renamed_state_dict(self, unwrap_checkpoint(state_dict, ("state_dict",)), official_name, strict)


_RENAMES = [(re.compile(p), r) for p, r in (
    (r"^backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^backbone\.blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
    (r"^backbone\.blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
    (r"^backbone\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"backbone.layers.\1.attn.attn.in_proj_\2"),
    (r"^backbone\.blocks\.(\d+)\.attn\.proj\.", r"backbone.layers.\1.attn.attn.out_proj."),
    (r"^backbone\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
    (r"^backbone\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
    (r"^decode_head\.loss_decode\.empty_weight$", "decode_head.loss_decode.criterion.empty_weight"),
)]


def official_name(key: str) -> str:
    """The official (mmseg) name of our state-dict entry ``key``."""
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


@register_model("segvit_vit_base")
def segvit_vit_base(num_classes: int = 150, backend: str = "auto", **cfg) -> SegViT:
    """SegViT ViT-B/16, ADE20K 512 (``cfg`` overrides :data:`VIT_BASE`)."""
    return SegViT(num_classes, backend=backend, **{**VIT_BASE, **cfg})


@register_model("segvit_vit_large")
def segvit_vit_large(num_classes: int = 150, backend: str = "auto", **cfg) -> SegViT:
    """SegViT ViT-L/16, ADE20K 640 (``cfg`` overrides :data:`VIT_LARGE`)."""
    return SegViT(num_classes, backend=backend, **{**VIT_LARGE, **cfg})
