"""The triton backend: what every Triton implementation shares.

Each op's implementation lives in a module of this package (registered through
``registry.implementation_modules()``) and launches kernels from
``semask_fast.kernels``.  On a machine without a CUDA device the backend runs
on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before the kernels were imported.  Kernels launch on the inputs' device (the op makes it
current, :func:`~semask_fast.backends.base.on_device`), whose compute capability is checked.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from typing import FrozenSet, List

import torch

from ..base import OpImpl, device_capability

INTERPRET_HINT = "set TRITON_INTERPRET=1 before importing semask_fast to run Triton's interpreter on CPU tensors"


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (decided when the kernels were imported)."""
    kernels = sys.modules.get("semask_fast.kernels")
    if kernels is not None:
        return kernels.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@lru_cache(maxsize=None)
def _static_reasons() -> tuple:
    if importlib.util.find_spec("triton") is None:
        return ("triton is not installed (pip install triton)",)
    return ()


#: Oldest GPU the kernels are written for (bf16 tensor-core dots).
MIN_COMPUTE_CAPABILITY = (8, 0)


def device_reasons(device: torch.device) -> List[str]:
    """Why the Triton kernels cannot run on the CUDA ``device`` ([] = they can)."""
    major, minor = device_capability(device)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        return [f"{device}: compute capability {major}.{minor} (needs >= 8.0)"]
    return []


#: Oldest Triton whose interpreter runs the kernels: 3.6's fails on a scalar argument handed to a
#: nested jit function ("only 0-dimensional arrays can be converted to Python scalars"; 3.8 runs them).
MIN_INTERPRETER_VERSION = (3, 8)


def interpreter_reasons() -> List[str]:
    import triton

    from ...kernels import triton_version

    if triton_version() < MIN_INTERPRETER_VERSION:
        return [f"Triton {triton.__version__}'s interpreter cannot run these kernels (needs Triton >= "
                f"{'.'.join(map(str, MIN_INTERPRETER_VERSION))}; compiled kernels on a GPU are unaffected)"]
    return []


def triton_reasons() -> List[str]:
    """Reasons the triton backend cannot run at all on this machine (no device it can run on)."""
    reasons = list(_static_reasons())
    if reasons:
        return reasons
    if interpreting():
        return interpreter_reasons()
    if not torch.cuda.is_available():
        return [f"no CUDA device ({INTERPRET_HINT})"]
    per_device = [device_reasons(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    return [] if not all(per_device) else [r for rs in per_device for r in rs]


class TritonImpl(OpImpl):
    backend = "triton"
    seed_bound = 2 ** 31 - 1  # the kernels take 31-bit seeds
    seed_on_device = True  # read by the kernels from the seed tensor (fresh under CUDA-graph replay)

    def availability_reasons(self) -> List[str]:
        return triton_reasons()

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cpu"}) if interpreting() else frozenset({"cuda"})

    def device_reasons(self, device: torch.device) -> List[str]:
        return device_reasons(device) if device.type == "cuda" else []

    def auto_selectable(self, inp) -> bool:
        # The interpreter is a correctness tool, far slower than the reference: ask for it by name.
        return inp.device.type == "cuda"
