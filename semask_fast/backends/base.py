"""What a backend is: an implementation of one op that declares what it supports.

Like xformers' fmha operators, an :class:`OpImpl` states its devices and dtypes
(and whatever else it needs through :meth:`OpImpl.input_reasons`) and, for
inputs it cannot serve, returns readable reasons instead of failing.

Kernel backends (triton, cuda, cpu, simt) implement ``forward`` and ``backward``;
the one autograd Function, :class:`KernelFunction`, sits above all of them.
The reference backend is differentiable through autograd and overrides ``run``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, ClassVar, FrozenSet, List, Sequence, Tuple

import torch

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

_recorders = threading.local()


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
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    log: list = []
    stack.append(log)
    try:
        yield log
    finally:
        stack.remove(log)


def note_ran(op: str, backend: str, phase: str) -> None:
    """Called by every implementation when it executes (see :func:`record_dispatch`)."""
    for log in getattr(_recorders, "stack", ()):
        log.append((op, backend, phase))


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
        if inp.dtype not in self.dtypes:
            names = ", ".join(sorted(_dtype_name(d) for d in self.dtypes))
            reasons.append(f"dtype={_dtype_name(inp.dtype)} (supported: {names})")
        reasons.extend(self.input_reasons(inp))
        return reasons

    def run(self, inp: Any) -> Tuple[torch.Tensor, ...]:
        """Compute the op's outputs (always a tuple), differentiable."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.backend} {self.op}>"


class KernelImpl(OpImpl):
    """A backend made of explicit forward and backward kernels.

    ``forward(inp) -> (outputs, saved)``: outputs is a tuple of tensors, saved a
    tuple of tensors kept for backward (non-tensor state, such as a dropout seed,
    travels as a tensor too).  ``backward(inp, saved, grad_outputs)`` returns one
    gradient (or None) per tensor of ``inp.differentiable()``.
    """

    def forward(self, inp: Any) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
        raise NotImplementedError

    def backward(self, inp: Any, saved: Sequence[torch.Tensor],
                 grad_outputs: Sequence[torch.Tensor]) -> Tuple[Any, ...]:
        raise NotImplementedError

    def run(self, inp: Any) -> Tuple[torch.Tensor, ...]:
        apply = KernelFunction.apply
        if torch.compiler.is_compiling():
            # torch.compile does not trace into the kernels (launchers, Triton's interpreter,
            # extension ops without fake implementations): the call is a graph break, run eagerly
            # with its own backward.  Wrapped here, not at import: torch.compiler.disable imports
            # dynamo, which imports triton, which must come after TRITON_INTERPRET is set.
            apply = torch.compiler.disable(apply)
        return apply(self, inp, *inp.differentiable())


class KernelFunction(torch.autograd.Function):
    """The autograd Function shared by every kernel backend of every op."""

    @staticmethod
    def forward(ctx, impl: KernelImpl, inp: Any, *tensors):
        note_ran(impl.op, impl.backend, "forward")
        outputs, saved = impl.forward(inp)
        ctx.impl, ctx.inp = impl, inp
        ctx.save_for_backward(*saved)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        note_ran(ctx.impl.op, ctx.impl.backend, "backward")
        grads = ctx.impl.backward(ctx.inp, ctx.saved_tensors, grad_outputs)
        n = len(ctx.needs_input_grad) - 2
        if len(grads) != n:
            raise RuntimeError(f"{ctx.impl!r}.backward returned {len(grads)} gradients, expected {n}")
        grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:]))
        return (None, None, *grads)
