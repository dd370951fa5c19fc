"""SeMask-Swin with the Semantic FPN head: ``semask_swin_{tiny,small,base,large}``.

Reproduces ``SeMask-FPN`` (Picsart-AI-Research/SeMask-Segmentation): the backbone
``SeMaskSwinTransformer`` (``mmseg/models/backbones/semask_swin_transformer.py``), the decode
head ``BranchFPNHead`` and the ADE20K configs.  Module names are the official ones, so the
released ``backbone.*`` / ``decode_head.*`` checkpoints load with
:meth:`SeMaskFPN.load_official_state_dict`.

What the official code does, and so do these models:

* any input size: the image is padded (right, bottom) to a multiple of the patch size, every
  (shifted-)window attention and windowed semantic layer pads its grid to window multiples
  (pad, then roll; padded tokens take part in the semantic softmax), patch merging pads odd
  grids; the logits (stride 4 of the padded image) are resized to the input size;
* the window never shrinks for small grids (unlike classification Swin);
* semantic attention is global over the whole stage (not windowed) in stages 2 and 3 when
  ``embed_dim`` is 96 or 192 and there are more than 19 classes (T, S, L on ADE20K);
  otherwise every stage is windowed with ``sem_window_size``;
* init: every backbone Linear trunc_normal(0.02) with zero bias and LayerNorms unit, after the
  semantic layers' own init (which would leave the semantic branch with zero gradient);
* loss: CE(main) + 0.4 CE(semantic prior), mmseg 0.x's cross-entropy (mean over all pixels,
  ``ignore_index`` 255 counted as zero); SeMask-L's config adds OHEM (min_kept 100000) to CE(main).

The attention runs on the fast ops through ``backend``: the Swin blocks on
:func:`~semask_fast.shifted_window_attention` (no partition copies), the semantic layers on
:func:`~semask_fast.semantic_attention` and the window partition/merge ops.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.window_attention import WindowAttention
from ._registry import register_model
from .fpn_head import BranchFPNHead
from .semask import SemanticLayer, reinit_linears, semask_loss

__all__ = ["SeMaskSwinTransformer", "SeMaskFPN", "semantic_window_sizes", "CONFIGS"]

#: The ADE20K configs (``configs/semask_swin/ade20k``); ``crop`` is the training crop.
CONFIGS: Dict[str, dict] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, crop=512),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, crop=512),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12, crop=512),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, crop=640,
                  ohem_min_kept=100000),
}


def semantic_window_sizes(embed_dim: int, num_classes: int, sem_window_size: int,
                          num_stages: int = 4) -> List[Optional[int]]:
    """The official rule: window size of each stage's semantic layer, ``None`` = global.

    ``embed_dim`` 96 or 192 with more than 19 classes: stages 0-1 windowed, 2-3 global;
    otherwise every stage windowed.
    """
    global_late = embed_dim in (96, 192) and num_classes > 19
    return [None if global_late and i >= 2 else sem_window_size for i in range(num_stages)]


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``, scaled by 1 / keep)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """Official ``SwinTransformerBlock``: x + DropPath((S)W-MSA(LN(x))), then x + DropPath(MLP(LN(x))).

    The attention is :meth:`WindowAttention.forward_image` with ``pad_then_roll=True``: the
    official zero-pad, roll, -100 shift mask on the padded grid, un-roll and crop, without copies.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.0,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size=window_size, qkv_bias=True, attn_drop=attn_drop,
                                    proj_drop=drop, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, n, c = x.shape
        attn = self.attn.forward_image(self.norm1(x).view(b, H, W, c), self.shift_size, pad_then_roll=True)
        x = x + self.drop_path(attn.reshape(b, n, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Official ``PatchMerging``: pad odd grids, concat the 2x2 neighbours (x0, x1, x2, x3 order), LN, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, H, W, c)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    """Official ``PatchEmbed``: pad the image (right, bottom) to patch multiples, conv, LN."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % p, 0, -h % p))
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(x.shape)


class BasicLayer(nn.Module):
    """One stage: Swin blocks (shift on odd blocks), the semantic layer, patch merging (not last)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, sem_window_size: Optional[int],
                 num_classes: int, num_sem_blocks: int, drop_path: Sequence[float], downsample: bool,
                 mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop, attn_drop,
                      drop_path[i], backend)
            for i in range(depth))
        self.semantic_layer = (SemanticLayer(dim, num_classes, sem_window_size, num_sem_blocks, backend)
                               if num_sem_blocks > 0 else None)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, H: int, W: int):
        """-> (stage output, prior (B, K, H, W) or None, next stage input, its H, W)."""
        for blk in self.blocks:
            x = blk(x, H, W)
        prior = None
        if self.semantic_layer is not None:
            x, prior = self.semantic_layer(x, H, W)
        if self.downsample is None:
            return x, prior, x, H, W
        return x, prior, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class SeMaskSwinTransformer(nn.Module):
    """The official ``SeMaskSwinTransformer`` backbone (``ape=False``, ``patch_norm=True``, all 4 outputs).

    ``forward(images) -> (features, priors)``: a tuple of 4 feature maps (B, C_i, H_i, W_i),
    normalised by ``norm{i}``, and a list of the 4 semantic priors (B, K, H_i, W_i) — raw
    ``mlp_cls_q`` logits of the stage's last semantic block.
    """

    def __init__(self, num_classes: int = 150, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 sem_window_size: Optional[int] = None, num_sem_blocks: Sequence[int] = (1, 1, 1, 1),
                 patch_size: int = 4, in_chans: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3, backend: str = "auto"):
        super().__init__()
        if not (len(depths) == len(num_heads) == len(num_sem_blocks) == 4):
            raise ValueError(f"depths, num_heads and num_sem_blocks must have 4 stages, got {list(depths)}, "
                             f"{list(num_heads)}, {list(num_sem_blocks)}")
        if any(n < 1 for n in num_sem_blocks):
            raise ValueError(f"every stage needs a semantic layer (the priors), got num_sem_blocks={num_sem_blocks}")
        self.num_classes = num_classes
        self.num_features = [embed_dim * 2 ** i for i in range(4)]
        self.sem_window_sizes = semantic_window_sizes(embed_dim, num_classes, sem_window_size or window_size)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth decay
        self.layers = nn.ModuleList(
            BasicLayer(self.num_features[i], depths[i], num_heads[i], window_size, self.sem_window_sizes[i],
                       num_classes, num_sem_blocks[i], dpr[sum(depths[:i]):sum(depths[:i + 1])], i < 3, mlp_ratio,
                       drop_rate, attn_drop_rate, backend)
            for i in range(4))
        for i, c in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self.init_weights()

    def init_weights(self) -> None:
        """The official ``init_weights``: trunc_normal(0.02) Linears (zero bias), unit LayerNorms."""
        reinit_linears(self, layer_norms=True)

    def forward(self, images: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], List[torch.Tensor]]:
        x = self.patch_embed(images)
        H, W = x.shape[2:]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        features, priors = [], []
        for i, layer in enumerate(self.layers):
            out, prior, x, h_next, w_next = layer(x, H, W)
            out = getattr(self, f"norm{i}")(out)
            features.append(out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            priors.append(prior)
            H, W = h_next, w_next
        return tuple(features), priors


class SeMaskFPN(nn.Module):
    """mmseg's ``EncoderDecoder`` with a SeMask-Swin backbone and ``BranchFPNHead``.

    ``forward(images)`` -> ``{"logits": (B, K, H, W) at the input size, "prior_logits": (B, K, H/4, W/4)}``;
    ``loss(images, labels)`` -> CE + 0.4 CE(prior) (see the module docstring).
    """

    def __init__(self, num_classes: int = 150, backend: str = "auto", channels: int = 256,
                 dropout_ratio: float = 0.1, prior_weight: float = 0.4, ignore_index: int = 255,
                 ohem_min_kept: Optional[int] = None, **backbone_cfg):
        super().__init__()
        self.num_classes = num_classes
        self.prior_weight = prior_weight
        self.ignore_index = ignore_index
        self.ohem_min_kept = ohem_min_kept
        self.backbone = SeMaskSwinTransformer(num_classes, backend=backend, **backbone_cfg)
        self.decode_head = BranchFPNHead(self.backbone.num_features, num_classes, channels, dropout_ratio)

    def _heads(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a floating tensor (B, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        features, priors = self.backbone(images)
        return self.decode_head(features, priors)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, prior_logits = self._heads(images)
        logits = F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "prior_logits": prior_logits}

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss on ``labels`` (B, H, W) (``ignore_index`` pixels ignored)."""
        logits, prior_logits = self._heads(images)
        return semask_loss(logits, prior_logits, labels, self.prior_weight, self.ignore_index, self.ohem_min_kept)

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load a released SeMask-FPN checkpoint (``backbone.*`` / ``decode_head.*``).

        Accepts mmseg's ``{"state_dict": ..., "meta": ...}`` wrapper.  The official
        ``relative_position_index`` buffers are checked against this model's (they are
        recomputed, not stored) and dropped.  Returns ``load_state_dict``'s missing and
        unexpected keys.
        """
        if isinstance(state_dict.get("state_dict"), Mapping):
            state_dict = state_dict["state_dict"]
        state_dict = dict(state_dict)
        for key in [k for k in state_dict if k.endswith(".relative_position_index")]:
            try:
                attn = self.get_submodule(key.rsplit(".", 1)[0])
            except AttributeError:
                continue  # not a module of this model: load_state_dict reports it as unexpected
            index = state_dict.pop(key)
            if not torch.equal(index.cpu(), attn.relative_position_index.cpu()):
                raise ValueError(f"{key} does not match this model's window {attn.window_size}: the checkpoint "
                                 f"was made with another window size (index shape {tuple(index.shape)})")
        return self.load_state_dict(state_dict, strict=strict)


def _build(size: str, num_classes: int, backend: str, **cfg) -> SeMaskFPN:
    config = {k: v for k, v in CONFIGS[size].items() if k != "crop"}
    config.update(cfg)
    return SeMaskFPN(num_classes=num_classes, backend=backend, **config)


@register_model("semask_swin_tiny")
def semask_swin_tiny(num_classes: int = 150, backend: str = "auto", **cfg) -> SeMaskFPN:
    """SeMask-T FPN (ADE20K config: embed 96, depths 2-2-6-2, window 7, crop 512)."""
    return _build("tiny", num_classes, backend, **cfg)


@register_model("semask_swin_small")
def semask_swin_small(num_classes: int = 150, backend: str = "auto", **cfg) -> SeMaskFPN:
    """SeMask-S FPN (embed 96, depths 2-2-18-2, window 7, crop 512)."""
    return _build("small", num_classes, backend, **cfg)


@register_model("semask_swin_base")
def semask_swin_base(num_classes: int = 150, backend: str = "auto", **cfg) -> SeMaskFPN:
    """SeMask-B FPN (embed 128, depths 2-2-18-2, window 12, crop 512)."""
    return _build("base", num_classes, backend, **cfg)


@register_model("semask_swin_large")
def semask_swin_large(num_classes: int = 150, backend: str = "auto", **cfg) -> SeMaskFPN:
    """SeMask-L FPN (embed 192, depths 2-2-18-2, window 12, crop 640, OHEM on the main CE)."""
    return _build("large", num_classes, backend, **cfg)
