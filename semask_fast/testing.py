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
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return Comparison(name, float("inf"), 0.0, None, False)
    err = (a - e).abs()
    bound = tol.atol + tol.rtol * e.abs()
    max_err = err.max().item() if err.numel() else 0.0
    allowed = tol.atol + tol.rtol * e.abs().max().item() if err.numel() else 0.0
    ok = bool((err <= bound).all())
    base_err = None
    if baseline is not None:
        base_err = (baseline.detach().double().cpu() - e).abs().max().item() if err.numel() else 0.0
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
        grads = dict(zip(names, gs))
    return outs, grads


def check_parity(fn: Callable[..., Sequence[torch.Tensor]], tensors: Dict[str, Optional[torch.Tensor]],
                 grad_names: Sequence[str], dtype: torch.dtype, *, backend: str, op: str,
                 exact: bool = False, seed: int = 0) -> List[Comparison]:
    """Run ``fn(backend=..., **tensors)`` in ``dtype`` and compare outputs and gradients with float64.

    ``tensors`` are the inputs at any precision: they are rounded to ``dtype``
    once, and the float64 reference starts from those rounded values.  Raises
    ``AssertionError`` if the backend that ran was not ``backend`` (forward and,
    when gradients are taken, backward).  Returns one :class:`Comparison` per
    output and gradient; the caller asserts (``assert_parity`` does both).
    """
    low = _clone_inputs(tensors, dtype, grad_names)
    with record_dispatch() as ran:
        outs = fn(backend=backend, **low)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    grad_outputs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
    names = [n for n in grad_names if low.get(n) is not None]
    with record_dispatch() as ran_bwd:
        grads = (torch.autograd.grad(outs, [low[n] for n in names], [g.to(o.dtype) for g, o in
                                                                     zip(grad_outputs, outs)])
                 if names else ())
    expected_ran = [(op, backend, "forward")]
    if backend == "reference" or not names:
        expected_bwd = []
    else:
        expected_bwd = [(op, backend, "backward")]
    if ran != expected_ran or ran_bwd != expected_bwd:
        raise AssertionError(f"expected {op} to run on {backend}, but dispatch recorded {ran + ran_bwd}")

    high = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in low.items()}
    high = _clone_inputs(high, torch.float64, grad_names)
    ref_outs, ref_grads = run_with_grads(lambda **kw: fn(backend="reference", **kw), high, grad_names,
                                         grad_outputs)
    base = _clone_inputs(low, dtype, grad_names)
    base_outs, base_grads = run_with_grads(lambda **kw: fn(backend="reference", **kw), base, grad_names,
                                           grad_outputs)

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
