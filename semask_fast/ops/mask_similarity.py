"""Segmenter's normalised patch-class similarity: public op and inputs."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import reference as ref
from ._common import OpInputs, check_bool, check_float, check_like, check_param_dtype, check_tensor
from ._library import Autocast, OpSpec


@dataclasses.dataclass(frozen=True)
class MaskSimilarityInputs(OpInputs):
    patches: torch.Tensor
    classes: torch.Tensor
    norm_weight: Optional[torch.Tensor]
    norm_bias: Optional[torch.Tensor]
    norm: bool
    norm_eps: float

    grad_fields = ("patches", "classes", "norm_weight", "norm_bias")


def mask_similarity(patches: torch.Tensor, classes: torch.Tensor, *, norm: bool = False,
                    norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                    norm_eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """Segmenter's masks ``(p / |p|) @ (c / |c|)^T`` (no epsilon, as the official code).

    Args:
        patches: (B, Np, D) projected patch features.
        classes: (B, K, D) projected class embeddings.
        norm: apply Segmenter's ``mask_norm`` (LayerNorm over K) as an epilogue.
        norm_weight, norm_bias: (K,) affine parameters of that LayerNorm, optional.
        norm_eps: its epsilon.

    Returns:
        (B, Np, K), differentiable in every tensor argument.
    """
    check_tensor("patches", patches, 3, "(B, Np, D)")
    check_tensor("classes", classes, 3, "(B, K, D)")
    check_like("classes", classes, "patches", patches)
    if classes.shape[0] != patches.shape[0] or classes.shape[2] != patches.shape[2]:
        raise ValueError(f"classes must have shape (B, K, D) = ({patches.shape[0]}, K, {patches.shape[2]}) "
                         f"to match patches, got {tuple(classes.shape)}")
    kcls = classes.shape[1]
    check_bool("norm", norm)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        if not norm:
            raise ValueError(f"{name} is given but norm=False")
        check_tensor(name, t, 1, f"({kcls},)")
        check_like(name, t, "patches", patches, dtype=False)
        check_param_dtype(name, t, "patches", patches)
        if t.shape[0] != kcls:
            raise ValueError(f"{name} must have shape ({kcls},), got {tuple(t.shape)}")
    return SPEC(backend, patches=patches, classes=classes, norm_weight=norm_weight, norm_bias=norm_bias,
                norm=norm, norm_eps=check_float("norm_eps", norm_eps))[0]


def _outputs_like(inp: MaskSimilarityInputs):
    b, n_p, _ = inp.patches.shape
    return (inp.patches.new_empty((b, n_p, inp.classes.shape[1])),)


SPEC = OpSpec("mask_similarity", MaskSimilarityInputs, outputs=("masks",), outputs_like=_outputs_like,
              reference=lambda inp, keep: (ref.mask_similarity(inp.patches, inp.classes, norm_weight=inp.norm_weight,
                                                               norm_bias=inp.norm_bias, norm=inp.norm,
                                                               norm_eps=inp.norm_eps),),
              # CUDA autocast runs the mask_norm LayerNorm in float32.
              autocast=Autocast(lowered=("patches", "classes"), fp32=("norm_weight", "norm_bias"),
                                fp32_outputs=lambda inp, device_type: ("masks",) if inp.norm and device_type == "cuda"
                                else ()))

__all__ = ["mask_similarity", "MaskSimilarityInputs", "SPEC"]
