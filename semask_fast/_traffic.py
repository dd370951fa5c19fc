"""Memory-traffic counters: what an op moves through memory, measured on the CPU.

Used by the tests (the SIMT harness's tracer, byte-exact kernel traffic) and by the traffic
scripts under ``benchmarks/``, which turn the counts into tables.

* :func:`aten_bytes` runs a function under a ``TorchDispatchMode`` and adds up
  the bytes of the tensor inputs and outputs of every aten op it runs (view ops,
  which move nothing, excluded): the traffic of the eager path when nothing
  stays in cache between ops.  A ``semask_fast::<op>`` custom op is one opaque
  node to it: to count an op's reference math, run :mod:`semask_fast.reference`.
* :func:`triton_bytes` runs a function whose Triton kernels execute in the
  interpreter (``TRITON_INTERPRET=1``) and counts every element that a
  ``tl.load`` / ``tl.store`` / atomic touches with its mask on.  ``read`` and
  ``written`` count each address once per launch (the DRAM model: a kernel's
  repeated reads of the same bytes hit in cache); ``read_issued`` and
  ``written_issued`` count every access.
* :func:`harness_bytes` runs a function whose CUDA C++ kernels execute in the
  SIMT harness, built in the ``trace`` flavour (every load and store of the
  kernel source instrumented by the compiler, ``csrc/harness/sf_trace.h``), and
  counts the same two measures over the op's input tensors and every tensor
  allocated while it runs (outputs, workspaces).
* :func:`minimum_bytes`: inputs read once, outputs written once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(_nbytes(t) for t in tensors)
            self.ops.append(str(func))
        return out


def aten_bytes(fn: Callable[[], object]) -> int:
    """Bytes read and written by the aten ops of ``fn()`` (inputs + outputs of each op)."""
    counter = _AtenCounter()
    with counter:
        fn()
    return counter.bytes


def minimum_bytes(inputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor]) -> int:
    """Every input read once and every output written once."""
    return sum(_nbytes(t) for t in inputs if t is not None) + sum(_nbytes(t) for t in outputs if t is not None)


@dataclasses.dataclass
class Traffic:
    """Bytes of a run: ``read`` / ``written`` each address once per launch (the DRAM model), the
    ``_issued`` counts every access; ``launches`` kernels."""

    read: int = 0
    written: int = 0
    read_issued: int = 0
    written_issued: int = 0
    launches: int = 0

    @property
    def total(self) -> int:
        return self.read + self.written


class _LaunchLog:
    def __init__(self):
        self.reads: List[np.ndarray] = []
        self.writes: List[np.ndarray] = []


@contextlib.contextmanager
def _count_interpreter(traffic: Traffic):
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
    orig_rmw, orig_run = builder.create_atomic_rmw, ti.GridExecutor.__call__
    state = {"log": None}

    def record(kind, ptrs, mask):
        size = ti._get_np_dtype(ptrs.get_element_ty()).itemsize
        addrs = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()  # masks may be int32
        addrs = np.asarray(addrs, dtype=np.uint64).ravel()
        if kind == "r":
            traffic.read_issued += addrs.size * size
        else:
            traffic.written_issued += addrs.size * size
        log = state["log"]
        if log is not None:
            (log.reads if kind == "r" else log.writes).append((addrs, size))

    def masked_load(self, ptrs, mask, other, *a, **k):
        record("r", ptrs, mask)
        return orig_load(self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        record("w", ptrs, mask)
        return orig_store(self, ptrs, value, mask, *a, **k)

    def atomic_rmw(self, op, ptr, val, mask, *a, **k):
        record("r", ptr, mask)
        record("w", ptr, mask)
        return orig_rmw(self, op, ptr, val, mask, *a, **k)

    def run(self, *a, **k):
        outer, state["log"] = state["log"], _LaunchLog()
        try:
            return orig_run(self, *a, **k)
        finally:
            log, state["log"] = state["log"], outer
            traffic.launches += 1
            traffic.read += _unique_bytes(log.reads)
            traffic.written += _unique_bytes(log.writes)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, ti.GridExecutor.__call__ = atomic_rmw, run
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = orig_load, orig_store
        builder.create_atomic_rmw, ti.GridExecutor.__call__ = orig_rmw, orig_run


def _unique_bytes(chunks) -> int:
    total = 0
    by_size = {}
    for addrs, size in chunks:
        by_size.setdefault(size, []).append(addrs)
    for size, parts in by_size.items():
        total += np.unique(np.concatenate(parts)).size * size
    return total


def triton_bytes(fn: Callable[[], object]) -> Traffic:
    """Bytes the Triton kernels launched by ``fn()`` read and write (interpreter only)."""
    from . import kernels

    if not kernels.INTERPRETED:
        raise RuntimeError("triton_bytes counts in Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "importing semask_fast")
    traffic = Traffic()
    with _count_interpreter(traffic):
        fn()
    return traffic


def harness_bytes(source: str, fn: Callable[[object], object], inputs: Iterable[torch.Tensor],
                  regions: Optional[list] = None) -> Traffic:
    """Bytes the CUDA kernels of ``csrc/ops/<source>`` launched by ``fn(lib)`` read and write.

    ``lib`` is the trace build's ``torch.ops`` namespace (same op schemas as the simt and cuda
    builds); ``inputs`` are the CPU tensors the kernels may read that exist before the call.
    Memory set by torch calls inside the op (``at::zeros``) is not a kernel access and is not counted.
    ``regions``, if given, receives one dict per tensor region (bytes, read, written, read_issued,
    written_issued, allocated: made during the call, i.e. an output or a workspace).
    """
    from . import _build

    lib = _build.load("trace", source)
    previous = os.environ.get("SF_SIMT_THREADS")
    os.environ["SF_SIMT_THREADS"] = "1"  # the counters are per host thread
    lib.trace_begin([t for t in inputs if t is not None])
    try:
        fn(lib)
    finally:
        rows = lib.trace_end()
        if previous is None:
            del os.environ["SF_SIMT_THREADS"]
        else:
            os.environ["SF_SIMT_THREADS"] = previous
    if regions is not None:
        keys = ("begin", "bytes", "read", "written", "read_issued", "written_issued", "allocated")
        regions.extend(dict(zip(keys, r)) for r in rows[:-1].tolist())
    totals, last = rows[:-1].sum(0).tolist(), rows[-1].tolist()
    return Traffic(read=totals[2], written=totals[3], read_issued=totals[4], written_issued=totals[5],
                   launches=last[0])
