"""Parity of the Triton launchers (semask_fast.kernels) called directly, with explicit plans.

Helpers of the "triton launchers" sections of tests/ops/test_<op>.py: most op tests reach the
kernels through the dispatcher with the default plans; those call a launcher with a chosen plan
and compare its outputs and gradients with the float64 reference, by the rules and tolerances
of ``semask_fast.testing``.
"""

from typing import Callable, Dict, Sequence

import pytest
import torch

from semask_fast import reference
from semask_fast.testing import TOLERANCES, compare
from tests.conftest import require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def kernels(module: str):
    """The kernel module, when the triton backend can run here (interpreter on CPU)."""
    require_backend("window_attention", "triton")
    import importlib

    return importlib.import_module(f"semask_fast.kernels.{module}")


def rounded(tensors: Dict[str, torch.Tensor], dtype) -> Dict[str, torch.Tensor]:
    return {n: t.to(dtype) for n, t in tensors.items()}


def grad_outputs_like(outs: Sequence[torch.Tensor], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]


def assert_matches_reference(outs: Sequence[torch.Tensor], grads: Dict[str, torch.Tensor],
                             reference: Callable[..., Sequence[torch.Tensor]], inputs: Dict[str, torch.Tensor],
                             grad_outputs: Sequence[torch.Tensor]) -> None:
    """``outs`` and ``grads`` (of <outs, grad_outputs> wrt the named ``inputs``, which hold the values the
    kernels saw) against ``reference(**inputs)`` in float64, with torch's own error in the inputs' dtype
    as the baseline (see ``semask_fast.testing``)."""
    dtype = next(iter(inputs.values())).dtype
    fwd_tol, bwd_tol = TOLERANCES[dtype]
    results = {}
    for precision in (torch.float64, dtype):
        leaves = {n: t.detach().to(precision).requires_grad_(n in grads) for n, t in inputs.items()}
        ref = reference(**leaves)
        ref = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
        ref_grads = torch.autograd.grad(ref, [leaves[n] for n in grads], [g.to(precision) for g in grad_outputs])
        results[precision] = (ref, dict(zip(grads, ref_grads)))
    (ref, ref_grads), (base, base_grads) = results[torch.float64], results[dtype]
    bad = [compare(f"output[{i}]", o, r, fwd_tol, b) for i, (o, r, b) in enumerate(zip(outs, ref, base))]
    bad += [compare(f"d{n}", g, ref_grads[n], bwd_tol, base_grads[n]) for n, g in grads.items()]
    bad = [str(c) for c in bad if not c.ok]
    assert not bad, f"{dtype}: " + "; ".join(bad)


def ids(dtypes=DTYPES):
    return pytest.mark.parametrize("dtype", dtypes, ids=lambda d: str(d).replace("torch.", ""))


def window_inputs(b_, h, ws, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = ws[0] * ws[1]
    t = {name: torch.randn(b_, h, n, d, generator=g, dtype=torch.float64) for name in ("q", "k", "v")}
    t["bias_table"] = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), h, generator=g, dtype=torch.float64)
    return t


def run_window(k, t, ws, shift, grid, fwd_plan=None, bwd_plan=None, **kw):
    """Forward and backward through the window-layout launchers; checked against the reference."""
    b_, h, n, d = t["q"].shape
    geo = k.Geometry(ws, b_, h, d, grid=grid, shift=shift)
    scale = kw.pop("scale", d ** -0.5)
    out, lse = k.window_attention_forward(t["q"], t["k"], t["v"], geo, t["bias_table"], scale=scale, plan=fwd_plan,
                                          **kw)
    (gout,) = grad_outputs_like([out])
    dq, dk, dv, d_table = k.window_attention_backward(t["q"], t["k"], t["v"], out, gout, lse, geo, t["bias_table"],
                                                      scale=scale, plan=bwd_plan, **kw)

    def ref(q, k, v, bias_table):
        return reference.window_attention(q, k, v, bias_table, window_size=ws, shift_size=shift, grid=grid,
                                          scale=scale, **kw)

    assert_matches_reference([out], dict(q=dq, k=dk, v=dv, bias_table=d_table), ref, t, [gout])
    return out, lse, d_table


def semantic_inputs(B, N, K, C, logit_scale=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(sq=torch.randn(B, N, K, generator=g, dtype=torch.float64) * logit_scale,
                sk=torch.randn(B, N, K, generator=g, dtype=torch.float64) * logit_scale,
                yv=torch.randn(B, N, C, generator=g, dtype=torch.float64))


def run_semantic(k, t, fwd_plan=None, bwd_plan=None):
    out, lse = k.semantic_attention_forward(t["sq"], t["sk"], t["yv"], plan=fwd_plan)
    (gout,) = grad_outputs_like([out])
    dsq, dsk, dyv = k.semantic_attention_backward(t["sq"], t["sk"], t["yv"], out, lse, gout, plan=bwd_plan)
    assert_matches_reference([out], dict(sq=dsq, sk=dsk, yv=dyv), reference.semantic_attention, t, [gout])


def atm_inputs(B, H, NQ, NK, D, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, H, rows, D, generator=g, dtype=torch.float64) * scale
            for n, rows in (("q", NQ), ("k", NK), ("v", NK))}


def run_atm(k, t, scale, fwd_plan=None, bwd_plan=None, dropout_p=0.0, seed=0, keep=None):
    out, mask_logits, lse = k.atm_attention_forward(t["q"], t["k"], t["v"], scale=scale, dropout_p=dropout_p,
                                                    seed=seed, plan=fwd_plan)
    gout, gmask = grad_outputs_like([out, mask_logits])
    dq, dk, dv = k.atm_attention_backward(t["q"], t["k"], t["v"], out, lse, gout, gmask, scale=scale,
                                          dropout_p=dropout_p, seed=seed, plan=bwd_plan)

    def ref(q, k, v):
        return reference.atm_attention(q, k, v, scale=scale, dropout_p=dropout_p, dropout_keep=keep)

    assert_matches_reference([out, mask_logits], dict(q=dq, k=dk, v=dv), ref, t, [gout, gmask])
