"""Which implementations exist, and which one serves a call.

The ops are those described in :mod:`semask_fast.ops` (``OPS``, in their order).
Implementations register themselves with :func:`register` when their module is
imported; the modules (:func:`implementation_modules`: the reference, then one per
kernel backend package and op family) are imported on first use (a kernel module is
never imported before the user asks for it, so ``TRITON_INTERPRET`` can still be set).  Selection walks ``BACKENDS`` in
priority order and takes the first implementation with no reasons against the
inputs; an automatic fallback to the reference warns once with the reasons, and
an explicitly requested backend that cannot serve raises them.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from typing import Any, Dict, List, Optional, Tuple, Type

from .base import OpImpl

#: Priority order for ``backend="auto"``.  ``simt`` (the CUDA C++ sources in the CPU SIMT harness)
#: and ``triton`` on CPU tensors (Triton's interpreter) are correctness tools, never picked
#: automatically (:meth:`OpImpl.auto_selectable`): on CPU tensors ``auto`` walks cpu -> reference.
BACKENDS = ("cuda", "triton", "cpu", "simt", "reference")

#: Backend packages with one module per op family (the name of the module in :mod:`semask_fast.ops`
#: that describes the op); a module that does not exist registers nothing, and its ops report
#: "no implementation".
_KERNEL_PACKAGES = ("triton", "cuda", "cpu")

_IMPLS: Dict[str, Dict[str, OpImpl]] = {}
_loaded = False
_lock = threading.Lock()
_warned: set = set()


class BackendNotSupportedError(ValueError):
    """No backend (or not the requested one) can serve these inputs."""


def _specs():
    from ..ops import SPECS  # the ops import this module: look them up when first needed

    return SPECS


def __getattr__(name: str):
    if name == "OPS":
        return tuple(_specs())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def implementation_modules() -> Tuple[str, ...]:
    """Modules whose import registers implementations: the reference, then one module per (kernel
    backend package, op family)."""
    families = dict.fromkeys(spec.family for spec in _specs().values())
    return ("semask_fast.backends.reference",) + tuple(
        f"semask_fast.backends.{package}.{family}" for package in _KERNEL_PACKAGES for family in families)


def register(cls: Type[OpImpl]) -> Type[OpImpl]:
    """Class decorator: make an implementation selectable."""
    if cls.op not in _specs():
        raise ValueError(f"unknown op {cls.op!r} (known: {', '.join(_specs())})")
    if cls.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cls.backend!r} (known: {', '.join(BACKENDS)})")
    _IMPLS.setdefault(cls.op, {})[cls.backend] = cls()
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for name in implementation_modules():
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                # Only the listed module (or its package) may be missing; a
                # missing dependency inside it is a real error.
                if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                    raise
        _loaded = True


def implementation(op: str, backend: str) -> Optional[OpImpl]:
    _load()
    return _IMPLS.get(op, {}).get(backend)


def reasons(op: str, backend: str, inp: Any = None) -> List[str]:
    """Why ``backend`` cannot serve ``op`` (for ``inp``, or in general when None)."""
    impl = implementation(op, backend)
    if impl is None:
        return [f"no {backend} implementation of {op}"]
    if inp is None:
        return impl.availability_reasons()
    return impl.not_supported_reasons(inp)


def select(op: str, inp: Any, backend: str = "auto") -> OpImpl:
    """The implementation that serves this call (see the module docstring)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend (expected 'auto' or one of {BACKENDS})")
        why = reasons(op, backend, inp)
        if why:
            raise BackendNotSupportedError(
                f"{op}: backend '{backend}' cannot serve these inputs ({inp.describe()}): " + "; ".join(why))
        return implementation(op, backend)

    rejected: Dict[str, List[str]] = {}
    for name in BACKENDS:
        impl = implementation(op, name)
        if impl is not None and not impl.auto_selectable(inp):
            continue
        why = reasons(op, name, inp)
        if not why:
            if name == "reference" and rejected:
                _warn_fallback(op, rejected)
            return impl
        rejected[name] = why
    raise BackendNotSupportedError(
        f"{op}: no backend can serve these inputs ({inp.describe()}): "
        + " | ".join(f"{n}: {'; '.join(r)}" for n, r in rejected.items()))


def _warn_fallback(op: str, rejected: Dict[str, List[str]]) -> None:
    text = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items())
    key = (op, text)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"semask_fast.{op}: falling back to the reference backend ({text})",
                  RuntimeWarning, stacklevel=5)


def available_backends() -> Dict[str, Dict[str, List[str]]]:
    """op -> backend -> reasons it is unavailable on this machine ([] = available)."""
    return {op: {b: reasons(op, b) for b in BACKENDS} for op in _specs()}
