"""What a backend is: an implementation of one op that declares what it supports.

Like xformers' fmha operators, an :class:`OpImpl` states its devices and dtypes
(and whatever else it needs through :meth:`OpImpl.input_reasons`) and, for
inputs it cannot serve, returns readable reasons instead of failing.

Every implementation (kernel backends and the reference) has an explicit ``forward`` and
``backward``; the op's custom op (:mod:`semask_fast.ops._library`) calls them, and autograd,
``torch.compile`` and saved-tensor handling sit above it, once for every backend.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, ClassVar, FrozenSet, List, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

# Process-wide, not per thread: the backward of CUDA tensors runs on autograd's device threads.
_recorders: list = []
_recorders_lock = threading.Lock()


@contextlib.contextmanager
def record_dispatch():
    """Record which backend ran each op phase: yields a list of (op, backend, phase).

    Phases are ``"forward"`` and ``"backward"``.  Tests use it to assert that the
    kernel they meant to test really ran::

        with record_dispatch() as ran:
            window_attention(q, k, v, ..., backend="triton").sum().backward()
        assert ran == [("window_attention", "triton", "forward"),
                       ("window_attention", "triton", "backward")]
    """
    log: list = []
    with _recorders_lock:
        _recorders.append(log)
    try:
        yield log
    finally:
        with _recorders_lock:
            _recorders.remove(log)


def note_ran(op: str, backend: str, phase: str) -> None:
    """Called by every implementation when it executes (see :func:`record_dispatch`)."""
    with _recorders_lock:
        for log in _recorders:
            log.append((op, backend, phase))


def draw_seed(device: torch.device, bound: int) -> torch.Tensor:
    """A dropout seed in [0, bound): a 0-d int64 tensor on ``device``, one ``torch.randint`` draw
    from the device's default generator.

    ``torch.manual_seed`` reproduces it and every call advances the generator.  On CUDA it is a
    random op like any other: no host-device sync, and inside a captured CUDA graph each replay
    draws a fresh seed into the same tensor (the generator's graph-safe Philox offset), which the
    kernels read from device memory, so replays get fresh dropout masks.
    """
    return torch.randint(0, bound, (), dtype=torch.int64, device=device)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (kernels that take row strides read it in place,
    e.g. permuted views of a fused q/k/v projection), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def on_device(device: torch.device):
    """Makes ``device`` current while an implementation runs on its tensors: kernels launch on the
    current CUDA device and stream (Triton's launcher, a raw launch), not necessarily the inputs'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def device_capability(device: torch.device) -> Tuple[int, int]:
    """Compute capability of a CUDA ``device`` (of the current device when it has no index)."""
    return torch.cuda.get_device_capability(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class OpImpl:
    """One backend's implementation of one op.

    Subclasses set ``op``, ``backend``, ``dtypes`` and override
    :meth:`availability_reasons` (reasons independent of the inputs: not built,
    no device...), :meth:`supported_devices` and :meth:`input_reasons`.
    """

    op: ClassVar[str]
    backend: ClassVar[str]
    dtypes: ClassVar[FrozenSet[torch.dtype]] = FLOAT_DTYPES
    #: False for backends that must be asked for by name (e.g. the SIMT harness,
    #: a correctness tool that is slower than the reference).
    auto_select: ClassVar[bool] = True

    def auto_selectable(self, inp: Any) -> bool:
        """Whether ``backend="auto"`` may pick this implementation for ``inp``."""
        return self.auto_select

    def availability_reasons(self) -> List[str]:
        return []

    def supported_devices(self) -> FrozenSet[str]:
        return frozenset({"cuda"})

    def input_reasons(self, inp: Any) -> List[str]:
        return []

    def device_reasons(self, device: torch.device) -> List[str]:
        """Reasons this implementation cannot run on ``device`` (the inputs' device, of a supported
        type), e.g. its compute capability: checked on that device, not the current one."""
        return []

    def preferred_device(self) -> torch.device:
        """Where to put inputs for this implementation on this machine (CUDA when it can)."""
        devices = self.supported_devices()
        use_cuda = "cuda" in devices and (torch.cuda.is_available() or "cpu" not in devices)
        return torch.device("cuda" if use_cuda else "cpu")

    def not_supported_reasons(self, inp: Any) -> List[str]:
        reasons = list(self.availability_reasons())
        if reasons:
            return reasons
        devices = self.supported_devices()
        if inp.device.type not in devices:
            reasons.append(f"device={inp.device.type} (supported: {', '.join(sorted(devices)) or 'none'})")
        else:
            reasons.extend(self.device_reasons(inp.device))
        if inp.dtype not in self.dtypes:
            names = ", ".join(sorted(_dtype_name(d) for d in self.dtypes))
            reasons.append(f"dtype={_dtype_name(inp.dtype)} (supported: {names})")
        reasons.extend(self.input_reasons(inp))
        return reasons

    # ------------------------------------------------------------------ computation
    #: Dropout seeds are drawn in [0, seed_bound) (the Triton kernels take 31-bit seeds).
    seed_bound: ClassVar[int] = 2 ** 62
    #: The kernels read the dropout seed from device memory: ``forward`` and ``backward`` get it as
    #: the 0-d int64 tensor :func:`draw_seed` returns (what a CUDA graph replays into).  Otherwise
    #: they get an int (read on the host: a sync for CUDA tensors).
    seed_on_device: ClassVar[bool] = False

    def forward(self, inp: Any, seed) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
        """``(outputs, residuals)``: the op's outputs and the tensors its backward needs beyond the
        inputs and outputs (e.g. a row logsumexp), neither aliasing an input.  ``seed`` is the
        dropout seed (0 without dropout), an int or (``seed_on_device``) a 0-d int64 tensor."""
        raise NotImplementedError

    def residuals_like(self, inp: Any) -> Tuple[torch.Tensor, ...]:
        """Empty tensors shaped as :meth:`forward`'s residuals (``inp`` may hold fake tensors)."""
        return ()

    def backward(self, inp: Any, outputs: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor],
                 grad_outputs: Sequence[torch.Tensor], needs: Sequence[bool],
                 seed) -> Tuple[Optional[torch.Tensor], ...]:
        """One gradient per field of ``inp.grad_fields``; ``needs[i]`` says whether field i's
        gradient is wanted (False also for an absent optional tensor): an implementation may
        skip the others and return None for them."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.backend} {self.op}>"
