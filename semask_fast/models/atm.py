"""SegViT's ATM head and loss built on :class:`~semask_fast.nn.ATMAttention` (SPEC.md section 3).

Official code: zbwxp/SegVit ``decode_heads/atm_head.py`` (``TPN_DecoderLayer``, ``TPN_Decoder``,
``ATMHead``) and ``losses/atm_loss.py`` + ``losses/criterion.py`` (``ATMLoss``, ``SetCriterion``).
Parameter names are the official ones, so a released ``decode_head.*`` loads unchanged (the loss's
``criterion.empty_weight`` buffer is the one renamed entry, see :mod:`semask_fast.models.segvit`).
"""

from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..nn.atm_attention import ATMAttention
from ._patches import masks_to_image
from .semask import reinit_linears

__all__ = ["ATMDecoderLayer", "ATMDecoder", "ATMHead", "ATMLoss", "atm_semantic_inference"]


class ATMDecoderLayer(nn.Module):
    """``forward(tgt, memory) -> (tgt, mask_logits)``: tgt (Nq, B, C), memory (Nk, B, C) sequence-first;
    mask_logits (B, Nq, Nk).

    Post-norm, like the official ``TPN_DecoderLayer``:
    ``t = LN1(t + SelfAttn(t)); t = LN2(t + Cross(t, mem)); t = LN3(t + FFN(t))``, FFN 4*dim with
    dropout 0.1; the cross-attention returns the mask logits (head-mean pre-softmax logits).
    """

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


class ATMDecoder(nn.Module):
    """The official ``TPN_Decoder``: ``num_layers`` copies of one layer (``layers.{j}``), no final
    norm; returns the last layer's tokens and mask logits."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, backend: str = "auto"):
        super().__init__()
        # torch's TransformerDecoder deep-copies one layer, so every layer starts from the same init.
        layer = ATMDecoderLayer(dim, num_heads, backend=backend)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            tgt, mask_logits = layer(tgt, memory)
        return tgt, mask_logits


class ATMHead(nn.Module):
    """SegViT's ``ATMHead`` (``use_proj=True``, no crop training).

    ``forward(features) -> (class_logits, mask_logits)``: ``features`` are the backbone's
    (B, C_in, Hp, Wp) maps, shallow to deep; the first ``use_stages`` are used deepest first.
    class_logits (S, B, K, K+1) per stage; mask_logits (S, B, K, Hp, Wp), stage ``s`` holding the
    sum of the mask logits of stages 0..s (the official ``outputs_seg_masks``).  Upsampling to the
    image and the loss are :func:`masks_to_image` and :class:`ATMLoss`.
    """

    def __init__(self, num_classes: int, in_channels: int, embed_dims: int = 768, num_layers: int = 3,
                 num_heads: int = 8, use_stages: int = 3, backend: str = "auto"):
        super().__init__()
        self.num_classes = num_classes
        self.use_stages = use_stages
        for i in range(1, use_stages + 1):
            self.add_module(f"input_proj_{i}", nn.Linear(in_channels, embed_dims))
            self.add_module(f"proj_norm_{i}", nn.LayerNorm(embed_dims))
            self.add_module(f"decoder_{i}", ATMDecoder(embed_dims, num_heads, num_layers, backend=backend))
        self.q = nn.Embedding(num_classes, embed_dims)
        self.class_embed = nn.Linear(embed_dims, num_classes + 1)
        self.loss_decode = ATMLoss(num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The official ``init_weights``: every Linear trunc-normal(0.02) with zero bias, LayerNorms
        (1, 0); the self-attention's packed in-projection and the class queries keep torch's init."""
        reinit_linears(self, layer_norms=True)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if len(features) < self.use_stages:
            raise ValueError(f"features must hold at least use_stages={self.use_stages} maps, got {len(features)}")
        stages = list(features[:self.use_stages])[::-1]
        b = stages[0].shape[0]
        q = self.q.weight.unsqueeze(1).expand(-1, b, -1)  # (K, B, C) sequence-first, as the official repeat
        qs: List[torch.Tensor] = []
        masks: List[torch.Tensor] = []
        for i, x in enumerate(stages, start=1):
            grid = x.shape[2:]
            lateral = getattr(self, f"proj_norm_{i}")(getattr(self, f"input_proj_{i}")(x.flatten(2).transpose(1, 2)))
            q, mask_logits = getattr(self, f"decoder_{i}")(q, lateral.transpose(0, 1))
            qs.append(q.transpose(0, 1))
            # A plain ViT gives every stage the same grid, where the official bilinear resize to
            # the last stage's size is the identity: the stages' masks just add up.
            mask = mask_logits.reshape(b, self.num_classes, *grid)
            masks.append(mask if not masks else masks[-1] + mask)
        return self.class_embed(torch.stack(qs)), torch.stack(masks)


def atm_semantic_inference(class_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``einsum(softmax(cls)[..., :-1], sigmoid(masks))``: (B, K, K+1), (B, K, H, W) -> (B, K, H, W)."""
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], masks.sigmoid())


class ATMLoss(nn.Module):
    """SegViT's ``ATMLoss``: per stage ``cls_weight * CE + mask_weight * focal + dice_weight * dice``, summed.

    No Hungarian matching: query ``k`` is class ``k``.  Per image, the classes present (labels other
    than ``ignore_index``) are the targets: their queries' class target is ``k``, every other query's
    is "no object" (index K, weight ``eos_coef``); each present class contributes a sigmoid focal
    loss (alpha 0.25, gamma 2, mean over pixels) and a dice loss (+1 smoothing) between its mask
    logits upsampled to the labels and ``labels == k``.  Ignored pixels count as background in the
    masks, as officially.  Both mask losses are divided by the number of target masks (averaged over
    processes under torch.distributed, at least 1).  Computed in at least float32 (``force_fp32``).
    """

    def __init__(self, num_classes: int, cls_weight: float = 1.0, mask_weight: float = 20.0,
                 dice_weight: float = 1.0, eos_coef: float = 0.1, loss_weight: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.cls_weight, self.mask_weight, self.dice_weight = cls_weight, mask_weight, dice_weight
        self.loss_weight = loss_weight
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                patch_size: int, ignore_index: int = 255) -> torch.Tensor:
        """class_logits (S, B, K, K+1); mask_logits (S, B, K, Hp, Wp) on the grid of the image padded
        to ``patch_size`` multiples; labels (B, H, W) integer."""
        s, b, k = class_logits.shape[:3]
        if k != self.num_classes:
            raise ValueError(f"class_logits must have {self.num_classes} queries, got {k}")
        if labels.dim() != 3 or labels.shape[0] != b or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape (B={b}, H, W), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
        valid = labels != ignore_index
        if ((labels[valid] < 0) | (labels[valid] >= k)).any():
            raise ValueError(f"labels must lie in [0, {k}) or equal ignore_index={ignore_index}")
        compute = torch.promote_types(class_logits.dtype, torch.float32)
        with torch.autocast(class_logits.device.type, enabled=False):
            present = torch.zeros(b, k + 1, dtype=torch.bool, device=labels.device)
            present.scatter_(1, labels.masked_fill(~valid, k).flatten(1), True)
            present = present[:, :k]
            batch_idx, class_idx = present.nonzero(as_tuple=True)
            targets = torch.where(present, torch.arange(k, device=labels.device), k)
            masks_true = (labels[batch_idx] == class_idx[:, None, None]).to(compute).flatten(1)
            num_masks = self._num_masks(batch_idx.numel(), class_logits.device)
            total = class_logits.new_zeros((), dtype=compute)
            for stage in range(s):
                ce = F.cross_entropy(class_logits[stage].to(compute).transpose(1, 2), targets,
                                     self.empty_weight.to(compute))
                pred = masks_to_image(mask_logits[stage, batch_idx, class_idx].to(compute), labels.shape[1:],
                                      patch_size).flatten(1)
                total = total + (self.cls_weight * ce + self.mask_weight * _focal(pred, masks_true, num_masks)
                                 + self.dice_weight * _dice(pred, masks_true, num_masks))
        return total * self.loss_weight

    @staticmethod
    def _num_masks(local: int, device: torch.device) -> float:
        n = torch.tensor([float(local)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(n.item(), 1.0)


def _focal(logits: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25,
           gamma: float = 2.0) -> torch.Tensor:
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(1).sum() / num_masks


def _dice(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
