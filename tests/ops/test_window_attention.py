"""Parity of ``window_attention`` (Swin W-MSA / SW-MSA) on every kernel backend.

The output and every gradient (dq, dk, dv, d(bias_table)) are compared with the
float64 reference through ``assert_parity``, which also asserts that the
requested backend ran forward and backward.  The shape matrix covers N = 49 and
144 (one tile and the online-softmax key loop), non-square windows, shift on and
off (mask computed in the kernel), an explicit (nW, N, N) mask, head_dim
16/20/32/48/64/128, batch 1 and odd batches, in fp32, fp16 and bf16.

bf16 under Triton's interpreter: ``tl.dot`` is wrong on bf16 operands there
(triton issue 11584), so the kernels upcast the two dot operands to fp32 right
before each ``tl.dot`` (``DOT_FP32``).  bf16 loads, the casts of P and dS to
bf16, and bf16 stores are exercised; the bf16 tensor-core product itself is not
(it is on a GPU, where ``DOT_FP32`` is always False).

Tests at the end are Triton-specific (dropout replay, determinism of the table
gradient); the launchers' plans (tiles, windows per program) are tested in
``tests/kernels``.

Tile size under the interpreter: the kernels' multi-tile paths run with 32-token
tiles (interpreter cost is per tile operation); GPUs use 16-token tiles with the
same kernel code, which ``tests/kernels/test_triton_plans.py`` runs here too.
"""

import functools

import pytest
import torch

import semask_fast
from semask_fast import reference
from semask_fast.backends.base import record_dispatch
from semask_fast.backends.registry import BackendNotSupportedError
from semask_fast.testing import GRADCHECK, assert_close, assert_parity
from tests.conftest import next_seed as _next_seed, require_backend

OP = "window_attention"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRADS = ["q", "k", "v", "bias_table"]

# (B*nW, heads, window, head_dim, shift, grid, explicit-mask nW)
SHAPES = {
    "swin-t-sw-msa": (4, 1, (7, 7), 32, (3, 3), (2, 2), None),
    "batch1-d16": (1, 1, (7, 7), 16, (0, 0), None, None),
    "ws12-n144": (1, 1, (12, 12), 32, (6, 6), (1, 1), None),
    "nonsquare-odd-batch-d48": (9, 1, (3, 5), 48, (1, 2), (3, 1), None),
    "explicit-mask-d64": (4, 1, (7, 7), 64, (0, 0), None, 2),
    "d128-batch3": (3, 1, (4, 4), 128, (0, 0), None, None),
    "tiny-d20-shift-one-axis": (6, 3, (2, 3), 20, (0, 1), (1, 2), None),
}


def _inputs(b_, h, ws, d, mask_nw, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = ws[0] * ws[1]
    t = {name: torch.randn(b_, h, n, d, generator=g, dtype=torch.float64) for name in ("q", "k", "v")}
    t["bias_table"] = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), h, generator=g, dtype=torch.float64)
    if mask_nw:
        # Swin-like: 0 or -100 per pair, never a whole row masked.
        m = torch.where(torch.rand(mask_nw, n, n, generator=g) < 0.3, -100.0, 0.0).double()
        t["mask"] = m * (1 - torch.eye(n, dtype=torch.float64))
    return {k: v.to(device) for k, v in t.items()}


def _fn(ws, shift, grid, **kw):
    return functools.partial(semask_fast.window_attention, window_size=ws, shift_size=shift, grid=grid, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(SHAPES))
def test_parity(kernel_backend, name, dtype):
    device = require_backend(OP, kernel_backend)
    b_, h, ws, d, shift, grid, mask_nw = SHAPES[name]
    assert_parity(_fn(ws, shift, grid), _inputs(b_, h, ws, d, mask_nw, device), GRADS, dtype,
                  backend=kernel_backend, op=OP)


def test_no_bias_table_custom_scale_mask_value(kernel_backend):
    """No table (only q, k, v grads), qk_scale override and a non-default mask value."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(4, 1, (7, 7), 32, None, device)
    del t["bias_table"]
    assert_parity(_fn((7, 7), (3, 3), (2, 2), scale=0.3, mask_value=-1e4), t, ["q", "k", "v"], torch.float32,
                  backend=kernel_backend, op=OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_mild_shift_mask_value(kernel_backend, dtype):
    """A mask value that does not saturate the softmax (-1.5): a kernel that ignores mask_value
    (and applies -100) is caught; -100 and -1e4 both zero the masked probabilities."""
    device = require_backend(OP, kernel_backend)
    assert_parity(_fn((7, 7), (3, 3), (2, 2), mask_value=-1.5), _inputs(4, 1, (7, 7), 32, None, device), GRADS,
                  dtype, backend=kernel_backend, op=OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("ws,shift,grid", [((7, 7), (3, 3), (1, 2)), ((12, 12), (6, 6), (1, 1))],
                         ids=["n49-one-tile", "n144-key-loop"])
def test_peaked_logits(kernel_backend, ws, shift, grid, dtype):
    """Logits near 120 (exp overflows fp32 past 88.7): a softmax that forgets to subtract the row
    maximum fails, in the one-tile path and in the online key loop, in every dtype."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(grid[0] * grid[1], 1, ws, 32, None, device)
    t["q"], t["k"] = t["q"] * 5.5, t["k"] * 5.5
    logits = (t["q"] * 32 ** -0.5) @ t["k"].transpose(-2, -1)
    assert logits.max() > 100
    assert_parity(_fn(ws, shift, grid), t, GRADS, dtype, backend=kernel_backend, op=OP)


def test_fp32_table_with_half_inputs(kernel_backend):
    """An fp32 bias table with fp16 q, k, v (autocast-style mixed inputs)."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(4, 1, (7, 7), 32, None, device)
    t = {k: v.half() for k, v in t.items()}
    t["bias_table"] = t["bias_table"].float()

    def fn(backend, q, k, v, bias_table):
        return semask_fast.window_attention(q, k, v, bias_table.float(), window_size=7, shift_size=3, grid=(2, 2),
                                            backend=backend)

    # _clone_inputs casts every input to the test dtype, so cast the table back in fn.
    assert_parity(fn, t, GRADS, torch.float16, backend=kernel_backend, op=OP)


def test_strided_qkv(kernel_backend):
    """q, k, v as timm makes them: permuted views of one qkv tensor (non-contiguous)."""
    device = require_backend(OP, kernel_backend)
    b_, h, n, d = 2, 2, 49, 32
    qkv = torch.randn(b_, n, 3, h, d, dtype=torch.float64, device=device)
    bias = torch.randn(169, h, dtype=torch.float64, device=device)

    def fn(backend, qkv, bias_table):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return semask_fast.window_attention(q, k, v, bias_table, window_size=7, shift_size=3, grid=(1, 2),
                                            backend=backend)

    assert_parity(fn, {"qkv": qkv, "bias_table": bias}, ["qkv", "bias_table"], torch.float32,
                  backend=kernel_backend, op=OP)


# --------------------------------------------------------------------------- #
# Triton-specific
# --------------------------------------------------------------------------- #


def _triton():
    require_backend(OP, "triton")
    from semask_fast.kernels import window_attention as k

    return k


def _reference_logits(q, k, table, ws, shift, grid, scale):
    attn = (q * scale) @ k.transpose(-2, -1)
    n = q.shape[2]
    idx = reference.relative_position_index(ws)
    attn = attn + table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1)
    if any(shift):
        m = reference.shift_mask(grid, ws, shift, dtype=attn.dtype)
        attn = (attn.view(-1, m.shape[0], *attn.shape[1:]) + m[None, :, None]).view(attn.shape)
    return attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_triton_dropout_replay(dtype):
    """The kernel's keep-mask, materialised for the same seed, reproduces forward and every gradient."""
    k = _triton()
    device = require_backend(OP, "triton")
    p = 0.3
    t = {n: v.to(dtype).requires_grad_() for n, v in _inputs(4, 2, (7, 7), 16, None, device).items()}
    torch.manual_seed(123)
    seed = _next_seed("triton", device=device)
    keep = k.dropout_keep_mask(seed, 4, 2, 49, p, device=device)
    assert 0.6 < keep.float().mean().item() < 0.8
    torch.manual_seed(123)
    with record_dispatch() as ran:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(2, 2), dropout_p=p, backend="triton")
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t[n] for n in GRADS], gout)
    assert ran == [(OP, "triton", "forward"), (OP, "triton", "backward")]
    ref_in = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    ref = reference.window_attention(ref_in["q"], ref_in["k"], ref_in["v"], ref_in["bias_table"], window_size=(7, 7),
                                     shift_size=(3, 3), grid=(2, 2), dropout_p=p, dropout_keep=keep)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in GRADS], gout.double())
    assert_close(out, ref, dtype, what="out")
    for name, g, r in zip(GRADS, grads, ref_grads):
        assert_close(g, r, dtype, backward=True, what=f"d{name}")


@pytest.mark.parametrize("ws,grid", [((7, 7), (2, 3)), ((12, 12), (1, 2))], ids=["n49", "n144"])
def test_triton_table_grad_deterministic(ws, grid):
    """Two backward runs give a bitwise-identical table gradient (no atomics)."""
    device = require_backend(OP, "triton")
    t = {n: v.float() for n, v in _inputs(grid[0] * grid[1], 1, ws, 16, None, device).items()}
    table_grads = []
    for _ in range(2):
        table = t["bias_table"].clone().requires_grad_()
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], table, window_size=ws, shift_size=ws[0] // 2,
                                           grid=grid, backend="triton")
        out.backward(torch.ones_like(out))
        table_grads.append(table.grad)
    assert torch.equal(table_grads[0], table_grads[1])


def test_triton_reasons_head_dim():
    """Unsupported-but-valid inputs give a readable reason; forcing the backend raises it."""
    _triton()
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(BackendNotSupportedError, match="head_dim=256"):
        semask_fast.window_attention(q, q, q, window_size=2, backend="triton")


# --------------------------------------------------------------------------- #
# cpu-specific (the native C++ kernels of csrc/cpu/window_attention.cpp)
# --------------------------------------------------------------------------- #

# (B*nW, heads, window, head_dim, shift, grid, explicit-mask nW): small, every logit path, head dims
# that fill no vector (5) and two vectors (32).
CPU_GRADCHECK_SHAPES = {
    "shift-table": (4, 2, (3, 3), 5, (1, 1), (2, 2), None),
    "explicit-mask-nonsquare": (4, 1, (2, 3), 8, (0, 0), None, 2),
    "no-shift-d32": (2, 1, (2, 2), 32, (0, 0), None, None),
}


@pytest.mark.parametrize("name", list(CPU_GRADCHECK_SHAPES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_cpu_gradcheck_float64(name, dropout_p):
    """torch.autograd.gradcheck on the kernels themselves (fp64): output and every gradient, with
    dropout too (the seed is fixed per call, so the kernel is one function of its inputs)."""
    require_backend(OP, "cpu")
    b_, h, ws, d, shift, grid, mask_nw = CPU_GRADCHECK_SHAPES[name]
    t = _inputs(b_, h, ws, d, mask_nw, "cpu")
    mask = t.pop("mask", None)
    inputs = tuple(t[n].requires_grad_() for n in GRADS)

    def fn(q, k, v, table):
        torch.manual_seed(0)
        return semask_fast.window_attention(q, k, v, table, window_size=ws, shift_size=shift, grid=grid, mask=mask,
                                            dropout_p=dropout_p, backend="cpu")

    with record_dispatch() as ran:
        assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)
    assert (OP, "cpu", "forward") in ran and (OP, "cpu", "backward") in ran
    assert {b for _, b, _ in ran} == {"cpu"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
def test_cpu_dropout_replay(dtype):
    """The kernels' keep-mask (the GPU kernels' Philox hash, replayed in numpy) reproduces the
    forward and every gradient in the reference."""
    require_backend(OP, "cpu")
    from semask_fast.backends.cuda.window_attention import dropout_keep

    p, b_, h = 0.3, 4, 2
    t = {n: v.to(dtype).requires_grad_() for n, v in _inputs(b_, h, (7, 7), 16, None, "cpu").items()}
    torch.manual_seed(123)
    keep = dropout_keep(_next_seed("cpu"), (b_, h, 49, 49), p)
    assert 0.6 < keep.float().mean().item() < 0.8
    torch.manual_seed(123)
    with record_dispatch() as ran:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(2, 2), dropout_p=p, backend="cpu")
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t[n] for n in GRADS], gout)
    assert ran == [(OP, "cpu", "forward"), (OP, "cpu", "backward")]
    r = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    ref = reference.window_attention(r["q"], r["k"], r["v"], r["bias_table"], window_size=(7, 7), shift_size=(3, 3),
                                     grid=(2, 2), dropout_p=p, dropout_keep=keep)
    ref_grads = torch.autograd.grad(ref, [r[n] for n in GRADS], gout.double())
    from semask_fast.testing import TOLERANCES

    tol = TOLERANCES[dtype][1]
    torch.testing.assert_close(out.double(), ref, atol=tol.atol, rtol=tol.rtol)
    for name, g, rg in zip(GRADS, grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"d{name}: {m}")


def _cpu_fwd_bwd(t, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
        out = semask_fast.window_attention(x["q"], x["k"], x["v"], x["bias_table"], window_size=7, shift_size=3,
                                           grid=(3, 3), backend="cpu")
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        return [out] + [x[n].grad for n in GRADS]
    finally:
        torch.set_num_threads(previous)


def test_cpu_bitwise_independent_of_thread_count():
    """Every output and gradient (the table's, summed over windows, included) is bitwise the same
    with one thread and with two: the reduction order is fixed by the shape."""
    require_backend(OP, "cpu")
    t = {n: v.float() for n, v in _inputs(18, 3, (7, 7), 32, None, "cpu").items()}
    one, two = _cpu_fwd_bwd(t, 1), _cpu_fwd_bwd(t, 2)
    for name, a, b in zip(["out"] + GRADS, one, two):
        assert torch.equal(a, b), name


def test_cpu_is_picked_automatically_for_cpu_tensors():
    require_backend(OP, "cpu")
    t = {n: v.float().requires_grad_() for n, v in _inputs(4, 2, (7, 7), 32, None, "cpu").items()}
    with record_dispatch() as ran:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(2, 2))
        out.sum().backward()
    assert ran == [(OP, "cpu", "forward"), (OP, "cpu", "backward")]


def test_cpu_allocates_nothing_quadratic():
    """No (B*nW, h, N, N) tensor in forward or backward: the largest allocation the profiler sees
    is the size of q (the outputs, gradients and saved tensors), far below one logit per pair."""
    require_backend(OP, "cpu")
    b_, h, n, d = 64, 3, 49, 16
    t = {k: v.float().requires_grad_() for k, v in _inputs(b_, h, (7, 7), d, None, "cpu").items()}
    semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                 grid=(8, 8), backend="cpu").sum().backward()  # build and warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(8, 8), backend="cpu")
        out.sum().backward()
    # Every allocation goes through aten::empty / empty_strided (in the kernels' bindings too).
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name in ("aten::empty", "aten::empty_strided")]
    assert sizes, "the profiler recorded no allocation"
    assert max(sizes) <= b_ * h * n * d * 4
    assert max(sizes) < b_ * h * n * n * 4 // 2


def test_cpu_reasons_window_tokens():
    require_backend(OP, "cpu")
    from semask_fast.backends.cpu.window_attention import MAX_WINDOW_TOKENS

    q = torch.randn(1, 1, (MAX_WINDOW_TOKENS // 32 + 1) * 32, 4)
    with pytest.raises(BackendNotSupportedError, match="window of N="):
        semask_fast.window_attention(q, q, q, window_size=(MAX_WINDOW_TOKENS // 32 + 1, 32), backend="cpu")
