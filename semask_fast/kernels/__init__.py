"""Triton kernels of semask_fast, one file per op: ``@triton.jit`` kernels plus launchers.

Installed as ``semask_fast.kernels``.  Imported lazily by the triton backend:
Triton decides at decoration time whether a kernel runs in its interpreter,
so ``TRITON_INTERPRET=1`` must be set before this package is first imported.

Every op module follows one launcher contract:

* ``<op>_forward(inputs..., *, op arguments, seed=0, plan=None)`` allocates and
  returns ``(outputs..., residuals...)``; ``<op>_backward(inputs..., outputs,
  residuals, output gradients, *, op arguments, seed=0, plan=None)`` allocates
  and returns the input gradients.  Dropout takes its ``seed`` from the caller: the
  0-d int64 tensor the op drew on the inputs' device, which the kernels load (so a
  CUDA-graph replay, which refills it, gets a fresh mask), or an int (tests).
* ``forward_plan(shape..., dtype, *, interpreter=None)`` and
  ``backward_plan(...)`` decide the tiles and launch options (a :class:`Plan`,
  or a dict of them keyed by kernel).  ``plan=None`` means that default; tests
  pass another plan explicitly (e.g. ``interpreter=False``: the GPU tiles).
  ``interpreter=None`` follows :data:`INTERPRETER_TILES`, the one place that
  decides the default.
* ``AOT_CONFIGS`` lists the shipped configurations, built from the same plans.

(``window_process``: ``window_partition`` / ``window_merge``, each the other's
backward, with one ``plan(channels)``.)

Shared ``@triton.jit`` helpers (products, online softmax, dropout, tile loads,
row dots) live in ``_common.py``; no op module imports another's internals.
"""

import dataclasses
import os
from typing import Mapping, Optional

#: Whether these kernels were decorated for Triton's interpreter (CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: Triton's interpreter computes ``tl.dot`` wrongly on bfloat16 operands
#: (triton issue 11584).  Kernels take a ``DOT_FP32`` constexpr: under the
#: interpreter, bf16 tiles are upcast to fp32 right before each ``tl.dot``;
#: loads, casts, stores and accumulation keep the bf16 code path.  Compiled
#: kernels never upcast.
BF16_DOT_UPCAST = INTERPRETED


#: Whether plans default to the interpreter's tiles: Triton's interpreter costs per tile operation,
#: not per element, so under it the launchers use larger tiles (fewer programs and loop trips).
#: The only such switch; ``benchmarks/traffic.py`` sets it False to count what a GPU's tiles move.
INTERPRETER_TILES = INTERPRETED


def interpreter_tiles(interpreter: Optional[bool]) -> bool:
    """A plan function's ``interpreter`` argument, None meaning :data:`INTERPRETER_TILES`."""
    return INTERPRETER_TILES if interpreter is None else interpreter


def dot_fp32(dtype) -> bool:
    """Value of the ``DOT_FP32`` constexpr for tiles of this torch dtype."""
    import torch

    return BF16_DOT_UPCAST and dtype == torch.bfloat16


def triton_version() -> tuple:
    """(major, minor) of the installed Triton: the kernels' plans and the interpreter's reasons
    depend on it."""
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def p2(x: int, lo: int = 16, hi: int = 1 << 30) -> int:
    """The power of two at least ``x``, clamped to [lo, hi] (tile sizes)."""
    return max(lo, min(hi, 1 << (max(int(x), 1) - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one kernel is launched: its tile constexprs and launch options.

    ``per_program`` is how many batch items (windows, images) one program loops over;
    each launcher passes it the way its kernel takes it.  A plan is a function of the
    shape only, so reductions that follow it are reproducible.
    """

    tiles: Mapping[str, int]
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: Optional[int] = None
    per_program: int = 1

    def __getitem__(self, name: str) -> int:
        return self.tiles[name]

    def with_tiles(self, **tiles) -> "Plan":
        """This plan with some tiles replaced (the interpreter's larger tiles, a test's choice)."""
        return dataclasses.replace(self, tiles={**self.tiles, **tiles})

    @property
    def options(self) -> dict:
        """The launch options, as ``triton.compile`` and a kernel launch take them."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    def launch(self) -> dict:
        """Keyword arguments of a launch: tiles and options."""
        return {**self.tiles, **self.options}


@dataclasses.dataclass
class AOTConfig:
    """One shipped kernel configuration, compiled ahead of time for sm_80 and sm_90.

    Every kernel module lists its shipped configurations in ``AOT_CONFIGS``, built from its plans
    (:meth:`from_plan`); ``benchmarks/aot_compile.py`` compiles them all with
    ``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget(...))``
    and reports registers, spills and shared memory.

    Args:
        kernel: the ``@triton.jit`` function.
        name: readable name of the configuration, e.g. ``"window_attention_fwd[N=49,d=32,fp16]"``.
        signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"i64"``, ``"fp32"``,
            ``"constexpr"``).
        plan: the launch: tile constexprs and options (``maxnreg``: per-thread register cap handed
            to ptxas; None keeps ptxas' own choice).
        constexprs: the other ``tl.constexpr`` arguments (flags).
    """

    kernel: object
    name: str
    signature: dict
    plan: Plan
    flags: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_plan(cls, kernel, name: str, signature: dict, plan: Plan, **flags) -> "AOTConfig":
        """The configuration a launch with ``plan`` and the constexpr ``flags`` compiles."""
        constexprs = {**plan.tiles, **flags}
        return cls(kernel, name, {**signature, **{c: "constexpr" for c in constexprs}}, plan, flags)

    @property
    def constexprs(self) -> dict:
        return {**self.plan.tiles, **self.flags}

    @property
    def options(self) -> dict:
        return self.plan.options

    num_warps = property(lambda self: self.plan.num_warps)
    num_stages = property(lambda self: self.plan.num_stages)
    maxnreg = property(lambda self: self.plan.maxnreg)
