"""The ``cpu`` backend: native C++ kernels for CPU tensors (``csrc/cpu/<op family>.cpp``).

Each op family has a module here with one :class:`CpuImpl` subclass per op, calling
``self.library().<op>_forward`` / ``_backward`` (``torch.ops.semask_fast_cpu``).  The source is
built on first use by g++ for this machine's instruction set (:mod:`semask_fast._build`, flavour
``"cpu"``), cached; a failed build is an availability reason carrying the compiler's first error
line.  Kernels run fused per (window, head) or row block, parallel with ``at::parallel_for``
(``torch.set_num_threads`` is honoured), in fp32 (fp64 for double inputs, so ``gradcheck`` runs on
them; fp16 / bf16 are converted when staged, accumulated in fp32 and rounded once).
"""

from __future__ import annotations

from typing import ClassVar, FrozenSet, List

import torch

from ..base import FLOAT_DTYPES
from ..cuda import _CompiledImpl


class CpuImpl(_CompiledImpl):
    """An op whose kernels come from one ``csrc/cpu/*.cpp`` file (built like the CUDA sources, in
    the ``cpu`` flavour)."""

    backend = "cpu"
    flavour = "cpu"
    dtypes = FLOAT_DTYPES | {torch.float64}
    #: File of ``csrc/cpu`` with this op's kernels; empty means ``<module name>.cpp``.
    source: ClassVar[str] = ""

    @classmethod
    def source_name(cls) -> str:
        return "cpu/" + (cls.source or cls.__module__.rsplit(".", 1)[-1] + ".cpp")

    def availability_reasons(self) -> List[str]:
        return self.build_reasons()

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cpu"})


__all__ = ["CpuImpl"]
