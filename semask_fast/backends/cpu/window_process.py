"""window_partition / window_merge from ``csrc/cpu/window_process.cpp`` (native cpu backend).

Parallel row copies (one memcpy per run of tokens consecutive in both tensors): bitwise exact for
every dtype, any H and W (zero padding), both pad/roll orders, non-square windows.  The bindings
take the same arguments as the CUDA ones, so the calls are the cuda backend's
(:mod:`semask_fast.backends.cuda.window_process`): each op's backward runs the other direction.
"""

from __future__ import annotations

from ..cuda.window_process import _WindowMergeKernels, _WindowPartitionKernels
from ..registry import register
from . import CpuImpl


@register
class WindowPartitionCpu(_WindowPartitionKernels, CpuImpl):
    pass


@register
class WindowMergeCpu(_WindowMergeKernels, CpuImpl):
    pass
