"""Backends: declared capabilities, reasons, selection (see :mod:`.registry`)."""

from . import registry
from .base import OpImpl, draw_seed, note_ran, record_dispatch
from .registry import BACKENDS, BackendNotSupportedError, available_backends, implementation, reasons, register, select


def __getattr__(name: str):
    if name == "OPS":  # derived from the op descriptions, which import this package
        return registry.OPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS", "OPS", "BackendNotSupportedError", "OpImpl", "available_backends", "draw_seed", "implementation",
    "note_ran", "reasons", "record_dispatch", "register", "select",
]
