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

from functools import lru_cache
from typing import ClassVar, FrozenSet, List

import torch

from ... import _build
from ..base import FLOAT_DTYPES, KernelImpl


@lru_cache(maxsize=None)
def _toolchain_reasons() -> tuple:
    return tuple(_build.toolchain_reasons("cpu"))


class CpuImpl(KernelImpl):
    """An op whose kernels come from one ``csrc/cpu/*.cpp`` file."""

    backend = "cpu"
    dtypes = FLOAT_DTYPES | {torch.float64}
    #: File of ``csrc/cpu`` with this op's kernels; empty means ``<module name>.cpp``.
    source: ClassVar[str] = ""

    @classmethod
    def source_name(cls) -> str:
        return "cpu/" + (cls.source or cls.__module__.rsplit(".", 1)[-1] + ".cpp")

    def library(self):
        """The loaded ``torch.ops.semask_fast_cpu`` namespace."""
        return _build.load("cpu", self.source_name())

    def availability_reasons(self) -> List[str]:
        reasons = list(_toolchain_reasons())
        if reasons:
            return reasons
        try:
            self.library()
        except _build.BuildError as e:
            return [f"cpu build of csrc/{self.source_name()} failed: {e.first_error}"]
        except FileNotFoundError as e:
            return [str(e)]
        return []

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cpu"})


__all__ = ["CpuImpl"]
