"""The ``cpu`` backend: native C++ kernels for CPU tensors (``csrc/cpu/<op family>.cpp``).

Each op family has a module here with one :class:`CpuImpl` subclass per op, calling
``self.library().<op>_forward`` / ``_backward`` (``torch.ops.semask_fast_cpu``).  The source is
built on first use by g++ for this machine's instruction set (:mod:`semask_fast._build`, flavour
``"cpu"``), cached; a failed build is an availability reason carrying the compiler's first error
line.  Kernels run fused per (window, head) or row block, parallel with ``at::parallel_for``
(``torch.set_num_threads`` is honoured), in fp32 (fp64 for double inputs, so ``gradcheck`` runs on
them; fp16 / bf16 are converted when staged, accumulated in fp32 and rounded once).  Ops with
``matrix_unit`` run fp16 / bf16 products on the CPU's matrix unit (AMX) where it serves the dtype
(``csrc/cpu/sf_cpu_matrix.h``; :func:`matrix_unit_summary` says what runs here).
"""

from __future__ import annotations

from typing import ClassVar, FrozenSet, List

import torch

from ..base import FLOAT_DTYPES
from ..cuda import _CompiledImpl


def computes_wider(dtype: torch.dtype) -> bool:
    """Whether the kernels accumulate in a wider type than ``dtype`` (float16 / bfloat16: float32)."""
    return dtype not in (torch.float32, torch.float64)


class CpuImpl(_CompiledImpl):
    """An op whose kernels come from one ``csrc/cpu/*.cpp`` file (built like the CUDA sources, in
    the ``cpu`` flavour)."""

    backend = "cpu"
    flavour = "cpu"
    dtypes = FLOAT_DTYPES | {torch.float64}
    #: File of ``csrc/cpu`` with this op's kernels; empty means ``<module name>.cpp``.
    source: ClassVar[str] = ""
    #: Whether the kernels run float16 / bfloat16 on the CPU's matrix unit where it serves the dtype
    #: (``csrc/cpu/sf_cpu_matrix.h``); elsewhere on the vector units in float32.
    matrix_unit: ClassVar[bool] = False

    @classmethod
    def source_name(cls) -> str:
        return "cpu/" + (cls.source or cls.__module__.rsplit(".", 1)[-1] + ".cpp")

    def on_matrix_unit(self, dtype: torch.dtype) -> bool:
        """Whether the kernels take ``dtype`` as it is, on the matrix unit, now (else float16 /
        bfloat16 are converted to float32 for them)."""
        return (self.matrix_unit and dtype in (torch.float16, torch.bfloat16)
                and getattr(self.library(), f"{self.op}_matrix_unit")(dtype))

    def availability_reasons(self) -> List[str]:
        return self.build_reasons()

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cpu"})


def matrix_unit_dtypes() -> List[torch.dtype]:
    """The reduced dtypes the cpu kernels run on the matrix unit now (AMX through oneDNN's brgemm,
    as csrc/cpu/sf_cpu_matrix.h decides: bfloat16 with AMX, float16 with AMX-FP16, neither with
    oneDNN switched off); empty where the kernels cannot be built."""
    from ..registry import implementation

    impl = implementation("semantic_attention", "cpu")
    if impl is None or impl.availability_reasons():
        return []
    return [d for d in (torch.bfloat16, torch.float16) if impl.on_matrix_unit(d)]


def matrix_unit_ops() -> List[str]:
    """The ops whose cpu kernels use the matrix unit where it serves their dtype."""
    from .. import registry

    return [op for op in registry.OPS if getattr(registry.implementation(op, "cpu"), "matrix_unit", False)]


def matrix_unit_summary() -> str:
    """One line: which reduced dtypes the cpu kernels run on the matrix unit here, for which ops,
    or why none (``info`` and the bench's header print it)."""
    dtypes = matrix_unit_dtypes()
    if not dtypes:
        reason = ("oneDNN is switched off (torch.backends.mkldnn)" if not torch.backends.mkldnn.enabled
                  else "no AMX on this CPU (or the kernels cannot be built)")
        return f"none: {reason}; float16 / bfloat16 run in float32 on the vector units"
    served = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    rest = "" if len(dtypes) == 2 else "; float16 on the vector units (its matrix unit needs AMX-FP16)"
    return f"{served} on AMX (oneDNN's brgemm) for {', '.join(matrix_unit_ops())}{rest}"


__all__ = ["CpuImpl", "computes_wider", "matrix_unit_dtypes", "matrix_unit_ops", "matrix_unit_summary"]
