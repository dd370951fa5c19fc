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


class AOTConfig:
    """One shipped kernel configuration, compiled ahead of time for sm_80 and sm_90.

    Every kernel module lists its shipped configurations in ``AOT_CONFIGS``;
    ``benchmarks/aot_compile.py`` compiles them all with
    ``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget(...))``
    and reports registers, spills and shared memory.

    Args:
        kernel: the ``@triton.jit`` function.
        name: readable name of the configuration, e.g. ``"window_attention_fwd[N=49,d=32,fp16]"``.
        signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"i64"``, ``"fp32"``,
            ``"constexpr"``), in argument order.
        constexprs: values of the ``tl.constexpr`` arguments.
        num_warps, num_stages, maxnreg: launch options as the launcher uses them (``maxnreg``:
            per-thread register cap handed to ptxas; None keeps ptxas' own choice).
    """

    def __init__(self, kernel, name, signature, constexprs, num_warps=4, num_stages=2, maxnreg=None):
        self.kernel = kernel
        self.name = name
        self.signature = dict(signature)
        self.constexprs = dict(constexprs)
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.maxnreg = maxnreg

    def __repr__(self):
        return f"AOTConfig({self.name}, warps={self.num_warps}, stages={self.num_stages}, maxnreg={self.maxnreg})"

    @property
    def options(self) -> dict:
        """The launch options, as ``triton.compile`` and a kernel launch take them."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts
