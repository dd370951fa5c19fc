"""The reference backend: each op's reference math (:mod:`semask_fast.reference`) behind the
backend interface.

It serves every validated input on every device and dtype (float64 included).  Like the kernel
backends it runs inside the op's custom op: forward computes the outputs and keeps nothing;
backward recomputes the forward and differentiates it (``torch.func.vjp``) with respect to the
inputs that need a gradient only.  Dropout draws its keep-mask from a generator seeded
with the op's seed, so the recomputation sees the same mask.
"""

from __future__ import annotations

from typing import Any, ClassVar, FrozenSet, List, Optional

import torch

from ..ops import SPECS, OpSpec
from .base import OpImpl
from .registry import register


class ReferenceImpl(OpImpl):
    backend = "reference"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    spec: ClassVar[OpSpec]

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cpu", "cuda"})  # and any other device PyTorch runs on

    def not_supported_reasons(self, inp: Any) -> List[str]:
        return []

    def _dropout_keep(self, inp: Any, seed: int) -> Optional[torch.Tensor]:
        if not self.spec.has_dropout or inp.dropout_p == 0:
            return None
        gen = torch.Generator(device=inp.device).manual_seed(seed)
        return torch.rand(self.spec.dropout_shape(inp), generator=gen, device=inp.device) >= inp.dropout_p

    def forward(self, inp, seed):
        return tuple(self.spec.reference(inp, self._dropout_keep(inp, seed))), ()

    def backward(self, inp, outputs, residuals, grad_outputs, needs, seed):
        # torch.func.vjp, not torch.autograd: autograd does not record inside a custom op's kernel.
        keep = self._dropout_keep(inp, seed)
        wanted = [n for n, need in zip(inp.grad_fields, needs) if need]

        def recompute(*tensors):
            return tuple(self.spec.reference(inp.replace(**dict(zip(wanted, tensors))), keep))

        _, vjp = torch.func.vjp(recompute, *(getattr(inp, n) for n in wanted))
        grads = dict(zip(wanted, vjp(tuple(g.to(o.dtype) for g, o in zip(grad_outputs, outputs)))))
        return tuple(grads.get(n) for n in inp.grad_fields)


for _spec in SPECS.values():
    register(type(f"{''.join(w.title() for w in _spec.name.split('_'))}Reference", (ReferenceImpl,),
                  {"op": _spec.name, "spec": _spec, "__module__": __name__}))
