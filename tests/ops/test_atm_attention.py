"""Parity of ``atm_attention`` (SegViT ATM cross-attention) on every kernel backend.

Both outputs (attention output and head-mean mask logits) and the gradients of
q, k, v (taken through both outputs) are compared with the float64 reference
through ``assert_parity``, which also asserts the requested backend ran forward
and backward.  Shapes: Nq = 150 class tokens over Nk = 400 spatial tokens,
h = 1 / 8 / 16, head_dim 16..128, odd sizes, batch 1.  Dropout: the Triton
kernels' Philox keep-mask is materialised for the seed and replayed in the
reference (outputs and gradients).

bf16 under Triton's interpreter: ``tl.dot`` is wrong on bf16 operands there
(triton issue 11584), so the kernels upcast the two dot operands to fp32 right
before each ``tl.dot`` (``DOT_FP32``).  bf16 loads, casts of P and dS to bf16
and bf16 stores are exercised; the bf16 tensor-core product itself is not.
"""

import pytest
import torch

import semask_fast
from semask_fast.testing import assert_parity
from tests.conftest import next_seed as _next_seed, require_backend

OP = "atm_attention"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, h, Nq, Nk, d)
SHAPES = [
    (1, 8, 150, 400, 32),   # SegViT class tokens over a 20x20 map, batch 1
    (2, 16, 19, 100, 32),   # h = 16 (ViT-L), Cityscapes classes
    (2, 1, 37, 81, 64),     # one head, odd sizes
    (1, 3, 21, 50, 128),    # largest head dim
    (1, 5, 9, 33, 16),      # smallest head dim, odd head count
]


def _inputs(B, H, NQ, NK, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, H, rows, D, generator=g, dtype=torch.float64).to(device)
            for n, rows in (("q", NQ), ("k", NK), ("v", NK))}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(kernel_backend, shape, dtype):
    device = require_backend(OP, kernel_backend)
    assert_parity(semask_fast.atm_attention, _inputs(*shape, device), ["q", "k", "v"], dtype,
                  backend=kernel_backend, op=OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_peaked_logits(kernel_backend, dtype):
    """Logits above 100 (exp overflows fp32 past 88.7): a softmax without the row maximum fails."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(2, 2, 19, 100, 32, device)
    t["q"], t["k"] = t["q"] * 6, t["k"] * 6
    assert ((t["q"] * 32 ** -0.5) @ t["k"].transpose(-2, -1)).max() > 100
    assert_parity(semask_fast.atm_attention, t, ["q", "k", "v"], dtype, backend=kernel_backend, op=OP)


def test_parity_custom_scale(kernel_backend):
    device = require_backend(OP, kernel_backend)
    fn = lambda backend, **t: semask_fast.atm_attention(**t, scale=0.3, backend=backend)  # noqa: E731
    assert_parity(fn, _inputs(2, 4, 30, 70, 32, device), ["q", "k", "v"], torch.float32, backend=kernel_backend,
                  op=OP)


def _keep_mask(backend, B, H, NQ, NK, p, device):
    """The keep-mask a backend's kernels apply for the seed drawn next from torch's generator."""
    seed = _next_seed(backend, OP, device)
    if backend == "triton":
        from semask_fast.kernels.atm_attention import dropout_keep_mask

        return dropout_keep_mask(seed, B, H, NQ, NK, p, device=device)
    from semask_fast.backends.cuda.window_attention import dropout_keep  # the GPU kernels' hash

    return dropout_keep(seed, (B, H, NQ, NK), p).to(device)


_DROPOUT_CASES = [("triton", torch.float32), ("triton", torch.float16), ("cpu", torch.float32),
                  ("cpu", torch.float64)]


@pytest.mark.parametrize("backend,dtype", _DROPOUT_CASES,
                         ids=[f"{b}-{str(d).replace('torch.', '')}" for b, d in _DROPOUT_CASES])
def test_dropout_replay(backend, dtype):
    """Forward and backward dropout equal the reference with the kernels' keep-mask for the seed."""
    device = require_backend(OP, backend)
    from semask_fast import reference
    from semask_fast.testing import TOLERANCES

    B, H, NQ, NK, D, p = 2, 3, 40, 90, 32, 0.1
    t = {n: x.to(dtype).requires_grad_() for n, x in _inputs(B, H, NQ, NK, D, device).items()}
    torch.manual_seed(7)
    with semask_fast.record_dispatch() as ran:
        out, mask_logits = semask_fast.atm_attention(t["q"], t["k"], t["v"], dropout_p=p, backend=backend)
        gout, gmask = torch.randn_like(out), torch.randn_like(mask_logits)
        torch.autograd.backward([out, mask_logits], [gout, gmask])
    assert ran == [(OP, backend, "forward"), (OP, backend, "backward")]
    torch.manual_seed(7)
    keep = _keep_mask(backend, B, H, NQ, NK, p, device)
    assert 0.85 < keep.float().mean().item() < 0.95  # about 1 - p kept

    r = {n: x.detach().double().requires_grad_() for n, x in t.items()}
    r_out, r_mask = reference.atm_attention(r["q"], r["k"], r["v"], dropout_p=p, dropout_keep=keep)
    torch.autograd.backward([r_out, r_mask], [gout.double(), gmask.double()])
    tol = TOLERANCES[dtype][1]
    tol = dict(atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(out.double(), r_out, **tol)
    torch.testing.assert_close(mask_logits.double(), r_mask, **tol)
    for n in t:
        torch.testing.assert_close(t[n].grad.double(), r[n].grad, **tol)
    # Without the keep-mask the reference differs: the test can fail.
    assert not torch.allclose(out.double(), reference.atm_attention(r["q"], r["k"], r["v"])[0], atol=1e-2)


def test_triton_dropout_seed_changes_mask():
    require_backend(OP, "triton")
    from semask_fast.kernels.atm_attention import dropout_keep_mask

    a, b = dropout_keep_mask(1, 1, 2, 20, 30, 0.5), dropout_keep_mask(2, 1, 2, 20, 30, 0.5)
    assert not torch.equal(a, b)
    assert torch.equal(a, dropout_keep_mask(1, 1, 2, 20, 30, 0.5))


@pytest.mark.parametrize("d", [8, 256])
def test_triton_rejects_head_dim(d):
    t = _inputs(1, 2, 4, 8, d, require_backend(OP, "triton"))
    with pytest.raises(ValueError, match=f"head_dim={d}"):
        semask_fast.atm_attention(t["q"].float(), t["k"].float(), t["v"].float(), backend="triton")


# ------------------------------------------------------------------ cpu backend --
def _cpu_fn(dropout_p=0.0, seed=None):
    def fn(q, k, v):
        if seed is not None:
            torch.manual_seed(seed)  # the same dropout seed on every call
        return semask_fast.atm_attention(q, k, v, dropout_p=dropout_p, backend="cpu")
    return fn


@pytest.mark.parametrize("shape,dropout_p", [((1, 2, 5, 70, 16), 0.0), ((2, 3, 4, 9, 16), 0.0),
                                             ((1, 2, 3, 70, 16), 0.3)],
                         ids=["two-key-blocks", "batch2", "dropout"])
def test_cpu_gradcheck(shape, dropout_p):
    """float64 gradcheck of both outputs on the cpu kernels (dropout with a fixed seed: the same mask
    in every evaluation); past a thousand inputs in fast mode (random directions)."""
    require_backend(OP, "cpu")
    t = {n: x.requires_grad_() for n, x in _inputs(*shape, "cpu").items()}
    fn = _cpu_fn(dropout_p, seed=3 if dropout_p else None)
    fast = sum(x.numel() for x in t.values()) > 1000
    with semask_fast.record_dispatch() as ran:
        assert torch.autograd.gradcheck(fn, (t["q"], t["k"], t["v"]), fast_mode=fast)
    assert ("atm_attention", "cpu", "forward") in ran and ("atm_attention", "cpu", "backward") in ran
    assert {b for _, b, _ in ran} == {"cpu"}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_odd_head_dim(dtype):
    """head_dim 20: zero padded to 32 for the kernels, sliced back."""
    device = require_backend(OP, "cpu")
    assert_parity(semask_fast.atm_attention, _inputs(2, 3, 30, 70, 20, device), ["q", "k", "v"], dtype,
                  backend="cpu", op=OP)


def test_cpu_thread_count_invariant():
    """Outputs and gradients are bitwise the same on 1 and 2 threads (the forward splits the class tokens
    of the one batch item over 2 threads; dQ partials are added in range order)."""
    require_backend(OP, "cpu")
    t = _inputs(1, 4, 150, 300, 32, "cpu")
    g = torch.Generator().manual_seed(1)
    gout, gmask = torch.randn(1, 4, 150, 32, generator=g), torch.randn(1, 150, 300, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = {k: v.float().requires_grad_() for k, v in t.items()}
            torch.manual_seed(5)
            out, mask_logits = semask_fast.atm_attention(x["q"], x["k"], x["v"], dropout_p=0.1, backend="cpu")
            torch.autograd.backward([out, mask_logits], [gout, gmask])
            results.append([out.detach(), mask_logits.detach()] + [x[k].grad for k in ("q", "k", "v")])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
