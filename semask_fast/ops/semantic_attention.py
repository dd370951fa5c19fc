"""SeMask's semantic score-and-mask update: public op and inputs."""

from __future__ import annotations

import dataclasses

import torch

from .. import reference as ref
from ._common import OpInputs, check_like, check_tensor
from ._library import Autocast, OpSpec


@dataclasses.dataclass(frozen=True)
class SemanticAttentionInputs(OpInputs):
    sq: torch.Tensor
    sk: torch.Tensor
    yv: torch.Tensor

    grad_fields = ("sq", "sk", "yv")


def semantic_attention(sq: torch.Tensor, sk: torch.Tensor, yv: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``softmax(sq @ sk^T) @ yv``, no scale (SeMask's ``SemanticAttention``).

    Args:
        sq, sk: (B_, N, K) class-space queries and keys; K (number of classes)
            is the inner dimension of the scores.
        yv: (B_, N, C) values.
        B_ is windows x batch (windowed stages) or batch (global stages).

    Returns:
        (B_, N, C), differentiable in sq, sk and yv.
    """
    check_tensor("sq", sq, 3, "(B_, N, K)")
    check_tensor("sk", sk, 3, "(B_, N, K)")
    check_tensor("yv", yv, 3, "(B_, N, C)")
    check_like("sk", sk, "sq", sq)
    check_like("yv", yv, "sq", sq)
    if sk.shape != sq.shape:
        raise ValueError(f"sk must have the shape of sq {tuple(sq.shape)}, got {tuple(sk.shape)}")
    if yv.shape[:2] != sq.shape[:2]:
        raise ValueError(f"yv must have shape (B_, N, C) = ({sq.shape[0]}, {sq.shape[1]}, C), got {tuple(yv.shape)}")
    return SPEC(backend, sq=sq, sk=sk, yv=yv)[0]


SPEC = OpSpec("semantic_attention", SemanticAttentionInputs, outputs=("out",),
              outputs_like=lambda inp: (inp.yv.new_empty(inp.yv.shape),),
              reference=lambda inp, keep: (ref.semantic_attention(inp.sq, inp.sk, inp.yv),),
              autocast=Autocast(lowered=("sq", "sk", "yv")))

__all__ = ["semantic_attention", "SemanticAttentionInputs", "SPEC"]
