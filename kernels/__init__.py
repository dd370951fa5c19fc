"""Triton kernels of semask_fast, one file per op: ``@triton.jit`` kernels plus launchers.

Installed as ``semask_fast.kernels``.  Imported lazily by the triton backend:
Triton decides at decoration time whether a kernel runs in its interpreter,
so ``TRITON_INTERPRET=1`` must be set before this package is first imported.
"""

import os

#: Whether these kernels were decorated for Triton's interpreter (CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: Triton's interpreter computes ``tl.dot`` wrongly on bfloat16 operands
#: (triton issue 11584).  Kernels take a ``DOT_FP32`` constexpr: under the
#: interpreter, bf16 tiles are upcast to fp32 right before each ``tl.dot``;
#: loads, casts, stores and accumulation keep the bf16 code path.  Compiled
#: kernels never upcast.
BF16_DOT_UPCAST = INTERPRETED


def dot_fp32(dtype) -> bool:
    """Value of the ``DOT_FP32`` constexpr for tiles of this torch dtype."""
    import torch

    return BF16_DOT_UPCAST and dtype == torch.bfloat16
