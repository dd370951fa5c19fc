"""Every test of the zero-copy ``shifted_window_attention``, one section per backend.

The op reads q, k, v from the (B, H, W, 3*h*d) qkv image and writes (B, H, W, h*d);
the reference is the copy-based composition (pad/roll, partition, window attention
with the shift mask, merge, un-roll/crop).  Output and gradients d(qkv),
d(bias_table) and, when the image is padded, d(qkv_bias) (pad tokens carry the
qkv bias) go through ``assert_parity``.  Matrix: both orders of pad and roll,
H != W with padding, shift on/off/one axis, non-square windows, N = 49 and 144,
batch 1 and odd batches, fp32/fp16/bf16; dropout replay (triton, cpu) and timm's Swin blocks
patched.  Then the Triton launchers (``shifted_window_attention_forward`` / ``_backward``) called
directly with explicit plans (helpers: ``tests/kernels/_launch_parity.py``): the GPU tiles, and
adversarial inputs on a padded image (a mild mask value -1.5 and a head with peaked logits ~120,
built as in tests/ops/test_window_attention.py: q = k = 3.9 z, head_dim 64); then the cpu
kernels (gradcheck, thread-count independence).

bf16 under Triton's interpreter: the two ``tl.dot`` operands are upcast to fp32
(``DOT_FP32``, triton issue 11584); bf16 loads, casts and stores are exercised,
the bf16 tensor-core product is not.

Tile size under the interpreter: the kernels' multi-tile paths run with 32-token
tiles (interpreter cost is per tile operation); GPUs use 16-token tiles with the
same kernel code, which the launcher tests run here too (``interpreter=False`` plans).
"""

import functools

import pytest
import torch

import semask_fast
from semask_fast import reference
from semask_fast.backends.base import record_dispatch
from semask_fast.testing import GRADCHECK, assert_close, assert_parity
from tests.conftest import next_seed as _next_seed, require_backend
from tests.kernels._launch_parity import assert_matches_reference, grad_outputs_like, ids, kernels, rounded

OP = "shifted_window_attention"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, W, heads, head_dim, window, shift, pad_then_roll)
SHAPES = {
    "swin-t-no-pad": (1, 14, 14, 2, 16, (7, 7), (3, 3), True),
    "pad-then-roll-h-ne-w-odd-batch": (3, 10, 13, 1, 16, (7, 7), (3, 3), True),
    "roll-then-pad-h-ne-w": (1, 10, 13, 2, 16, (7, 7), (3, 3), False),
    "no-shift-pad": (1, 9, 12, 1, 32, (7, 7), (0, 0), True),
    "nonsquare-shift-one-axis": (1, 9, 20, 1, 32, (4, 6), (0, 2), False),
    "ws12-n144": (1, 12, 12, 1, 16, (12, 12), (6, 6), True),
}


def _inputs(b, H, W, h, d, ws, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"qkv": torch.randn(b, H, W, 3 * h * d, generator=g, dtype=torch.float64),
         "bias_table": torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), h, generator=g, dtype=torch.float64)}
    if H % ws[0] or W % ws[1]:
        # Only a padded image uses the qkv bias (the reference's gradient is None otherwise).
        t["qkv_bias"] = torch.randn(3 * h * d, generator=g, dtype=torch.float64)
    return {k: v.to(device) for k, v in t.items()}


def _fn(h, ws, shift, pad_then_roll):
    return functools.partial(semask_fast.shifted_window_attention, num_heads=h, window_size=ws, shift_size=shift,
                             pad_then_roll=pad_then_roll)


# --------------------------------------------------------------------------- #
# every backend
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(SHAPES))
def test_parity(kernel_backend, name, dtype):
    device = require_backend(OP, kernel_backend)
    b, H, W, h, d, ws, shift, order = SHAPES[name]
    t = _inputs(b, H, W, h, d, ws, device)
    assert_parity(_fn(h, ws, shift, order), t, list(t), dtype, backend=kernel_backend, op=OP)


def test_infinite_mask_value(kernel_backend):
    """mask_value=-inf (every token sees its own region): finite, as the reference."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(1, 10, 13, 1, 16, (7, 7), device)
    fn = functools.partial(_fn(1, (7, 7), (3, 3), True), mask_value=float("-inf"))
    assert_parity(fn, t, list(t), torch.float32, backend=kernel_backend, op=OP)


def test_no_pad_qkv_bias_gradient_is_zero(kernel_backend):
    """Without padding the qkv bias takes no part: its gradient is zero (or None)."""
    device = require_backend(OP, kernel_backend)
    qkv = torch.randn(1, 14, 14, 96, device=device, requires_grad=True)
    qb = torch.randn(96, device=device, requires_grad=True)
    out = semask_fast.shifted_window_attention(qkv, None, qkv_bias=qb, num_heads=2, window_size=7, shift_size=3,
                                               backend=kernel_backend)
    (g,) = torch.autograd.grad(out.sum(), [qb], allow_unused=True)
    assert g is None or not g.any()


def _keep_mask(backend, windows, h, n, p, device):
    """The keep-mask a backend's kernels apply for the seed drawn next from torch's generator."""
    seed = _next_seed(backend, OP, device)
    if backend == "triton":
        from semask_fast.kernels import window_attention as k

        return k.dropout_keep_mask(seed, windows, h, n, p, device=device)
    from semask_fast.testing import dropout_keep  # the kernels' Philox hash

    return dropout_keep(seed, (windows, h, n, n), p).to(device)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_dropout_replay(backend):
    """Image layout: the keep-mask is keyed by (window, head, i, j) as in the window layout."""
    device = require_backend(OP, backend)
    b, H, W, h, d, ws, p = 2, 10, 13, 2, 16, (7, 7), 0.25
    t = {n: v.float().requires_grad_() for n, v in _inputs(b, H, W, h, d, ws, device).items()}
    torch.manual_seed(7)
    keep = _keep_mask(backend, b * 4, h, 49, p, device)
    torch.manual_seed(7)
    with record_dispatch() as ran:
        out = semask_fast.shifted_window_attention(t["qkv"], t["bias_table"], qkv_bias=t["qkv_bias"], num_heads=h,
                                                   window_size=ws, shift_size=3, dropout_p=p, backend=backend)
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, list(t.values()), gout)
    assert ran == [(OP, backend, "forward"), (OP, backend, "backward")]
    r = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    ref = reference.shifted_window_attention(r["qkv"], r["bias_table"], qkv_bias=r["qkv_bias"], num_heads=h,
                                             window_size=ws, shift_size=(3, 3), dropout_p=p, dropout_keep=keep)
    ref_grads = torch.autograd.grad(ref, list(r.values()), gout.double())
    assert_close(out, ref, torch.float32, what="out")
    for name, g, rg in zip(t, grads, ref_grads):
        assert_close(g, rg, torch.float32, backward=True, what=f"d{name}")


def test_patch_timm_zero_copy_matches_timm(kernel_backend):
    """``patch_timm(zero_copy=True)``: timm Swin blocks run the zero-copy op, same outputs and gradients.

    4x5 tokens with window 4: timm clamps the H shift to 0 (per-axis shift) and pads W.
    """
    timm = pytest.importorskip("timm")
    require_backend(OP, kernel_backend)
    kw = dict(patch_size=4, window_size=4, num_classes=5, drop_path_rate=0.0, img_size=(16, 20), embed_dim=16,
              depths=(2,), num_heads=(2,))
    torch.manual_seed(2)
    orig = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kw)
    patched = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kw)
    patched.load_state_dict(orig.state_dict())
    assert semask_fast.patch_timm(patched, backend=kernel_backend, zero_copy=True) == 2
    x = torch.randn(1, 3, 16, 20)
    with record_dispatch() as ran:
        out = patched(x)
        out.square().sum().backward()
    assert {(op, b) for op, b, _ in ran} == {(OP, kernel_backend)}
    assert [phase for _, _, phase in ran].count("backward") == 2
    ref = orig(x)
    ref.square().sum().backward()
    assert_close(out, ref, torch.float32, what="out")
    for (name, a), b in zip(patched.named_parameters(), orig.parameters()):
        assert_close(a.grad, b.grad, torch.float32, backward=True, what=name)


# --------------------------------------------------------------------------- #
# triton launchers with explicit plans (tests/kernels/_launch_parity.py)
# --------------------------------------------------------------------------- #


def test_shifted_window_gpu_tiles():
    """Image layout (zero-copy launchers) with the GPU tiles, pad tokens taking the qkv bias."""
    k = kernels("window_attention")
    b, H, W, h, d, ws = 1, 10, 13, 1, 16, (7, 7)
    g = torch.Generator().manual_seed(0)
    t = dict(qkv=torch.randn(b, H, W, 3 * h * d, generator=g, dtype=torch.float64),
             bias_table=torch.randn(169, h, generator=g, dtype=torch.float64),
             qkv_bias=torch.randn(3 * h * d, generator=g, dtype=torch.float64))
    t = rounded(t, torch.float32)
    geo = k.Geometry(ws, b * 4, h, d, grid=(2, 2), shift=(3, 3), image_hw=(H, W))
    out, lse = k.shifted_window_attention_forward(t["qkv"], geo, t["bias_table"], t["qkv_bias"], scale=0.25,
                                                  plan=k.forward_plan(geo, torch.float32, interpreter=False))
    (gout,) = grad_outputs_like([out])
    dqkv, d_table, d_bias = k.shifted_window_attention_backward(
        t["qkv"], out, gout, lse, geo, t["bias_table"], t["qkv_bias"], scale=0.25,
        plan=k.backward_plan(geo, torch.float32, interpreter=False))

    def ref(qkv, bias_table, qkv_bias):
        return reference.shifted_window_attention(qkv, bias_table, qkv_bias=qkv_bias, num_heads=h, window_size=ws,
                                                  shift_size=(3, 3), scale=0.25)

    assert_matches_reference([out], dict(qkv=dqkv, bias_table=d_table, qkv_bias=d_bias), ref, t, [gout])


# ------------------------------------------------------------ adversarial inputs --
@ids()
def test_shifted_window_mild_mask_value_and_peaked(dtype):
    """Image layout, padded (10 x 13 with 7 x 7 windows): mask value -1.5 and a peaked head."""
    k = kernels("window_attention")
    b, H, W, h, d, ws = 1, 10, 13, 2, 64, (7, 7)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, H, W, 3, h, d, generator=g, dtype=torch.float64)
    qkv[..., 0, 0, :] *= 3.9  # head 0: q = k = 3.9 z, logits ~120
    qkv[..., 1, 0, :] = qkv[..., 0, 0, :]
    t = dict(qkv=qkv.reshape(b, H, W, 3 * h * d), bias_table=torch.randn(169, h, generator=g, dtype=torch.float64),
             qkv_bias=torch.randn(3 * h * d, generator=g, dtype=torch.float64))
    t = rounded(t, dtype)
    geo = k.Geometry(ws, b * 4, h, d, grid=(2, 2), shift=(3, 3), image_hw=(H, W))
    kw = dict(scale=d ** -0.5, mask_value=-1.5)
    out, lse = k.shifted_window_attention_forward(t["qkv"], geo, t["bias_table"], t["qkv_bias"], **kw)
    (gout,) = grad_outputs_like([out])
    dqkv, d_table, d_bias = k.shifted_window_attention_backward(t["qkv"], out, gout, lse, geo, t["bias_table"],
                                                                t["qkv_bias"], **kw)

    def ref(qkv, bias_table, qkv_bias):
        return reference.shifted_window_attention(qkv, bias_table, qkv_bias=qkv_bias, num_heads=h, window_size=ws,
                                                  shift_size=(3, 3), **kw)

    assert_matches_reference([out], dict(qkv=dqkv, bias_table=d_table, qkv_bias=d_bias), ref, t, [gout])


# --------------------------------------------------------------------------- #
# cpu (the native C++ kernels, image mode of csrc/cpu/window_attention.cpp)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("pad_then_roll", [True, False], ids=["pad-then-roll", "roll-then-pad"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_cpu_gradcheck_float64(pad_then_roll, dropout_p):
    """gradcheck on the zero-copy kernels (fp64): d(qkv), d(bias_table) and d(qkv_bias) through padded
    tokens, a shift, a non-square window and a head dim that fills no vector."""
    require_backend(OP, "cpu")
    t = _inputs(2, 5, 7, 2, 3, (2, 3), "cpu")
    inputs = tuple(t[n].requires_grad_() for n in ("qkv", "bias_table", "qkv_bias"))

    def fn(qkv, table, qkv_bias):
        torch.manual_seed(0)
        return semask_fast.shifted_window_attention(qkv, table, qkv_bias=qkv_bias, num_heads=2, window_size=(2, 3),
                                                    shift_size=(1, 1), pad_then_roll=pad_then_roll,
                                                    dropout_p=dropout_p, backend="cpu")

    with record_dispatch() as ran:
        assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)
    assert {b for _, b, _ in ran} == {"cpu"} and (OP, "cpu", "backward") in ran


def test_cpu_bitwise_independent_of_thread_count():
    """d(bias_table) and d(qkv_bias) are sums over windows: bitwise the same with 1 and 2 threads."""
    require_backend(OP, "cpu")
    t = {n: v.float() for n, v in _inputs(3, 17, 19, 3, 32, (7, 7), "cpu").items()}
    results = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            x = {n: v.clone().requires_grad_() for n, v in t.items()}
            out = semask_fast.shifted_window_attention(x["qkv"], x["bias_table"], qkv_bias=x["qkv_bias"], num_heads=3,
                                                       window_size=7, shift_size=3, backend="cpu")
            out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
            results.append([out] + [x[n].grad for n in ("qkv", "bias_table", "qkv_bias")])
        finally:
            torch.set_num_threads(previous)
    for name, a, b in zip(["out", "qkv", "bias_table", "qkv_bias"], *results):
        assert torch.equal(a, b), name
