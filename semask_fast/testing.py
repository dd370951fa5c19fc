"""Parity checking shared by the tests, the ``check`` command and every backend.

The tolerances live here and nowhere else.  A backend's output (or gradient)
in a given dtype passes when, against a float64 reference computed from the
same (rounded) inputs, either

* every element is within ``atol + rtol * |reference|``, or
* its largest error is at most twice the largest error of PyTorch's own
  reference computation in that dtype (flash-attention's criterion),

so a kernel is never asked to be more exact than PyTorch itself is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .backends.base import record_dispatch


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


#: (forward, backward) tolerance per dtype.  Peers: fp32 1e-4, fp16 1e-2, bf16 5e-2.
TOLERANCES: Dict[torch.dtype, Tuple[Tolerance, Tolerance]] = {
    torch.float64: (Tolerance(1e-10, 1e-10), Tolerance(1e-10, 1e-10)),
    torch.float32: (Tolerance(1e-4, 1e-4), Tolerance(1e-4, 1e-4)),
    torch.float16: (Tolerance(1e-2, 1e-2), Tolerance(1e-2, 1e-2)),
    torch.bfloat16: (Tolerance(5e-2, 5e-2), Tolerance(5e-2, 5e-2)),
}

#: Pure data movement (roll, pad, partition, merge) must be bitwise exact.
EXACT = Tolerance(0.0, 0.0)

#: Two float32 computations of the same math in another order (a drop-in module against the module
#: it replaces, our model against the official code's order): rounding only, so ten times tighter
#: than a kernel against float64.  In float64 the same comparison (a transcription of the official
#: code) uses ``TOLERANCES[torch.float64]``.
REORDERED_FP32 = Tolerance(1e-5, 1e-5)

#: ``torch.autograd.gradcheck`` settings for the float64 kernels.
GRADCHECK = dict(eps=1e-6, atol=1e-7)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
                 backward: bool = False, what: str = "", tol: Optional[Tolerance] = None) -> None:
    """``actual`` within ``tol`` of ``expected`` (compared in float64, so dtypes are not compared), for
    tests that build their own reference (dropout replay, whole models, official layers).  Without
    ``tol``, the forward or backward tolerance of ``dtype``, the precision ``actual`` was computed in."""
    if tol is None:
        if dtype is None:
            raise TypeError("assert_close needs dtype (the precision actual was computed in) or tol")
        tol = TOLERANCES[dtype][int(backward)]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol.atol, rtol=tol.rtol,
                               msg=(lambda m: f"{what}: {m}") if what else None)


@dataclasses.dataclass
class Comparison:
    name: str
    max_error: float
    allowed: float
    baseline_error: Optional[float]
    ok: bool

    def __str__(self) -> str:
        base = "" if self.baseline_error is None else f", torch-in-dtype error {self.baseline_error:.3g}"
        return f"{self.name}: max error {self.max_error:.3g} (allowed {self.allowed:.3g}{base})"


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance,
            baseline: Optional[torch.Tensor] = None) -> Comparison:
    """Compare ``actual`` with the high-precision ``expected`` (see the module docstring)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    # On the tensors' device: at the papers' shapes (gpu-check) a copy to the host costs more than the check.
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    if not torch.isfinite(a).all():
        return Comparison(name, float("inf"), 0.0, None, False)
    err = (a - e).abs()
    bound = tol.atol + tol.rtol * e.abs()
    max_err = err.max().item() if err.numel() else 0.0
    allowed = tol.atol + tol.rtol * e.abs().max().item() if err.numel() else 0.0
    ok = bool((err <= bound).all())
    base_err = None
    if baseline is not None:
        base_err = (baseline.detach().double().to(e.device) - e).abs().max().item() if err.numel() else 0.0
        ok = ok or max_err <= 2 * base_err
    return Comparison(name, max_err, allowed, base_err, ok)


def _clone_inputs(tensors: Dict[str, Optional[torch.Tensor]], dtype: torch.dtype,
                  grad_names: Sequence[str]) -> Dict[str, Optional[torch.Tensor]]:
    out = {}
    for n, t in tensors.items():
        if t is None:
            out[n] = None
            continue
        t = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        out[n] = t.requires_grad_(n in grad_names)
    return out


def run_with_grads(fn: Callable[..., Sequence[torch.Tensor]], tensors: Dict[str, Optional[torch.Tensor]],
                   grad_names: Sequence[str], grad_outputs: Sequence[torch.Tensor]):
    """Outputs of ``fn(**tensors)`` and the gradients of <outputs, grad_outputs> wrt ``grad_names``."""
    outs = fn(**tensors)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    names = [n for n in grad_names if tensors.get(n) is not None]
    grads = {}
    if names:
        gs = torch.autograd.grad(outs, [tensors[n] for n in names],
                                 [g.to(o.dtype) for g, o in zip(grad_outputs, outs)], allow_unused=True)
        # An input the graph does not use (e.g. a padding value when nothing is padded) has zero gradient.
        grads = {n: torch.zeros_like(tensors[n]) if g is None else g for n, g in zip(names, gs)}
    return outs, grads


def check_parity(fn: Callable[..., Sequence[torch.Tensor]], tensors: Dict[str, Optional[torch.Tensor]],
                 grad_names: Sequence[str], dtype: torch.dtype, *, backend: str, op: str,
                 exact: bool = False, seed: int = 0, references: Optional[dict] = None) -> List[Comparison]:
    """Run ``fn(backend=..., **tensors)`` in ``dtype`` and compare outputs and gradients with float64.

    ``tensors`` are the inputs at any precision: they are rounded to ``dtype``
    once, and the float64 reference starts from those rounded values.  Raises
    ``AssertionError`` if the backend that ran was not ``backend`` (forward and,
    when gradients are taken, backward).  Returns one :class:`Comparison` per
    output and gradient; the caller asserts (``assert_parity`` does both).

    ``references``: a dict shared by the calls that differ only in ``backend`` (same ``fn``,
    ``tensors``, ``grad_names``, ``dtype``, ``seed``): the first computes the float64 and in-dtype
    reference runs into it, the others reuse them (at the papers' shapes they cost more than the
    backend's own run).
    """
    low = _clone_inputs(tensors, dtype, grad_names)
    with record_dispatch() as ran:
        outs = fn(backend=backend, **low)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    # Rounded to each output's dtype, so the float64 reference sees what the backend sees (exact mode needs it).
    grad_outputs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).double().to(o.device)
                    for o in outs]
    names = [n for n in grad_names if low.get(n) is not None]
    with record_dispatch() as ran_bwd:
        grads = (torch.autograd.grad(outs, [low[n] for n in names], [g.to(o.dtype) for g, o in
                                                                     zip(grad_outputs, outs)])
                 if names else ())
    expected_ran = [(op, backend, "forward")]
    expected_bwd = [(op, backend, "backward")] if names else []
    if ran != expected_ran or ran_bwd != expected_bwd:
        raise AssertionError(f"expected {op} to run on {backend}, but dispatch recorded {ran + ran_bwd}")

    if references:
        ref_outs, ref_grads, base_outs, base_grads = references["runs"]
    else:
        high = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in low.items()}
        high = _clone_inputs(high, torch.float64, grad_names)
        ref_outs, ref_grads = run_with_grads(lambda **kw: fn(backend="reference", **kw), high, grad_names,
                                             grad_outputs)
        base = _clone_inputs(low, dtype, grad_names)
        base_outs, base_grads = run_with_grads(lambda **kw: fn(backend="reference", **kw), base, grad_names,
                                               grad_outputs)
        if references is not None:
            references["runs"] = ref_outs, ref_grads, base_outs, base_grads

    fwd_tol, bwd_tol = (EXACT, EXACT) if exact else TOLERANCES[dtype]
    results = []
    for i, (o, r, b) in enumerate(zip(outs, ref_outs, base_outs)):
        results.append(compare(f"output[{i}]", o, r, fwd_tol, None if exact else b))
    for n, g in zip(names, grads):
        results.append(compare(f"d{n}", g, ref_grads[n], bwd_tol, None if exact else base_grads[n]))
    return results


def assert_parity(*args, **kwargs) -> List[Comparison]:
    """:func:`check_parity`, asserting every comparison passed."""
    results = check_parity(*args, **kwargs)
    bad = [str(r) for r in results if not r.ok]
    if bad:
        raise AssertionError(f"{kwargs.get('op')} on {kwargs.get('backend')} ({args[3]}): " + "; ".join(bad))
    return results


# --------------------------------------------------------------------------- #
# Small cases of every op, used by ``python -m semask_fast check``
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    name: str
    fn: Callable[..., Sequence[torch.Tensor]]
    tensors: Callable[[torch.Generator], Dict[str, Optional[torch.Tensor]]]
    grad_names: Tuple[str, ...]
    exact: bool = False


def _randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * std


def small_cases() -> List[Case]:
    """One or two small, representative inputs per op (fast enough for an interpreter)."""
    from . import ops

    def wa(backend, **t):
        return ops.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=(4, 4), shift_size=2,
                                    grid=(2, 2), backend=backend)

    def wa_mask(backend, **t):
        return ops.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=(3, 5), mask=t["mask"],
                                    backend=backend)

    def part(backend, **t):
        return ops.window_partition(t["x"], 4, 2, True, backend=backend)

    def merge(backend, **t):
        return ops.window_merge(t["windows"], 4, 2, 7, 6, False, backend=backend)

    def swa(backend, **t):
        return ops.shifted_window_attention(t["qkv"], t["bias_table"], num_heads=2, window_size=4, shift_size=2,
                                            qkv_bias=t["qkv_bias"], backend=backend)

    def sem(backend, **t):
        return ops.semantic_attention(t["sq"], t["sk"], t["yv"], backend=backend)

    def atm(backend, **t):
        return ops.atm_attention(t["q"], t["k"], t["v"], backend=backend)

    def msim(backend, **t):
        return ops.mask_similarity(t["patches"], t["classes"], norm=True, norm_weight=t["w"], norm_bias=t["b"],
                                   backend=backend)

    def mask_tensor(g):
        return torch.where(torch.rand(2, 15, 15, generator=g) < 0.3, -100.0, 0.0).double()

    return [
        Case("window_attention", "8 windows 4x4, h=2, d=16, shift 2", wa,
             lambda g: dict(q=_randn(g, 8, 2, 16, 16), k=_randn(g, 8, 2, 16, 16), v=_randn(g, 8, 2, 16, 16),
                            bias_table=_randn(g, 49, 2)), ("q", "k", "v", "bias_table")),
        Case("window_attention", "4 windows 3x5, h=1, d=32, explicit mask", wa_mask,
             lambda g: dict(q=_randn(g, 4, 1, 15, 32), k=_randn(g, 4, 1, 15, 32), v=_randn(g, 4, 1, 15, 32),
                            bias_table=_randn(g, 45, 1), mask=mask_tensor(g)), ("q", "k", "v", "bias_table")),
        Case("window_partition", "2x7x6x8, window 4, shift 2, pad then roll", part,
             lambda g: dict(x=_randn(g, 2, 7, 6, 8)), ("x",), exact=True),
        Case("window_merge", "8 windows 4x4 -> 2x7x6x8, roll then pad", merge,
             lambda g: dict(windows=_randn(g, 8, 4, 4, 8)), ("windows",), exact=True),
        Case("shifted_window_attention", "1x7x6, h=2, d=16, window 4, shift 2", swa,
             lambda g: dict(qkv=_randn(g, 1, 7, 6, 96), bias_table=_randn(g, 49, 2), qkv_bias=_randn(g, 96)),
             ("qkv", "bias_table", "qkv_bias")),
        Case("semantic_attention", "6 windows N=16, K=19, C=24", sem,
             lambda g: dict(sq=_randn(g, 6, 16, 19, std=0.3), sk=_randn(g, 6, 16, 19, std=0.3),
                            yv=_randn(g, 6, 16, 24)), ("sq", "sk", "yv")),
        Case("atm_attention", "B=2, h=2, Nq=19, Nk=40, d=16", atm,
             lambda g: dict(q=_randn(g, 2, 2, 19, 16), k=_randn(g, 2, 2, 40, 16), v=_randn(g, 2, 2, 40, 16)),
             ("q", "k", "v")),
        Case("mask_similarity", "B=2, Np=30, K=19, D=32, with mask_norm", msim,
             lambda g: dict(patches=_randn(g, 2, 30, 32), classes=_randn(g, 2, 19, 32), w=1 + _randn(g, 19, std=0.1),
                            b=_randn(g, 19, std=0.1)), ("patches", "classes", "w", "b")),
    ]


# ------------------------------------------------------------- dropout replay --
# Every kernel backend (cpu, cuda, simt) keeps a dropout element when the Philox hash of its
# row-major index clears p (csrc/include/sf_dropout.cuh, csrc/cpu/sf_cpu.h); the tests replay it on
# the host, bit for bit, to run the reference with the same mask.
def philox(seed: int, index: np.ndarray) -> np.ndarray:
    """The kernels' dropout hash, bit for bit: first word of Philox-4x32-10 with key ``seed``
    and counter ``(index lo, index hi, 0, 0)``; ``index`` an integer array, uint32 result."""
    m0, m1, w0, w1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), 0x9E3779B9, 0xBB67AE85
    lo32 = np.uint64(0xFFFFFFFF)
    index = np.asarray(index, dtype=np.uint64)
    c0, c1 = index & lo32, index >> np.uint64(32)
    c2 = c3 = np.zeros_like(index)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # < 2**64: exact in uint64
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & lo32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & lo32)
        k0, k1 = (k0 + w0) & 0xFFFFFFFF, (k1 + w1) & 0xFFFFFFFF
    return c0.astype(np.uint32)


def dropout_keep(seed: int, shape, p: float) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` = (..., rows, cols) that the kernels apply for ``seed``:
    element index = row-major position in ``shape``; kept when (hash >> 8) / 2**24 >= p
    (fp32 compare, as on the device).  Replays a kernel's dropout in the reference."""
    n = int(np.prod(shape))
    u = (philox(seed, np.arange(n, dtype=np.uint64)) >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    return torch.from_numpy(u >= np.float32(p)).reshape(tuple(shape))
