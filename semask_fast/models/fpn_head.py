"""SeMask's decode head: ``BranchFPNHead`` (Semantic FPN plus the semantic decoder).

Module and parameter names are the official ones (mmcv's ``ConvModule`` = ``conv``, ``bn``,
``activate``; ``scale_heads``, ``conv_seg``), so ``decode_head.*`` keys of the released
checkpoints load as they are.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .semask import semantic_prior_logits

__all__ = ["sync_batch_norm", "ConvModule", "BranchFPNHead"]


def sync_batch_norm(channels: int) -> nn.Module:
    """mmseg's ``SyncBN`` (the official norm of the head), where torch can run it.

    ``nn.SyncBatchNorm`` (statistics over all processes, as the official training) when
    ``torch.distributed`` is initialised with the GPU backend (NCCL) at construction;
    ``nn.BatchNorm2d`` otherwise.  torch's SyncBatchNorm runs on GPUs only (DDP refuses it on
    CPU modules), so on CPU processes each process normalises with its own batch statistics and
    keeps its own running statistics.  Both have the same parameters and buffers.  A model built
    before ``init_process_group`` converts with ``nn.SyncBatchNorm.convert_sync_batchnorm(model)``.
    """
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return nn.SyncBatchNorm(channels)
    return nn.BatchNorm2d(channels)


class ConvModule(nn.Sequential):
    """mmcv ``ConvModule(in, out, 3, padding=1, norm_cfg=SyncBN)``: conv (no bias) -> bn -> ReLU.

    Init as mmcv: kaiming-normal (fan_out, relu) conv, unit bn.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = sync_batch_norm(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


class BranchFPNHead(nn.Module):
    """Official ``BranchFPNHead`` (``SeMask-FPN/mmseg/models/decode_heads/branch_fpn_head.py``).

    ``forward(features, priors) -> (seg_logits, prior_logits)``, both (B, K, H/4, W/4):

    * features: stage i goes through ``max(1, log2(stride_i / stride_0))`` 3x3 conv-BN-ReLU
      modules, each followed by a x2 bilinear upsample for i > 0, is resized to stage 0's size
      and summed; then Dropout2d(0.1) and the 1x1 ``conv_seg``.
    * priors: the semantic decoder, :func:`~semask_fast.models.semask.semantic_prior_logits`.
    """

    #: Strides of the four backbone stages (every SeMask config).
    feature_strides = (4, 8, 16, 32)

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256,
                 dropout_ratio: float = 0.1, align_corners: bool = False):
        super().__init__()
        feature_strides = self.feature_strides
        if len(in_channels) != len(feature_strides):
            raise ValueError(f"in_channels must give {len(feature_strides)} stage widths, got {list(in_channels)}")
        self.in_channels = list(in_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.scale_heads = nn.ModuleList()
        for i, stride in enumerate(feature_strides):
            length = max(1, int(math.log2(stride) - math.log2(feature_strides[0])))
            layers: List[nn.Module] = []
            for k in range(length):
                layers.append(ConvModule(in_channels[i] if k == 0 else channels, channels))
                if stride != feature_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor], priors: Sequence[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        if len(features) != len(self.scale_heads) or len(priors) != len(self.scale_heads):
            raise ValueError(f"expected {len(self.scale_heads)} feature maps and priors, "
                             f"got {len(features)} and {len(priors)}")
        out = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:]):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear",
                                      align_corners=self.align_corners)
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv_seg(out), semantic_prior_logits(priors, self.align_corners)
