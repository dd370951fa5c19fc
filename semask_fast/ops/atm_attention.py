"""SegViT's Attention-to-Mask cross-attention: public op and inputs."""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch

from .. import reference as ref
from ._common import OpInputs, check_like, check_probability, check_scale, check_size, check_tensor
from ._library import Autocast, OpSpec


@dataclasses.dataclass(frozen=True)
class ATMAttentionInputs(OpInputs):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    dropout_p: float

    grad_fields = ("q", "k", "v")


def atm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None, dropout_p: float = 0.0,
                  backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Class tokens attend over spatial tokens; also returns the mask logits.

    ``S = (q @ k^T) * scale``; ``out = dropout(softmax(S)) @ v``;
    ``mask_logits = S.sum(heads) / h`` taken before softmax and dropout.

    Args:
        q: (B, h, Nq, d) class-token queries.
        k, v: (B, h, Nk, d) spatial keys and values.
        scale: default d ** -0.5.
        dropout_p: attention dropout (SegViT trains with 0.1).

    Returns:
        out (B, h, Nq, d) and mask_logits (B, Nq, Nk), both differentiable.
    """
    check_tensor("q", q, 4, "(B, heads, Nq, head_dim)")
    check_tensor("k", k, 4, "(B, heads, Nk, head_dim)")
    check_tensor("v", v, 4, "(B, heads, Nk, head_dim)")
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    check_size("q", q, 3, "head_dim")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have shape (B, heads, Nk, head_dim) = ({q.shape[0]}, {q.shape[1]}, Nk, "
                         f"{q.shape[3]}) to match q, got {tuple(k.shape)}")
    out, mask_logits = SPEC(backend, q=q, k=k, v=v, scale=check_scale("scale", scale, q.shape[-1] ** -0.5),
                            dropout_p=check_probability("dropout_p", dropout_p))
    return out, mask_logits


def _outputs_like(inp: ATMAttentionInputs):
    b, _, nq, _ = inp.q.shape
    return inp.q.new_empty(inp.q.shape), inp.q.new_empty((b, nq, inp.k.shape[2]))


SPEC = OpSpec("atm_attention", ATMAttentionInputs, outputs=("out", "mask_logits"), outputs_like=_outputs_like,
              reference=lambda inp, keep: ref.atm_attention(inp.q, inp.k, inp.v, scale=inp.scale,
                                                            dropout_p=inp.dropout_p, dropout_keep=keep),
              dropout_shape=lambda inp: (*inp.q.shape[:3], inp.k.shape[2]),
              # The head-mean is a sum, which CUDA autocast runs in float32.
              autocast=Autocast(lowered=("q", "k", "v"),
                                fp32_outputs=lambda inp, device_type: ("mask_logits",) if device_type == "cuda" else ()))

__all__ = ["atm_attention", "ATMAttentionInputs", "SPEC"]
