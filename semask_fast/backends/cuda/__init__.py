"""The CUDA C++ kernels of ``csrc/ops``, as two backends.

* ``cuda`` (:class:`CudaImpl`): the nvcc build (sm_80, sm_90, PTX for newer GPUs) on CUDA tensors,
  each input's device checked (capability, shared memory) and made current for the launch.
* ``simt`` (:class:`SimtImpl`): the same kernel sources compiled by g++ into the CPU SIMT
  harness, on CPU tensors.  A correctness tool (every kernel runs in CI without a GPU), slower
  than the reference, so it is never picked automatically: ask for ``backend="simt"``.  (The fast
  native CPU kernels are the ``cpu`` backend, :mod:`semask_fast.backends.cpu`.)

Each op family has a module here (``window_process``, ``mask_similarity``, ...) with one
mixin that calls ``self.library().<op>_forward`` / ``_backward`` and registers a
``CudaImpl`` and a ``SimtImpl`` class built from it.  The kernels of that module live in
``csrc/ops/<module name>.cu`` (override with the ``source`` class attribute); that file is built
on first use (see :mod:`semask_fast._build`).  A failed build is an availability reason carrying
the compiler's first error line, never a silent fallback.
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar, FrozenSet, List

import torch

from ... import _build
from ..base import OpImpl, device_capability

#: Oldest GPU the kernels are built for (sm_80: mma.sync with bf16, cp.async).
MIN_COMPUTE_CAPABILITY = (8, 0)


@lru_cache(maxsize=None)
def _toolchain_reasons(flavour: str) -> tuple:
    return tuple(_build.toolchain_reasons(flavour))


def device_reasons(device: torch.device) -> List[str]:
    """Why the nvcc-built kernels cannot launch on the CUDA ``device`` ([] = they can): too old, or
    an architecture the build carries neither machine code nor PTX for (see
    :func:`semask_fast._build.cuda_arch_reasons`), which would fail with "no kernel image"."""
    capability = device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return [f"{device}: compute capability {capability[0]}.{capability[1]} (needs >= 8.0)"]
    return [f"{device}: {r}" for r in _build.cuda_arch_reasons(capability)]


def cuda_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device when it has none); -1 off CUDA (the
    harness, whose limits come from SF_SIMT_ARCH)."""
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_device_reasons() -> List[str]:
    """Why the nvcc-built kernels cannot launch on this machine (no device they can run on)."""
    if torch.version.cuda is None:
        return ["torch was built without CUDA"]
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    per_device = [device_reasons(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    return [] if not all(per_device) else [r for rs in per_device for r in rs]


class _CompiledImpl(OpImpl):
    """An op whose kernels come from one ``csrc/ops/*.cu`` file, in one build flavour."""

    flavour: ClassVar[str]
    seed_on_device = True  # the kernels read the dropout seed from the seed tensor
    #: File of ``csrc/ops`` with this op's kernels; empty means ``<module name>.cu``.
    source: ClassVar[str] = ""

    @classmethod
    def source_name(cls) -> str:
        return cls.source or cls.__module__.rsplit(".", 1)[-1] + ".cu"

    def library(self):
        """The loaded ``torch.ops`` namespace of the flavour (``semask_fast_cuda``, ``semask_fast_simt``...)."""
        return _build.load(self.flavour, self.source_name())

    def build_reasons(self) -> List[str]:
        reasons = list(_toolchain_reasons(self.flavour))
        if reasons:
            return reasons
        try:
            self.library()
        except _build.BuildError as e:
            name = self.source_name()
            return [f"{self.flavour} build of csrc/{name if '/' in name else 'ops/' + name} failed: {e.first_error}"]
        except FileNotFoundError as e:
            return [str(e)]
        return []


class CudaImpl(_CompiledImpl):
    backend = "cuda"
    flavour = "cuda"

    def availability_reasons(self) -> List[str]:
        # Without a device nothing could launch: do not spend minutes compiling.
        return cuda_device_reasons() or self.build_reasons()

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cuda"})

    def device_reasons(self, device: torch.device) -> List[str]:
        return device_reasons(device)


class SimtImpl(_CompiledImpl):
    backend = "simt"
    flavour = "simt"
    auto_select = False

    def availability_reasons(self) -> List[str]:
        return self.build_reasons()

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cpu"})


__all__ = ["CudaImpl", "SimtImpl", "cuda_device_reasons", "cuda_index", "device_reasons", "MIN_COMPUTE_CAPABILITY"]
