"""Backends: declared capabilities, reasons, selection (see :mod:`.registry`)."""

from .base import KernelFunction, KernelImpl, OpImpl, note_ran, record_dispatch
from .registry import (BACKENDS, OPS, BackendNotSupportedError, available_backends, implementation, reasons,
                       register, select)

__all__ = [
    "BACKENDS", "OPS", "BackendNotSupportedError", "KernelFunction", "KernelImpl", "OpImpl", "available_backends",
    "implementation", "note_ran", "reasons", "record_dispatch", "register", "select",
]
